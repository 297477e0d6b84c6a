"""USC, swap consistency and adaptive voting: pure functions, no engine."""

import random

import pytest

from s2d_ray.config import FilterConfig
from s2d_ray.filters import adaptive_vote, first_round, majority_probability, majority_vote, swap_vote, usc_vote
from s2d_ray.filters.usc import choose, parse_choice, plan, usc_prompt
from s2d_ray.generation import vote_row


# --- universal self-consistency -------------------------------------------------------------


def test_usc_parses_the_named_response():
    assert parse_choice("The most consistent response is Response 3.", 5) == 2
    assert parse_choice("response #2 agrees with most", 5) == 1
    # A number outside what was shown is not a choice; a later valid one is.
    assert parse_choice("Response 9 ... no, Response 1", 5) == 0
    assert parse_choice("They all agree.", 5) is None


def test_usc_prompt_numbers_every_response():
    text = usc_prompt("Q?", ["a", "b", "c"])
    assert "Response 1:\na" in text and "Response 3:\nc" in text and "Q?" in text


def test_usc_falls_back_to_ten_then_to_random():
    responses = [f"response {i} " + "x" * 50 for i in range(20)]
    everything = plan("Q", responses, fits=lambda p: True)
    assert (everything.shown, everything.fallback) == (20, "all")
    ten = plan("Q", responses, fits=lambda p: "Response 11:" not in p)
    assert (ten.shown, ten.fallback) == (10, "first_10") and "Response 11:" not in ten.prompt
    nothing = plan("Q", responses, fits=lambda p: False)
    assert nothing.prompt is None and nothing.fallback == "random"
    # With N <= 10 there is no smaller prompt to try.
    assert plan("Q", responses[:8], fits=lambda p: False).fallback == "random"


def test_usc_choice_records_how_it_was_made_and_random_is_seeded():
    shown = plan("Q", ["a", "b", "c"], fits=lambda p: True)
    assert choose("id-1", 3, shown, "The most consistent response is Response 2") == (1, "all")
    index, how = choose("id-1", 3, shown, "no idea")
    assert how == "unparsed" and 0 <= index < 3
    assert choose("id-1", 3, shown, "no idea") == (index, how)  # reruns agree
    assert choose("id-1", 3, plan("Q", ["a"] * 3, fits=lambda p: False), None)[1] == "random"


def test_usc_vote_keeps_the_chosen_answer_or_drops_an_unparsed_one():
    v = usc_vote(["paris", "lyon", "paris"], 2, "all")
    assert (v.answer, v.kept, v.count, v.total) == ("paris", True, 2, 3)
    assert v.counts == {"chosen:2": 1, "by:all": 1}
    assert not usc_vote(["paris", None], 1, "all").kept


# --- input-perturbation (swap) consistency ---------------------------------------------------


def test_swap_keeps_only_agreeing_orders():
    assert swap_vote(["A"], ["A"]).kept and swap_vote(["A"], ["A"]).answer == "A"
    v = swap_vote(["A"], ["B"])
    assert not v.kept and v.reason == "order_inconsistent"
    assert swap_vote(["C"], ["C"]).kept  # a tie is a tie in both orders
    assert swap_vote([None], ["A"]).reason == "one_order_undecided"
    assert swap_vote([None], [None]).reason == "no_answer"


def test_swap_with_several_samples_votes_each_order_first():
    assert swap_vote(["A", "A", "B"], ["A", "B", "A"]).kept
    assert not swap_vote(["A", "B"], ["A", "A"]).kept  # original order has no majority


def test_swapped_answers_are_mapped_back_by_the_task():
    from s2d_ray.tasks import Pairwise

    task = Pairwise()
    # The judge said B on (B, A): that is A in the original order.
    assert [task.unperturb(x) for x in ("A", "B", "C", None)] == ["B", "A", "C", None]
    values = {"question_text": "q", "response_a": "first", "response_b": "second", "question": "old"}
    swapped = task.perturb(values)
    assert (swapped["response_a"], swapped["response_b"]) == ("second", "first")
    assert swapped["question"].index("second") < swapped["question"].index("first")
    row = {"j_answers": ["A"], "j_swapped_answers": [task.unperturb("B")]}
    assert vote_row(row, "j", FilterConfig(name="swap", samples=1)).kept


