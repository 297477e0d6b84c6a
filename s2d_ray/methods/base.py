"""A System 2 method is a small declarative program: named steps, each a prompt template.

A step's template is formatted with the task's input fields (always ``question``,
the System 1 prompt, and ``format``, the task's answer-format instruction) and the
outputs of earlier steps, by step name. The first step is sampled N times per input
(vLLM shares the prompt prefix); every later step runs once per sample, so one
sample is one full pass through the program. The last step's text is what the
task's answer extractor reads.

A step may *fan out* over the output of an earlier step (``over``): that output is
read as a list (numbered or bulleted lines, at most ``max_items``), the step runs
once per item with the item as ``{item}``, and its output is the items with their
answers, in order. Branch-Solve-Merge's "solve" is such a step.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, replace


_ITEM = re.compile(r"^\s*(?:\d+[.):]|[-*\u2022])\s*(.+?)\s*$")


@dataclass(frozen=True)
class Step:
    name: str
    template: str
    over: str | None = None  # fan out over the items of this earlier step's output
    max_items: int = 5


def split_items(text: str, max_items: int) -> list[str]:
    """The items of a list the model wrote; the whole text when it wrote no list."""
    items = [m.group(1) for m in map(_ITEM.match, text.splitlines()) if m and m.group(1)]
    if not items:
        items = [text.strip() or "(none)"]
    return items[:max_items]


@dataclass(frozen=True)
class Program:
    name: str
    description: str
    steps: tuple[Step, ...]
    # Which tasks the method is for, when not all (said in the error when a field is missing).
    needs: str | None = None

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
        return replace(self, steps=tuple(replace(s, template=prompts.get(s.name, s.template)) for s in self.steps))

    def check_templates(self, task_fields: set[str]) -> None:
        """Every placeholder must be a task field or the output of an *earlier* step."""
        available = set(task_fields)
        for i, step in enumerate(self.steps):
            scope = set(available)
            if step.over is not None:
                if i == 0 or step.over not in available - set(task_fields):
                    raise ValueError(f"method {self.name!r} step {step.name!r} fans out over {step.over!r}, not an earlier step")
                scope.add("item")
            for name in placeholders(step.template):
                if name not in scope:
                    hint = f" ({self.name} is for {self.needs})" if self.needs else ""
                    raise ValueError(
                        f"method {self.name!r} step {step.name!r}: unknown placeholder {{{name}}}; "
                        f"available: {', '.join(sorted(scope))}{hint}"
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
