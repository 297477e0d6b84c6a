"""What every task provides: inputs per split, the System 1 prompt, answer extraction, scoring."""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable
from typing import ClassVar
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, model_validator

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Example:
    id: str
    question: str  # the System 1 prompt (with the answer-format instruction); System 2 methods build on it
    answer: str | None = None  # gold label, only used to evaluate
    fields: dict[str, str] = field(default_factory=dict)  # extra template fields
    group: str | None = None  # evaluation subset, e.g. "biased" / "unbiased"


def accuracy(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error: differences smaller than ~2 of these are noise."""
    n = len(values)
    if not n:
        return 0.0, 0.0
    mean = sum(values) / n
    return mean, math.sqrt(mean * (1 - mean) / n)


class Task(BaseModel):
    """A task config that is also the task: it is validated, picklable and small."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Prompt overrides this task needs for some methods: {method: {step: template}}.
    method_prompts: dict[str, dict[str, str]] = {}

    # The answer-format instruction ({format} in method templates); the System 1 prompt ends with it.
    answer_format: str = 'Reply with "Answer: " followed by the answer.'
    # The headline metric of eval.json and of the distillability verdict (higher is better).
    metric: str = "accuracy"

    def examples(self, split: str) -> list[Example]:
        raise NotImplementedError

    def extract(self, text: str) -> str | None:
        """The final answer in a model output, normalised; None if there is none."""
        raise NotImplementedError

    def malformed(self, answer: str, values: dict[str, str]) -> str | None:
        """Why an extracted answer cannot be an answer to this input (`values`: the input's
        template fields), judged from the input alone, no label; None when it is well-formed.
        Only well-formed answers are voted on, scored as answers and distilled: a consistent
        echo of the prompt ("Answer: answer") is not an answer. Tasks whose extractor only
        yields well-formed answers (yes/no, a number, a verdict, a choice) keep this."""
        return None

    def answer_space(self) -> int | None:
        """How many distinct answers the task has (None: open): what a distillation set
        dominated by one answer is measured against."""
        return None

    def target(self, answer: str) -> str:
        """The distillation target for an extracted answer: the final answer only."""
        return f"Answer: {answer}"

    def score(self, prediction: str | None, gold: str) -> float:
        return float(prediction is not None and prediction == gold)

    @property
    def template_fields(self) -> set[str]:
        return {"question", "format"}

    # What separates a prompt's body from the answer-format instruction it ends with.
    format_separator: ClassVar[str] = "\n"

    def request(self, text: str) -> Example:
        """A served request's input as this task's prompt, exactly as evaluation built it:
        the prompt as it is (ending with the answer-format instruction), or its body alone,
        to which the instruction is added as the task adds it. ValueError: not an input of
        this task (the message says what one looks like)."""
        text = text.strip()
        if not text:
            raise ValueError("the input is empty")
        body = text.removesuffix(self.answer_format).rstrip() if text.endswith(self.answer_format) else text
        if not body:
            raise ValueError("the input holds only the answer-format instruction")
        return Example("request", f"{body}{self.format_separator}{self.answer_format}", None, self.request_fields(body))

    def request_fields(self, body: str) -> dict[str, str]:
        """The extra template fields of a served input, from its prompt's body."""
        return {}

    # Input perturbation (pairwise judging swaps A and B); None: the task has none.
    def perturb(self, values: dict[str, str]) -> dict[str, str] | None:
        return None

    def unperturb(self, answer: str | None) -> str | None:
        """Map an answer on the perturbed input back to the original input's terms."""
        return answer

    @property
    def has_perturbation(self) -> bool:
        return type(self).perturb is not Task.perturb

    def metrics(self, predictions: list, golds: list, groups: list, perturbed: list | None = None) -> dict:
        """Scores of one system; `perturbed` holds its answers on the perturbed inputs."""
        scores = [self.score(p, g) for p, g in zip(predictions, golds)]
        mean, stderr = accuracy(scores)
        out = {self.metric: mean, f"{self.metric}_stderr": stderr}
        for name in sorted({g for g in groups if g}):
            mine = [s for s, g in zip(scores, groups) if g == name]
            out[f"{self.metric}_{name}"], _ = accuracy(mine)
            out[f"n_{name}"] = len(mine)
        return out


class SyntheticTask(Task):
    """A task whose inputs are drawn, seeded, from a finite space. Splits are disjoint:
    an input belongs to exactly one split (by the hash of its key), so changing one
    split's size never changes another's examples."""

    train: int = Field(200, ge=0)
    validation: int = Field(200, ge=0)
    test: int = Field(200, ge=0)
    seed: int = 0

    def capacity(self) -> tuple[int, str]:
        """How many distinct inputs the settings allow, and what limits them (for the error)."""
        raise NotImplementedError

    def sampler(self) -> Callable[[random.Random], tuple[str, Callable[[str], Example]]]:
        """A function drawing one input: its key (unique per input) and how to build it from an id."""
        raise NotImplementedError

    @model_validator(mode="after")
    def _fits(self):
        total, limit = self.capacity()
        per_split = total // (2 * len(SPLITS))  # room to spare: drawing stays fast
        for split in SPLITS:
            if getattr(self, split) > per_split:
                raise ValueError(f"{split}: at most {per_split} distinct examples with {limit}")
        return self

    def examples(self, split: str) -> list[Example]:
        draw = self.sampler()
        rng = random.Random(f"{self.name}-{self.seed}-{split}")
        seen: set[str] = set()
        out: list[Example] = []
        while len(out) < getattr(self, split):
            key, build = draw(rng)
            digest = hashlib.sha1(key.encode()).hexdigest()
            if key in seen or SPLITS[int(digest, 16) % len(SPLITS)] != split:
                continue
            seen.add(key)
            out.append(build(f"{split}-{digest[:12]}"))
        return out
