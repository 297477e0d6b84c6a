"""A task defined only in a job file: where the data is, which field is the prompt,
which (optional) field is the label, and how to find the answer in an output."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import model_validator

from s2d_ray.errors import DataError
from s2d_ray.tasks.base import Example
from s2d_ray.tasks.data import FileTask, get


def _present(record: dict, dotted: str) -> bool:
    node = record
    for part in dotted.split("."):
        if not isinstance(node, dict) or node.get(part) is None:
            return False
        node = node[part]
    return True


class UserTask(FileTask):
    name: Literal["custom"] = "custom"
    prompt_field: str  # dotted for nested records: "input.text"
    answer_field: str | None = None  # without it the task can be distilled but not scored
    # The record's own id (dotted); duplicates are an error. None: an id from the content.
    id_field: str | None = None
    # How the prompt is built; {prompt} is the prompt field's text.
    prompt_template: str = "{prompt}"
    # Exactly one extractor: a regex (its first group, else the whole match; the last match
    # wins) or a fixed set of choices (the last one named in the output wins).
    regex: str | None = None
    choices: list[str] | None = None
    case_sensitive: bool = False
    answer_format: str = ""

    @model_validator(mode="after")
    def _extractor(self):
        if (self.regex is None) == (self.choices is None):
            raise ValueError("give exactly one answer extractor: task.regex or task.choices")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as err:
                raise ValueError(f"task.regex does not compile: {err}") from None
        if self.choices is not None and (not self.choices or not all(c.strip() for c in self.choices)):
            raise ValueError("task.choices must be a non-empty list of non-empty strings")
        if "{prompt}" not in self.prompt_template:
            raise ValueError("task.prompt_template must contain {prompt}")
        if not self.answer_format:
            fmt = (
                f"Reply with \"Answer: \" followed by one of: {', '.join(self.choices)}."
                if self.choices
                else 'Reply with "Answer: " followed by the answer.'
            )
            object.__setattr__(self, "answer_format", fmt)
        return self

    def _pattern(self) -> re.Pattern:
        flags = 0 if self.case_sensitive else re.IGNORECASE
        if self.regex is not None:
            return re.compile(self.regex, flags)
        alternatives = "|".join(re.escape(c) for c in sorted(self.choices, key=len, reverse=True))
        return re.compile(rf"(?<!\w)({alternatives})(?!\w)", flags)

    def _norm(self, text: str) -> str:
        text = text.strip()
        if self.choices is not None:  # report the choice as the job file spells it
            for c in self.choices:
                if text == c or (not self.case_sensitive and text.lower() == c.lower()):
                    return c
        return text if self.case_sensitive else text.lower()

    def id_of(self, record: dict, split: str, seen: dict, where: str) -> str:
        if self.id_field is None:
            return super().id_of(record, split, seen, where)
        value = get(record, self.id_field, where, str)
        if value in seen:
            raise DataError(f"{where}: id {value!r} (field {self.id_field!r}) repeats record {seen[value]}; ids must be unique")
        seen[value] = int(where.rsplit(" ", 1)[-1])
        return f"{split}-{value}"

    def example(self, record: dict, id: str, where: str) -> Example:
        prompt = self.prompt_template.replace("{prompt}", get(record, self.prompt_field, where, str))
        gold = None
        # A missing label is fine (the train split's labels are never used); evaluation
        # says how many inputs of its split lack one.
        if self.answer_field is not None and _present(record, self.answer_field):
            gold = self._norm(get(record, self.answer_field, where, str))
        return Example(id, f"{prompt}\n{self.answer_format}", gold)

    def request(self, text: str) -> Example:
        """The full prompt (ending with the answer format), or the prompt field's value alone."""
        if text.strip().endswith(self.answer_format):
            return super().request(text)
        if not text.strip():
            raise ValueError("the input is empty")
        return super().request(self.prompt_template.replace("{prompt}", text.strip()))

    def answer_space(self) -> int | None:
        return len(self.choices) if self.choices is not None else None

    def extract(self, text: str) -> str | None:
        matches = list(self._pattern().finditer(text))
        if not matches:
            return None
        last = matches[-1]
        found = last.group(1) if last.re.groups else last.group(0)
        return self._norm(found) if found and found.strip() else None
