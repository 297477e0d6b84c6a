"""System 1: the task prompt answered directly, no intermediate text."""

from s2d_ray.methods.base import Program, Step

PROGRAM = Program(
    name="system1",
    description="the task prompt answered directly",
    steps=(Step("answer", "{question}"),),
)
