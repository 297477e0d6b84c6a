"""Universal self-consistency (Chen et al., 2023): the model reads its own N responses
and names the most consistent one.

As in the S2D paper, when the N responses do not fit the context the prompt shows
the first 10 instead, and when even those do not fit, one response is picked at
random (seeded by the input, so reruns agree). The choice and how it was made are
recorded with the row.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from s2d_ray.filters.vote import Vote

FALLBACK_SHOWN = 10
_CHOICE = re.compile(r"response\s*#?\s*(\d+)", re.IGNORECASE)


def usc_prompt(question: str, responses: list[str]) -> str:
    shown = "\n\n".join(f"Response {i + 1}:\n{r.strip()}" for i, r in enumerate(responses))
    return (
        f"Here is a question and {len(responses)} responses to it.\n\n[Question]\n{question}\n\n{shown}\n\n"
        "Which response agrees most with the majority of the responses? Start your reply with "
        '"The most consistent response is Response <number>".'
    )


def parse_choice(text: str, shown: int) -> int | None:
    """0-based index of the response the model named, or None if it named none we showed."""
    for match in _CHOICE.finditer(text):
        k = int(match.group(1))
        if 1 <= k <= shown:
            return k - 1
    return None


@dataclass(frozen=True)
class UscPlan:
    prompt: str | None  # None: nothing fits, pick at random
    shown: int  # how many responses (the first ones) the prompt shows
    fallback: str  # "all", "first_10" or "random"


def plan(question: str, responses: list[str], fits: Callable[[str], bool], fallback_shown: int = FALLBACK_SHOWN) -> UscPlan:
    """The USC prompt to send: all N responses, else the first `fallback_shown`, else none."""
    prompt = usc_prompt(question, responses)
    if fits(prompt):
        return UscPlan(prompt, len(responses), "all")
    if len(responses) > fallback_shown:
        prompt = usc_prompt(question, responses[:fallback_shown])
        if fits(prompt):
            return UscPlan(prompt, fallback_shown, f"first_{fallback_shown}")
    return UscPlan(None, 0, "random")


def random_pick(key: str, n: int) -> int:
    return random.Random(hashlib.sha1(key.encode()).hexdigest()).randrange(n)


def choose(key: str, n: int, usc: UscPlan, reply: str | None) -> tuple[int, str]:
    """The chosen response's index and how it was chosen ("all", "first_10", "random",
    or "unparsed" when the model's reply named no response it was shown)."""
    if usc.prompt is None or reply is None:
        return random_pick(key, n), "random"
    index = parse_choice(reply, usc.shown)
    if index is None:
        return random_pick(key, n), "unparsed"
    return index, usc.fallback


def usc_vote(answers: list[str | None], index: int, how: str) -> Vote:
    """Keep the chosen response's answer (if it has one); `counts` records how it was chosen."""
    answer = answers[index] if 0 <= index < len(answers) else None
    counts = {f"chosen:{index}": 1, f"by:{how}": 1}
    agreeing = sum(a == answer for a in answers) if answer else 0
    return Vote(answer, agreeing, len(answers), answer is not None, "kept" if answer else "no_answer", counts)
