"""Run a method's program over a batch of inputs on one engine, step by step.

Each step is one batched engine call across all inputs (and samples), so a batch
of 64 inputs x 8 samples x 2 steps is two engine calls, and the second step's
prompts, which repeat the question, hit the engine's prefix cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from s2d_ray.methods.base import Program, render


@dataclass
class Sample:
    values: dict[str, str]  # template values: task fields + outputs of finished steps
    tokens: dict[str, int] = field(default_factory=dict)  # generated tokens per step
    final: str = ""


def run_program(
    engine,
    program: Program,
    inputs: list[dict[str, str]],
    *,
    samples: int,
    temperature: float,
    top_p: float,
    max_tokens: int,
) -> list[list[Sample]]:
    """Return, for every input, `samples` complete passes through the program."""
    if not inputs:
        return []
    first, *rest = program.steps
    sampling = dict(temperature=temperature, top_p=top_p, max_tokens=max_tokens)
    outs = engine.generate([render(first.template, v) for v in inputs], n=samples, **sampling)
    per_input: list[list[Sample]] = []
    for values, completions in zip(inputs, outs):
        per_input.append(
            [Sample({**values, first.name: c.text}, {first.name: c.tokens}, c.text) for c in completions]
        )
    flat = [s for group in per_input for s in group]
    for step in rest:
        outs = engine.generate([render(step.template, s.values) for s in flat], n=1, **sampling)
        for s, (c,) in zip(flat, outs):
            s.values[step.name] = c.text
            s.tokens[step.name] = c.tokens
            s.final = c.text
    return per_input