# --- adaptive voting -------------------------------------------------------------------------


def test_majority_probability_is_exact():
    assert majority_probability(3, 3) == 15 / 16
    assert majority_probability(0, 0) == 0.5
    assert majority_probability(2, 4) == 0.5  # 2 of 4: symmetric


def test_adaptive_exact_rule_matches_fixed_n():
    assert adaptive_vote(["x"] * 4, 8) is None  # 4 of 8 is not yet a strict majority
    v = adaptive_vote(["x"] * 5, 8)
    assert v.kept and v.answer == "x" and v.total == 5
    # 3 x and 4 y of 8 drawn: one left, nobody can reach 5: decided, dropped.
    assert adaptive_vote(["x"] * 3 + ["y"] * 4, 8) is None  # y could still reach 5
    dropped = adaptive_vote(["x", "y", "z", None, "x", "y"], 8)
    assert dropped is not None and not dropped.kept
    assert adaptive_vote(["x"] * 8, 8).kept  # all drawn: plain majority vote


def test_adaptive_confidence_stops_early_on_easy_inputs():
    assert adaptive_vote(["x"] * 3, 8, confidence=0.9).kept
    assert adaptive_vote(["x"] * 2, 8, confidence=0.9) is None
    assert adaptive_vote(["x", "y", "x"], 8, confidence=0.9) is None
    assert first_round(8, 0.9) == 3 and first_round(8, None) == 5 and first_round(1, None) == 1


def test_window_rule_stops_once_the_last_w_samples_agree():
    assert first_round(8, None, window=3) == 3 and first_round(2, None, window=3) == 2
    v = adaptive_vote(["x"] * 3, 8, window=3)
    assert v.kept and v.answer == "x" and v.total == 3  # 3 samples instead of 5 or more
    assert adaptive_vote(["y", "x", "x"], 8, window=3) is None  # the window is not unanimous yet
    v = adaptive_vote(["y", "x", "x", "x"], 8, window=3)
    assert v.kept and v.answer == "x" and v.count == 3
    assert adaptive_vote([None, None, None], 8, window=3) is None  # agreeing on nothing is no answer
    assert adaptive_vote(["x", "y", "y", "y"], 8, min_agreement=0.8, window=3) is None  # 3 of 4 < 80%


def test_adaptive_voting_never_uses_more_than_n():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 12)
        confidence = rng.choice([None, 0.8, 0.95])
        window = rng.choice([None, 2, 4]) if n >= 4 else None
        answers: list = []
        while adaptive_vote(answers, n, 0.5, confidence, window) is None:
            answers.append(rng.choice(["x", "x", "y", None]))
        assert len(answers) <= n
    with pytest.raises(ValueError):
        adaptive_vote(["x"] * 9, 8)


def test_adaptive_kept_labels_agree_with_fixed_n_on_the_same_samples_without_confidence():
    rng = random.Random(1)
    for _ in range(300):
        samples = [rng.choice(["x", "x", "y", None]) for _ in range(8)]
        k = first_round(8, None)
        while (v := adaptive_vote(samples[:k], 8)) is None:
            k += 1
        full = majority_vote(samples)
        assert v.kept == full.kept and (not v.kept or v.answer == full.answer)


def test_filter_config_checks():
    from pydantic import ValidationError

    for bad in (dict(name="usc", adaptive=True), dict(confidence=0.9), dict(name="usc", samples=1), dict(window=3),
                dict(adaptive=True, samples=4, window=5)):  # fmt: skip
        with pytest.raises(ValidationError):
            FilterConfig(**bad)
