"""s2d-ray: System 2 distillation of large language models on Ray."""

__version__ = "0.1.0"
