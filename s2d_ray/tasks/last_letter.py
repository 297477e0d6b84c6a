"""Last-letter concatenation (synthetic, seeded): "apple banana" -> "ea"."""

from __future__ import annotations

import random
import re
from functools import lru_cache
from importlib import resources
from typing import Literal

from pydantic import Field, model_validator

from s2d_ray.tasks.base import Example, SyntheticTask

_ANSWER = re.compile(r"answer\s*(?:is\s*:?|:|=)\s*[*\"'“`]*\s*([a-z]+)", re.IGNORECASE)
_LONE_WORD = re.compile(r"^[*\"'“`\s]*([a-z]+)[*\"'”`.\s]*$", re.IGNORECASE)


@lru_cache(maxsize=1)
def shipped_words() -> tuple[str, ...]:
    text = resources.files("s2d_ray.tasks").joinpath("words.txt").read_text()
    return tuple(w for w in text.split() if w)

_QUOTED = re.compile(r'^Take the last letter of each word in "(.*)" and concatenate them\.', re.DOTALL)


class LastLetter(SyntheticTask):
    name: Literal["last_letter"] = "last_letter"
    words_per_example: int = Field(2, ge=1, le=16)
    # Size of the word pool drawn (seeded) from the shipped list; the paper used 1,200.
    vocabulary: int = Field(1200, ge=10)
    answer_format: str = 'Reply with "Answer: " followed by the letters.'
    method_prompts: dict[str, dict[str, str]] = {
        "rar2": {
            "rephrase": "{question}\n\nRephrase the question above so that it is easier to answer. "
            "Keep the words unchanged and do not answer it."
        }
    }

    @model_validator(mode="after")
    def _enough_words(self):
        if self.vocabulary > len(shipped_words()):
            raise ValueError(f"vocabulary {self.vocabulary} > {len(shipped_words())} shipped words")
        return self

    def capacity(self) -> tuple[int, str]:
        return min(self.vocabulary, len(shipped_words())) ** self.words_per_example, f"{self.vocabulary} words"

    def vocabulary_words(self) -> list[str]:
        return sorted(random.Random(f"vocabulary-{self.seed}").sample(shipped_words(), self.vocabulary))

    def sampler(self):
        words = self.vocabulary_words()

        def draw(rng: random.Random):
            combo = tuple(rng.choice(words) for _ in range(self.words_per_example))
            key = " ".join(combo)
            question = self.question(combo, self.answer_format)
            return key, lambda id: Example(id, question, "".join(w[-1] for w in combo), {"words": key})

        return draw

    @staticmethod
    def question(words: tuple[str, ...], answer_format: str) -> str:
        return f'Take the last letter of each word in "{" ".join(words)}" and concatenate them. {answer_format}'


    def extract(self, text: str) -> str | None:
        found = _ANSWER.findall(text)
        if found:
            return found[-1].lower()
        lone = _LONE_WORD.match(text.strip())
        return lone.group(1).lower() if lone else None

    def malformed(self, answer: str, values: dict[str, str]) -> str | None:
        """One letter per word of the input ("answer" for two words is an echo of the prompt)."""
        words = len(values.get("words", "").split())
        if words and len(answer) != words:
            plural = lambda n, what: f"{n} {what}" + ("s" if n != 1 else "")  # noqa: E731
            return f"{plural(len(answer), 'letter')} for {plural(words, 'word')}"
        return None

    @property
    def template_fields(self) -> set[str]:
        return {"question", "format", "words"}

    def request(self, text: str) -> Example:
        """The task's prompt, or the words alone ("alpha beta")."""
        words = _QUOTED.search(text)
        words = (words.group(1) if words else text.removesuffix(self.answer_format)).split()
        if not words:
            raise ValueError('the input has no words: send the words ("alpha beta") or the task\'s prompt')
        return Example("request", self.question(tuple(words), self.answer_format), None, {"words": " ".join(words)})
