from s2d_ray.config import FilterConfig
from s2d_ray.filters import majority_vote, no_filter
from s2d_ray.generation import vote_row


def test_clear_majority_is_kept():
    v = majority_vote(["ab", "ab", "ab", "cd"])
    assert (v.answer, v.count, v.total, v.kept, v.reason) == ("ab", 3, 4, True, "kept")
    assert v.agreement == 0.75


def test_tie_is_dropped():
    v = majority_vote(["ab", "ab", "cd", "cd"])
    assert not v.kept and v.reason == "no_majority" and v.answer is None


def test_half_is_not_a_strict_majority():
    v = majority_vote(["ab", "ab", "cd", "ef"])
    assert not v.kept and v.reason == "no_majority"


def test_unparseable_samples_count_against_the_winner():
    v = majority_vote(["ab", "ab", None, None, None])
    assert not v.kept and v.total == 5 and v.count == 2


def test_empty_answers_and_no_samples():
    assert majority_vote([None, None, ""]).reason == "no_answer"
    assert majority_vote([]).reason == "no_samples"


def test_all_different():
    v = majority_vote(["a", "b", "c", "d", "e"])
    assert not v.kept and v.reason == "no_majority"


def test_min_agreement_edges():
    answers = ["ab"] * 6 + ["cd"] * 2  # agreement exactly 0.75
    assert majority_vote(answers, 0.75).kept
    v = majority_vote(answers, 0.76)
    assert not v.kept and v.reason == "below_min_agreement" and v.answer == "ab"
    assert majority_vote(["ab"] * 8, 1.0).kept
    assert not majority_vote(["ab"] * 7 + ["cd"], 1.0).kept


def test_single_sample():
    assert majority_vote(["ab"]).kept
    assert not majority_vote([None]).kept


def test_no_filter_keeps_the_first_sample():
    assert no_filter(["x", "y"]).answer == "x" and no_filter(["x", "y"]).kept
    assert not no_filter([None, "y"]).kept
    assert vote_row({"s_answers": ["x", None]}, "s", FilterConfig(name="none", min_agreement=0.9)).kept
