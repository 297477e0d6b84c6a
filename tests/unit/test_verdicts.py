"""Well-formed answers, paired verdicts, the distillation set's diversity and the break-even."""

import json
from pathlib import Path

import pandas as pd
import pytest

from s2d_ray.config import FilterConfig
from s2d_ray.evaluation import binomial_above, break_even, distillability, mcnemar, paired_tests
from s2d_ray.generation import Pass, diversity, run_batch, vote_batch
from s2d_ray.methods import METHODS
from s2d_ray.tasks import CoinFlip, LastLetter, Pairwise, TriviaQA
from tests.unit.test_methods import FakeEngine

ROOT = Path(__file__).resolve().parents[2]

# --- well-formed answers ---------------------------------------------------------------------


def test_last_letter_answers_have_one_letter_per_word():
    task = LastLetter(words_per_example=2)
    words = {"words": "apple banana"}
    assert task.malformed("ea", words) is None
    assert task.malformed("answer", words) == "6 letters for 2 words"  # the prompt's echo
    assert task.malformed("the", words) == "3 letters for 2 words"
    assert task.malformed("eaa", {"words": "apple banana kiwi"}) is None


def test_trivia_answers_are_short_and_not_the_question_or_the_template():
    task = TriviaQA(data={"test": "unused.jsonl"})
    values = {"question_text": "Which city hosted the 1992 Olympics?"}
    assert task.malformed("barcelona", values) is None
    assert task.malformed("answer", values) == "words of the answer-format instruction"
    assert task.malformed("give answer only", values) == "words of the answer-format instruction"
    assert task.malformed("which city hosted 1992 olympics", values) == "the question itself"
    assert task.malformed(" ".join(["word"] * 13), values).startswith("13 words")


def test_closed_tasks_have_their_answer_space_and_no_malformed_answer():
    assert CoinFlip().answer_space() == 2 and CoinFlip().malformed("yes", {}) is None
    assert Pairwise(data={"test": "unused.jsonl"}).answer_space() == 3
    assert LastLetter().answer_space() is None


def test_an_echoed_template_word_is_dropped_before_the_vote():
    # Every sample of input 0 echoes "Answer: answer": consistent, and not an answer. Input
    # 1's samples answer with two letters. Only input 1 reaches the distillation set.
    task = LastLetter(words_per_example=2)
    a, b = task.examples("train")[:2]
    batch = pd.DataFrame({"id": [a.id, b.id], "input": [a.question, b.question], "answer": [a.answer, b.answer],
                          "fields": [json.dumps(a.fields), json.dumps(b.fields)]})  # fmt: skip
    reply = lambda prompt, n: ("Answer: answer" if a.fields["words"] in prompt else f"Answer: {b.answer}", 3)  # noqa: E731
    out = run_batch(FakeEngine(reply), task, [Pass("system2", METHODS["system1"], 4, 0.7, 1.0, 8)], batch, 2048)
    assert out["system2_answers"].tolist()[0] == [None] * 4
    assert out["system2_dropped"].tolist()[0] == ['malformed "answer": 6 letters for 2 words'] * 4
    assert out["system2_answers"].tolist()[1] == [b.answer] * 4 and out["system2_dropped"].tolist()[1] == [None] * 4
    voted = vote_batch(out, "system2", FilterConfig(samples=4), task)
    assert voted["kept"].tolist() == [False, True] and voted["vote_reason"].tolist()[0] == "no_answer"


def test_a_set_dominated_by_one_target_is_flagged_against_the_answer_space():
    assert diversity(["Answer: the"] * 6 + ["Answer: ab"] * 4, None)["dominated"]  # 60% of an open space
    assert not diversity(["Answer: ab", "Answer: cd", "Answer: ab", "Answer: ef"], None)["dominated"]
    coin = ["Answer: yes"] * 7 + ["Answer: no"] * 3
    assert not diversity(coin, 2)["dominated"] and diversity(coin * 1 + ["Answer: yes"] * 10, 2)["dominated"]
    assert diversity([], None) is None


# --- paired verdicts ---------------------------------------------------------------------------


