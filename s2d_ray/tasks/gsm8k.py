"""GSM8K grade-school math: the standard JSONL (`question`, `answer` ending in `#### <number>`);
exact match on the final number."""

from __future__ import annotations

import re
from typing import Literal

from s2d_ray.errors import DataError
from s2d_ray.tasks.base import Example
from s2d_ray.tasks.data import FileTask, get

_NUMBER = r"-?\$?\s*\d[\d,]*(?:\.\d+)?"
_ANSWER = re.compile(rf"(?:answer\s*(?:is\s*:?|:|=)|####)\s*[*\"'`]*\s*({_NUMBER})", re.IGNORECASE)
_ANY = re.compile(_NUMBER)


def normalize_number(text: str) -> str | None:
    """'$1,200.00' -> '1200', '-3.50' -> '-3.5'; None if it is not a number."""
    cleaned = text.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return str(int(value)) if value.is_integer() else f"{value:g}"


class GSM8K(FileTask):
    name: Literal["gsm8k"] = "gsm8k"
    answer_format: str = 'Reply with "Answer: " followed by the final number only.'

    def example(self, record: dict, id: str, where: str) -> Example:
        question = str(get(record, "question", where)).strip()
        solution = record.get("answer")
        gold = None
        if solution is not None:
            if "####" not in str(solution):
                raise DataError(f"{where}: field 'answer' does not end in '#### <number>'")
            gold = normalize_number(str(solution).rsplit("####", 1)[1].strip())
            if gold is None:
                raise DataError(f"{where}: field 'answer' has no number after '####'")
        return Example(id, f"{question}\n{self.answer_format}", gold)

    def extract(self, text: str) -> str | None:
        """The number after the last "Answer:" / "answer is" / "####"; else the last number."""
        found = _ANSWER.findall(text)
        if found:
            return normalize_number(found[-1])
        numbers = _ANY.findall(text)
        return normalize_number(numbers[-1]) if numbers else None
