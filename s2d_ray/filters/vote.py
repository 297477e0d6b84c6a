"""Output self-consistency: majority vote over the extracted answers of N samples."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class Vote:
    answer: str | None  # the winning answer, or None when there is none
    count: int  # samples that gave it
    total: int  # samples drawn (unparseable ones included)
    kept: bool
    reason: str  # "kept", "no_answer", "no_majority", "below_min_agreement", "no_samples"
    counts: dict[str, int]

    @property
    def agreement(self) -> float:
        return self.count / self.total if self.total else 0.0


def majority_vote(answers: list[str | None], min_agreement: float = 0.5) -> Vote:
    """Keep an input when one answer has a strict majority of *all* samples and at
    least `min_agreement` of them. Samples without a parseable answer count as votes
    against every answer, so a model that rarely follows the format is not trusted.
    """
    total = len(answers)
    counts = Counter(a for a in answers if a)
    if total == 0:
        return Vote(None, 0, 0, False, "no_samples", {})
    if not counts:
        return Vote(None, 0, total, False, "no_answer", {})
    ranked = counts.most_common()
    answer, count = ranked[0]
    if len(ranked) > 1 and ranked[1][1] == count:
        return Vote(None, count, total, False, "no_majority", dict(counts))
    if 2 * count <= total:
        return Vote(answer, count, total, False, "no_majority", dict(counts))
    if count < min_agreement * total:
        return Vote(answer, count, total, False, "below_min_agreement", dict(counts))
    return Vote(answer, count, total, True, "kept", dict(counts))


def no_filter(answers: list[str | None]) -> Vote:
    """Ablation: keep the first sample's answer, if it has one."""
    first = answers[0] if answers else None
    kept = bool(first)
    return Vote(first, int(kept), len(answers), kept, "kept" if kept else "no_answer", {first: 1} if first else {})
