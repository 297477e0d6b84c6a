"""Unsupervised consistency filters: pure functions over the samples of one input."""

from s2d_ray.filters.adaptive import adaptive_vote, first_round, majority_probability
from s2d_ray.filters.swap import swap_vote
from s2d_ray.filters.usc import usc_vote
from s2d_ray.filters.vote import Vote, majority_vote, no_filter

__all__ = [
    "Vote", "adaptive_vote", "first_round", "majority_probability", "majority_vote", "no_filter", "swap_vote", "usc_vote",
]  # fmt: skip
