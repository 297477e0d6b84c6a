"""Coin flip (synthetic, seeded): "A coin is heads up. Ana flips the coin. Bo does not
flip the coin. Is the coin still heads up?" -> yes when the number of flips is even."""

from __future__ import annotations

import hashlib
import random
import re
from typing import Literal

from pydantic import Field, model_validator

from s2d_ray.tasks.base import SPLITS, Example, Task

NAMES = (
    "Ada Alan Amir Ana Anya Ben Bo Carla Chen Dara Dev Eli Emma Eva Femi Finn Gia Hana Ivan "
    "Jade Jon Kai Kemal Lea Leo Lina Luca Maya Mei Milo Nadia Nico Noor Omar Oren Pia Priya "
    "Quinn Rafa Rosa Rui Sami Sara Tariq Tess Theo Uma Vera Wen Yara Yusuf Zoe"
).split()

_ANSWER = re.compile(r"answer\s*(?:is\s*:?|:|=)\s*[*\"'“`]*\s*(yes|no)\b", re.IGNORECASE)
_LONE = re.compile(r"^[*\"'“`\s]*(yes|no)\b", re.IGNORECASE)


class CoinFlip(Task):
    name: Literal["coin_flip"] = "coin_flip"
    people: int = Field(4, ge=1, le=12)  # people who each flip the coin or not, in turn
    flip_probability: float = Field(0.5, gt=0.0, lt=1.0)
    train: int = Field(200, ge=0)
    validation: int = Field(200, ge=0)
    test: int = Field(200, ge=0)
    seed: int = 0
    answer_format: str = 'Reply with "Answer: yes" or "Answer: no".'
    method_prompts: dict[str, dict[str, str]] = {
        "rar2": {
            "rephrase": "{question}\n\nRephrase the question above so that it is easier to answer. "
            "Keep every person and every action, in order, and do not answer it."
        }
    }

    @model_validator(mode="after")
    def _fits(self):
        capacity = (len(NAMES) * 2) ** self.people // (2 * len(SPLITS))
        for split in SPLITS:
            if getattr(self, split) > capacity:
                raise ValueError(f"{split}: at most {capacity} distinct examples with {self.people} people")
        return self

    def examples(self, split: str) -> list[Example]:
        """Seeded and disjoint across splits (a story belongs to one split, by hash)."""
        rng = random.Random(f"coin_flip-{self.seed}-{split}")
        seen: set[str] = set()
        out: list[Example] = []
        while len(out) < getattr(self, split):
            people = rng.sample(NAMES, self.people)
            flips = [rng.random() < self.flip_probability for _ in people]
            story = " ".join(f"{p} {'flips' if f else 'does not flip'} the coin." for p, f in zip(people, flips))
            digest = hashlib.sha1(story.encode()).hexdigest()
            if story in seen or SPLITS[int(digest, 16) % len(SPLITS)] != split:
                continue
            seen.add(story)
            question = f"A coin is heads up. {story} Is the coin still heads up? {self.answer_format}"
            out.append(Example(f"{split}-{digest[:12]}", question, "yes" if sum(flips) % 2 == 0 else "no"))
        return out

    def extract(self, text: str) -> str | None:
        found = _ANSWER.findall(text)
        if found:
            return found[-1].lower()
        lone = _LONE.match(text.strip())
        return lone.group(1).lower() if lone else None