def _scores(n_both: int, only_a: int, only_b: int, neither: int) -> tuple[list[bool], list[bool]]:
    a = [True] * n_both + [True] * only_a + [False] * only_b + [False] * neither
    b = [True] * n_both + [False] * only_a + [True] * only_b + [False] * neither
    return a, b


def test_mcnemar_counts_only_the_inputs_where_the_systems_disagree():
    a, b = _scores(20, 8, 0, 12)
    t = mcnemar(a, b)
    assert (t["only_a"], t["only_b"]) == (8, 0) and t["p"] == pytest.approx(2 / 2**8)
    assert mcnemar(*_scores(20, 4, 4, 12))["p"] == 1.0
    with pytest.raises(ValueError):
        mcnemar([True], [True, False])


def _verdict(s1, s2, d) -> dict:
    results = {k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in (("system1", s1), ("system2", s2), ("distilled", d))}
    return distillability(results, paired_tests({"system1": s1, "system2": s2, "distilled": d}))


def test_a_small_gain_on_the_same_inputs_is_not_called_help():
    # Distilled 3 points above System 1 on 32 inputs (1 input flipped): the old rule of
    # thumb called this "beat system 1, within noise"; the paired test says no difference.
    s1 = [True] * 12 + [False] * 20
    d = [True] * 13 + [False] * 19
    s2 = [True] * 20 + [False] * 12
    v = _verdict(s1, s2, d)
    assert v["verdict"] == "did not help" and "McNemar" in v["text"] and "p=" in v["text"]


def test_a_significant_gain_that_matches_system_2_closes_the_gap():
    s1 = [False] * 20 + [True] * 20
    s2 = [True] * 36 + [False] * 4
    d = [True] * 35 + [False] * 5
    assert _verdict(s1, s2, d)["verdict"] == "closed the gap"
    worse_than_s2 = [False] * 6 + [True] * 34  # 14 inputs above System 1, 6 below System 2
    assert _verdict(s1, [True] * 40, worse_than_s2)["verdict"] == "partly closed the gap"
    assert _verdict([True] * 30 + [False] * 10, s2, [False] * 40)["verdict"] == "hurt"


def test_binomial_tail_is_exact_and_stable_at_paper_sizes():
    assert binomial_above(2, 2, 0.5) == pytest.approx(0.25)
    assert binomial_above(0, 10, 0.3) == pytest.approx(1.0)
    assert binomial_above(900, 1330, 0.5) < 1e-30  # no overflow at the coin-flip test split's size


# --- break-even --------------------------------------------------------------------------------


def test_break_even_divides_the_distillation_device_time_by_the_saving_per_answer():
    results = {"system1": {"seconds": 10.0, "n": 100, "mean_generated_tokens": 5.0},
               "system2": {"seconds": 370.0, "n": 100, "mean_generated_tokens": 130.0},
               "distilled": {"seconds": 10.0, "n": 100, "mean_generated_tokens": 4.0}}  # fmt: skip
    be = break_even(results, distill_device_hours=0.01, devices=1, price=3600.0, currency="USD")  # 1 USD a device-second
    assert be["requests"] == 10 and be["status"] == "pays"  # 36 s / (3.7 s - 0.1 s)
    assert be["cost_per_1000"]["system2"] == pytest.approx(3700.0) and be["cost_per_1000"]["distilled"] == pytest.approx(100.0)
    assert break_even(results, 0.01, 2, 0.0, "USD")["requests"] == 5  # no price needed; 2 devices per engine
    results["distilled"]["seconds"] = 400.0
    assert break_even(results, 0.01, 1, 3600.0, "USD")["status"] == "never"
    assert break_even({"system1": results["system1"]}, 0.01, 1, 1.0, "USD") is None


# --- no harm -----------------------------------------------------------------------------------


def _rows(ids: list[str], golds: list[str], **answers: list[str]):
    import pyarrow as pa

    cols = {"id": ids, "answer": golds}
    for label, values in answers.items():
        cols |= {f"{label}_answers": [[v] for v in values], f"{label}_tokens": [3] * len(ids), f"{label}_seconds": [0.1] * len(ids),
                 f"{label}_tokens_answer": [3] * len(ids)}  # fmt: skip
    return pa.table(cols)


