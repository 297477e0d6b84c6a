"""Adaptive voting (ours): sample an input in rounds and stop as soon as its vote is decided.

Two stopping rules, both never exceeding N samples:

* exact: the fixed-N majority vote can no longer change. Kept once the leader holds a
  strict majority of N (and `min_agreement` of N); dropped once even the leader plus
  every remaining sample could not get there. Labels then equal a fixed-N vote on the
  same samples.
* confident (optional, `confidence` c): with a uniform prior on the leader's share p of
  all samples, stop when P(p > 1/2 | votes so far) >= c (keep) or <= 1 - c (drop). After
  3 agreeing samples P = 15/16, so easy inputs cost 3 samples instead of N; the label
  can then differ from a fixed-N vote, and `bench/voting.py` measures how often.
* window (optional, `window` w): early-stopping self-consistency (Li et al., 2024): stop
  and keep once the last w samples all give the same answer. Samples come in windows of
  w (the first round) and then `round_size`. Labels can differ from a fixed-N vote;
  `bench/voting.py` measures samples saved and labels changed.
"""

from __future__ import annotations

from collections import Counter
from math import comb

from s2d_ray.filters.vote import Vote, majority_vote


def majority_probability(leader: int, drawn: int) -> float:
    """P(p > 1/2) for p ~ Beta(leader + 1, drawn - leader + 1), exactly:
    for integer shapes it is P(Binomial(drawn + 1, 1/2) <= leader)."""
    return sum(comb(drawn + 1, j) for j in range(leader + 1)) / 2 ** (drawn + 1)


def _leader(answers: list[str | None]) -> tuple[str | None, int]:
    counts = Counter(a for a in answers if a).most_common(2)
    if not counts or (len(counts) > 1 and counts[0][1] == counts[1][1]):
        return None, counts[0][1] if counts else 0  # a tie has no leader yet
    return counts[0]


def adaptive_vote(
    answers: list[str | None], n_max: int, min_agreement: float = 0.5, confidence: float | None = None,
    window: int | None = None,
) -> Vote | None:
    """The vote once decided, or None while more samples are needed. `answers` are in the
    order they were drawn (the window rule reads the last ones)."""
    drawn = len(answers)
    if drawn > n_max:
        raise ValueError(f"{drawn} samples drawn, more than N={n_max}")
    leader, count = _leader(answers)
    counts = dict(Counter(a for a in answers if a))
    if drawn == n_max:
        return majority_vote(answers, min_agreement)
    if leader is not None and 2 * count > n_max and count >= min_agreement * n_max:
        return Vote(leader, count, drawn, True, "kept", counts)
    left = n_max - drawn
    if 2 * (count + left) <= n_max:
        return Vote(None, count, drawn, False, "no_majority", counts)
    if count + left < min_agreement * n_max:
        return Vote(None, count, drawn, False, "below_min_agreement", counts)
    if window is not None and drawn >= window:
        tail = answers[-window:]
        if tail[0] and all(a == tail[0] for a in tail) and counts[tail[0]] >= min_agreement * drawn:
            return Vote(tail[0], counts[tail[0]], drawn, True, "kept", counts)
    if confidence is not None and drawn:
        p = majority_probability(count if leader is not None else 0, drawn)
        if leader is not None and p >= confidence and count >= min_agreement * drawn:
            return Vote(leader, count, drawn, True, "kept", counts)
        if p <= 1 - confidence:
            return Vote(None, count, drawn, False, "no_majority", counts)
    return None


def first_round(n_max: int, confidence: float | None, window: int | None = None) -> int:
    """Samples to draw before any decision is possible."""
    if window is not None:
        return min(n_max, window)
    if confidence is None:
        return min(n_max, n_max // 2 + 1)
    k = 1
    while k < n_max and majority_probability(k, k) < confidence:
        k += 1
    return min(k, n_max // 2 + 1)
