"""A System 2 method is a small declarative program: named steps, each a prompt template.

A step's template is formatted with the task's input fields (always ``question``,
the System 1 prompt) and the outputs of earlier steps, by step name. The first step
is sampled N times per input (vLLM shares the prompt prefix); every later step runs
once per sample, so one sample is one full pass through the program. The last
step's text is what the task's answer extractor reads.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Step:
    name: str
    template: str


@dataclass(frozen=True)
class Program:
    name: str
    description: str
    steps: tuple[Step, ...]
    # Inputs the templates may use beyond step outputs (tasks add their own).
    fields: frozenset[str] = field(default=frozenset({"question"}))

    @property
    def step_names(self) -> list[str]:
        return [s.name for s in self.steps]

    def with_prompts(self, prompts: dict[str, str]) -> "Program":
        """Return a copy whose steps use the given templates (by step name)."""
        unknown = set(prompts) - set(self.step_names)
        if unknown:
            raise ValueError(
                f"method {self.name!r} has no step {sorted(unknown)[0]!r}; steps: {', '.join(self.step_names)}"
            )
        return replace(self, steps=tuple(Step(s.name, prompts.get(s.name, s.template)) for s in self.steps))

    def check_templates(self, task_fields: set[str]) -> None:
        """Every placeholder must be a task field or the output of an *earlier* step."""
        available = set(task_fields)
        for step in self.steps:
            for name in placeholders(step.template):
                if name not in available:
                    raise ValueError(
                        f"method {self.name!r} step {step.name!r}: unknown placeholder {{{name}}}; "
                        f"available: {', '.join(sorted(available))}"
                    )
            available.add(step.name)

    def prompts(self) -> dict[str, str]:
        return {s.name: s.template for s in self.steps}


def placeholders(template: str) -> list[str]:
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:  # unbalanced braces
        raise ValueError(f"bad template {template[:40]!r}...: {err}") from None


def render(template: str, values: dict[str, str]) -> str:
    return template.format_map(values)
