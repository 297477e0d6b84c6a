"""What every task provides: inputs per split, the System 1 prompt, answer extraction, scoring."""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Example:
    id: str
    question: str  # the System 1 prompt; System 2 methods build on it
    answer: str | None = None  # gold label, only used to evaluate
    fields: dict[str, str] = field(default_factory=dict)  # extra template fields

    def template_values(self) -> dict[str, str]:
        return {**self.fields, "question": self.question}


class Task(BaseModel):
    """A task config that is also the task: it is validated, picklable and small."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Prompt overrides this task needs for some methods: {method: {step: template}}.
    method_prompts: dict[str, dict[str, str]] = {}

    def examples(self, split: str) -> list[Example]:
        raise NotImplementedError

    def extract(self, text: str) -> str | None:
        """The final answer in a model output, normalised; None if there is none."""
        raise NotImplementedError

    def target(self, answer: str) -> str:
        """The distillation target for an extracted answer: the final answer only."""
        return answer

    def score(self, prediction: str | None, gold: str) -> float:
        return float(prediction is not None and prediction == gold)

    @property
    def template_fields(self) -> set[str]:
        return {"question"}
