"""What one stage's engines run: the passes over every input, and the engine settings."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from s2d_ray.config import EngineConfig
from s2d_ray.methods import Program
from s2d_ray.tasks import Task


@dataclass(frozen=True)
class Pass:
    """One program run over every input, its outputs stored under `label`_* columns."""

    label: str
    program: Program
    samples: int
    temperature: float
    top_p: float
    max_tokens: int
    # Run on the task's perturbed inputs (A/B swapped); answers are stored mapped back.
    perturbed: bool = False
    # "usc": after sampling, the model picks the most consistent response.
    select: str | None = None
    usc_fallback: int = 10
    usc_max_tokens: int = 24
    # Adaptive voting: (min_agreement, confidence, round_size, window); None samples N at once.
    adaptive: tuple[float, float | None, int, int | None] | None = None


@dataclass(frozen=True)
class EngineStage:
    """Everything one stage's engines need, in one object (as a Ray Data LLM stage is
    described by one config): the model, how to run it, the task and the passes, and the
    vote to apply to each generated row (None: rows are written as generated)."""

    model_path: str
    engine: EngineConfig
    dtype: str
    seed: int
    task: Task
    passes: tuple[Pass, ...]
    vote: dict | None = None
    # model.chat_template: None (the model's own), "none" (raw prompts) or a template.
    chat_template: str | None = None
    # Rows per batch: engine.batch_size times this. An evaluation draws one greedy sample
    # per pass where generation draws N: its batches hold more inputs, so that an engine
    # holds as many requests as in generation (`pipeline.engine_stage`).
    batch_scale: int = 1


def batch_job(batch: pd.DataFrame) -> int:
    """Which stage of a shared pipeline a batch belongs to (every batch holds one)."""
    if "job" not in batch.columns:
        return 0
    jobs = set(batch["job"].tolist())
    if len(jobs) != 1:
        raise RuntimeError(f"a batch mixes the rows of stages {sorted(jobs)}")
    return int(jobs.pop())
