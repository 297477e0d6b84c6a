"""Input-perturbation consistency: judge (A, B) and (B, A); keep only when the
verdicts agree once the swapped one is mapped back to the original order."""

from __future__ import annotations

from s2d_ray.filters.vote import Vote, majority_vote


def _side(answers: list[str | None]) -> str | None:
    if len(answers) == 1:
        return answers[0]
    vote = majority_vote(answers)
    return vote.answer if vote.kept else None


def swap_vote(original: list[str | None], swapped_back: list[str | None]) -> Vote:
    """`swapped_back`: answers on the swapped input, already mapped to the original order.
    With several samples per order, each order's majority is its verdict."""
    a, b = _side(original), _side(swapped_back)
    counts = {f"original:{a}": 1, f"swapped:{b}": 1}
    total = len(original) + len(swapped_back)
    if a is None or b is None:
        return Vote(None, 0, total, False, "no_answer" if not (a or b) else "one_order_undecided", counts)
    if a != b:
        return Vote(None, 1, total, False, "order_inconsistent", counts)
    return Vote(a, total, total, True, "kept", counts)
