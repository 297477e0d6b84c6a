"""Unsupervised consistency filters: pure functions over the samples of one input."""

from s2d_ray.filters.vote import Vote, majority_vote, no_filter


def apply_filter(name: str, answers: list, min_agreement: float) -> Vote:
    if name == "majority":
        return majority_vote(answers, min_agreement)
    if name == "none":
        return no_filter(answers)
    raise ValueError(f"unknown filter {name!r}")


__all__ = ["Vote", "majority_vote", "no_filter", "apply_filter"]
