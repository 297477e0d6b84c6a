"""Coin flip (synthetic, seeded): "A coin is heads up. Ana flips the coin. Bo does not
flip the coin. Is the coin still heads up?" -> yes when the number of flips is even."""

from __future__ import annotations

import random
import re
from typing import ClassVar, Literal

from pydantic import Field

from s2d_ray.tasks.base import Example, SyntheticTask

NAMES = (
    "Ada Alan Amir Ana Anya Ben Bo Carla Chen Dara Dev Eli Emma Eva Femi Finn Gia Hana Ivan "
    "Jade Jon Kai Kemal Lea Leo Lina Luca Maya Mei Milo Nadia Nico Noor Omar Oren Pia Priya "
    "Quinn Rafa Rosa Rui Sami Sara Tariq Tess Theo Uma Vera Wen Yara Yusuf Zoe"
).split()

_ANSWER = re.compile(r"answer\s*(?:is\s*:?|:|=)\s*[*\"'“`]*\s*(yes|no)\b", re.IGNORECASE)
_LONE = re.compile(r"^[*\"'“`\s]*(yes|no)\b", re.IGNORECASE)


class CoinFlip(SyntheticTask):
    name: Literal["coin_flip"] = "coin_flip"
    people: int = Field(4, ge=1, le=12)  # people who each flip the coin or not, in turn
    flip_probability: float = Field(0.5, gt=0.0, lt=1.0)
    answer_format: str = 'Reply with "Answer: yes" or "Answer: no".'
    format_separator: ClassVar[str] = " "
    method_prompts: dict[str, dict[str, str]] = {
        "rar2": {
            "rephrase": "{question}\n\nRephrase the question above so that it is easier to answer. "
            "Keep every person and every action, in order, and do not answer it."
        }
    }

    def capacity(self) -> tuple[int, str]:
        return (len(NAMES) * 2) ** self.people, f"{self.people} people"

    def sampler(self):
        def draw(rng: random.Random):
            people = rng.sample(NAMES, self.people)
            flips = [rng.random() < self.flip_probability for _ in people]
            story = " ".join(f"{p} {'flips' if f else 'does not flip'} the coin." for p, f in zip(people, flips))
            question = f"A coin is heads up. {story} Is the coin still heads up? {self.answer_format}"
            return story, lambda id: Example(id, question, "yes" if sum(flips) % 2 == 0 else "no")

        return draw

    def answer_space(self) -> int | None:
        return 2  # the extractor yields yes or no only

    def extract(self, text: str) -> str | None:
        found = _ANSWER.findall(text)
        if found:
            return found[-1].lower()
        lone = _LONE.match(text.strip())
        return lone.group(1).lower() if lone else None
