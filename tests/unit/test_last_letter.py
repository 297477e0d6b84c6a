import pytest

from s2d_ray.tasks import LastLetter
from s2d_ray.tasks.last_letter import shipped_words


def test_extracts_the_answer_after_the_marker():
    t = LastLetter()
    assert t.extract("The last letters are e and a.\nAnswer: ea") == "ea"
    assert t.extract('So the answer is "EA".') == "ea"
    assert t.extract("Answer: ab\n... wait, Answer: cd") == "cd"
    assert t.extract("**Answer:** xy") == "xy"
    assert t.extract('The answer is: "kp".') == "kp"


def test_a_lone_word_is_an_answer_but_prose_is_not():
    t = LastLetter()
    assert t.extract("  ea. ") == "ea"
    assert t.extract("I think it is e then a") is None
    assert t.extract("") is None


def test_gold_and_target():
    t = LastLetter(train=3, validation=0, test=0)
    for e in t.examples("train"):
        words = e.fields["words"].split()
        assert e.answer == "".join(w[-1] for w in words)
        assert e.fields["words"] in e.question
        assert t.extract(t.target(e.answer)) == e.answer


def test_synthesis_is_deterministic_and_seeded():
    a = LastLetter(seed=1).examples("test")
    assert a == LastLetter(seed=1).examples("test")
    assert a != LastLetter(seed=2).examples("test")


def test_splits_are_disjoint_and_independent_of_other_split_sizes():
    t = LastLetter(train=200, validation=200, test=200)
    ids = {s: {e.id for e in t.examples(s)} for s in ("train", "validation", "test")}
    assert all(len(v) == 200 for v in ids.values())
    assert not (ids["train"] & ids["test"]) and not (ids["train"] & ids["validation"])
    assert [e.id for e in LastLetter(train=5).examples("test")] == [e.id for e in t.examples("test")]


def test_words_per_example_and_vocabulary():
    t = LastLetter(words_per_example=4, vocabulary=1200, train=10)
    assert all(len(e.fields["words"].split()) == 4 for e in t.examples("train"))
    assert len(t.vocabulary_words()) == 1200
    assert len(set(shipped_words())) >= 1200


def test_too_many_examples_for_the_vocabulary_is_an_error():
    with pytest.raises(ValueError, match="at most"):
        LastLetter(words_per_example=1, vocabulary=20, train=50)