def test_no_harm_pairs_each_system_of_the_distilled_model_with_the_base_model():
    from s2d_ray.evaluation import no_harm

    task = CoinFlip()
    ids, golds = [f"t{i}" for i in range(20)], ["yes"] * 20
    base = _rows(ids, golds, system1=["yes"] * 16 + ["no"] * 4, system2=["yes"] * 10 + ["no"] * 10)
    same = _rows(ids, golds, system1=["yes"] * 15 + ["no"] * 5, system2=["yes"] * 11 + ["no"] * 9)
    entry = no_harm(task, "rar2", base, same)
    assert entry["regressed"] is False and "no significant harm" in entry["text"] and "serve both modes" in entry["text"]
    assert entry["base"]["system1"]["accuracy"] == 0.8 and entry["distilled"]["system1"]["accuracy"] == 0.75
    broken = _rows(ids, golds, system1=["no"] * 20, system2=["no"] * 20)
    entry = no_harm(task, "rar2", base, broken)
    assert entry["regressed"] is True and entry["tests"]["system1"]["only_b"] == 16
    assert no_harm(task, None, base, None)["regressed"] is None


def test_no_harm_settings_are_checked_with_one_line(tmp_path):
    from s2d_ray.config import load_config
    from s2d_ray.errors import ConfigError

    job = tmp_path / "job.yaml"
    job.write_text("task: {name: last_letter}\neval:\n  no_harm:\n    - {task: {name: coin_flip}, method: rar2}\n")
    (nh,) = load_config(job).eval.no_harm
    assert nh.label == "coin_flip" and nh.method == "rar2"
    for text, message in (
        ("    - {task: {name: coin_flip}, method: nope}\n", "unknown method 'nope'"),
        ("    - {task: {name: coin_flip}}\n    - {task: {name: coin_flip}}\n", "two no-harm tasks labelled 'coin_flip'"),
        ("    - {task: {name: coin_flip}, label: 'a b'}\n", "label"),
    ):
        job.write_text("task: {name: last_letter}\neval:\n  no_harm:\n" + text)
        with pytest.raises(ConfigError) as err:
            load_config(job)
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


# --- pipelines -------------------------------------------------------------------------------


def test_a_pipeline_job_gives_each_task_its_method_and_filter():
    from s2d_ray.config import load_config
    from s2d_ray.estimate import estimate

    cfg = load_config(ROOT / "jobs" / "local" / "pipeline.yaml")
    entries = cfg.entries()
    assert [(label, sub.task.name, sub.method.name, sub.filter.name) for label, sub in entries] == [
        ("trivia", "triviaqa", "s2a", "usc"), ("last_letter", "last_letter", "rar2", "majority"),
        ("coin_flip", "coin_flip", "rar2", "majority")]  # fmt: skip
    assert cfg.task.name == "triviaqa" and cfg.tasks[2].cap == 8  # the top level mirrors the first task
    est = estimate(cfg)["stages"]
    assert est["generate"]["inputs"] == 16 * 3 and est["eval"]["inputs"] == 16 * 3  # summed over the tasks
    paper = load_config(ROOT / "jobs" / "paper" / "pipeline-70b.yaml")
    assert {sub.filter.samples for _, sub in paper.entries()} == {20, 8} and paper.eval.no_harm[0].method == "cot"


@pytest.mark.parametrize("text, message", [
    ("task: {name: coin_flip}\ntasks:\n  - task: {name: last_letter}\n", "give task inside each task"),
    ("tasks:\n  - task: {name: coin_flip}\n  - task: {name: coin_flip}\n", "two tasks labelled 'coin_flip'"),
    ("tasks:\n  - task: {name: coin_flip}\n  - {task: {name: last_letter}, filter: {name: swap}}\n",
     "tasks last_letter: filter swap needs a task with swappable inputs"),
    ("tasks:\n  - task: {name: coin_flip}\ntrain: {streaming: true, steps: 2}\n", "train.streaming trains on one task's stream"),
    ("tasks:\n  - task: {name: coin_flip}\nbudget: {tokens: 1000}\n", "a job with tasks: takes budget.money"),
])  # fmt: skip
def test_bad_pipelines_are_one_clear_line(tmp_path, text, message):
    from s2d_ray.config import load_config
    from s2d_ray.errors import ConfigError

    job = tmp_path / "job.yaml"
    job.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(job)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
