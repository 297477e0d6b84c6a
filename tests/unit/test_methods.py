import pytest

from s2d_ray.methods import METHODS
from s2d_ray.methods import Program, Step, split_items
from s2d_ray.methods.runner import run_program, run_rounds, usc_select
from s2d_ray.tasks import LastLetter


class EchoEngine:
    """Records prompts; answers with a step counter (a stand-in for unit tests only)."""

    def __init__(self):
        self.calls = []

    def generate(self, texts, *, n, temperature, top_p, max_tokens):
        from s2d_ray.engine import Completion

        self.calls.append((texts, n))
        return [[Completion(f"out{len(self.calls)}-{i}", 3) for i in range(n)] for _ in texts]


def test_rar2_runs_step_by_step_batched_across_inputs_and_samples():
    engine = EchoEngine()
    inputs = [{"question": "q1", "format": "F"}, {"question": "q2", "format": "F"}]
    res = run_program(engine, METHODS["rar2"], inputs, samples=3, temperature=0.7, top_p=1.0, max_tokens=8)
    assert len(engine.calls) == 2  # one engine call per step
    assert engine.calls[0][1] == 3 and len(engine.calls[0][0]) == 2
    assert engine.calls[1][1] == 1 and len(engine.calls[1][0]) == 6
    assert "(rephrased) out1-0" in engine.calls[1][0][0] and "q1" in engine.calls[1][0][0]
    assert [len(r) for r in res] == [3, 3]
    assert res[0][0].tokens == {"rephrase": 3, "respond": 3} and res[0][0].final.startswith("out2")


def test_every_method_template_only_uses_known_fields():
    from s2d_ray.tasks import CoinFlip, Pairwise

    for task in (LastLetter(), CoinFlip(), Pairwise()):
        for name, program in METHODS.items():
            if name == "bsm" and task.name != "pairwise":
                with pytest.raises(ValueError, match="bsm is for a pairwise judge task"):
                    program.check_templates(task.template_fields)
                continue
            program.with_prompts(task.method_prompts.get(name, {})).check_templates(task.template_fields)


def test_split_items_reads_numbered_and_bulleted_lists():
    assert split_items("Criteria:\n1. accuracy\n2) clarity\n- depth\n", 5) == ["accuracy", "clarity", "depth"]
    assert split_items("\n".join(f"{i}. c{i}" for i in range(1, 9)), 5) == [f"c{i}" for i in range(1, 6)]
    assert split_items("just prose", 5) == ["just prose"] and split_items("", 5) == ["(none)"]


class ListEngine(EchoEngine):
    """Answers the branch step with a list of three criteria."""

    def generate(self, texts, *, n, temperature, top_p, max_tokens):
        from s2d_ray.engine import Completion

        self.calls.append((texts, n))
        if len(self.calls) == 1:
            return [[Completion("1. accuracy\n2. clarity\n3. depth", 9) for _ in range(n)] for _ in texts]
        return [[Completion(f"out{len(self.calls)}-{k}", 2) for k in range(n)] for k, _ in enumerate(texts)]


def test_bsm_solves_once_per_criterion_in_one_batched_call():
    engine = ListEngine()
    values = {"question": "Q", "format": "F", "question_text": "Q", "response_a": "RA", "response_b": "RB"}
    res = run_program(engine, METHODS["bsm"], [values], samples=2, temperature=0.7, top_p=1.0, max_tokens=8)
    assert len(engine.calls) == 3  # branch, solve (fanned out), merge
    solve_prompts = engine.calls[1][0]
    assert len(solve_prompts) == 2 * 3 and "Criterion: clarity" in solve_prompts[1]
    sample = res[0][0]
    assert sample.tokens == {"branch": 9, "solve": 6, "merge": 2}
    assert sample.values["solve"].startswith("1. accuracy\n") and "3. depth" in sample.values["solve"]
    assert "1. accuracy" in engine.calls[2][0][0]  # merge sees every criterion's evaluation


def test_fan_out_must_follow_an_earlier_step():
    bad = Program("x", "", (Step("solve", "{item}", over="branch"),))
    with pytest.raises(ValueError, match="not an earlier step"):
        bad.check_templates({"question"})


def test_adaptive_rounds_stop_decided_inputs_and_never_exceed_n():
    engine = EchoEngine()
    inputs = [{"question": "easy", "format": ""}, {"question": "hard", "format": ""}]
    decided = lambda samples: samples[0].values["question"] == "easy"  # noqa: E731
    res = run_rounds(engine, METHODS["system1"], inputs, n_max=7, first=3, round_size=3, decided=decided,
                     temperature=0.7, top_p=1.0, max_tokens=8)  # fmt: skip
    assert [len(r) for r in res] == [3, 7]  # hard: 3 + 3 + 1, never more than N
    assert [n for _, n in engine.calls] == [3, 3, 1] and len(engine.calls[1][0]) == 1


class UscEngine(EchoEngine):
    def __init__(self, reply, prompt_len=10):
        super().__init__()
        self.reply, self.prompt_len = reply, prompt_len

    def prompt_tokens(self, text):
        return self.prompt_len * text.count("Response ")

    def generate(self, texts, *, n, temperature, top_p, max_tokens):
        from s2d_ray.engine import Completion

        self.calls.append((texts, n))
        return [[Completion(self.reply, 5)] for _ in texts]


def _samples(k):
    from s2d_ray.methods.runner import Sample

    return [Sample({}, {"answer": 1}, f"answer {i}") for i in range(k)]


def test_usc_select_asks_once_for_all_inputs_and_records_fallbacks():
    engine = UscEngine("The most consistent response is Response 2")
    chosen = usc_select(engine, ["a", "b"], ["Q1", "Q2"], [_samples(3), _samples(1)], max_tokens=8, max_model_len=1000)
    assert [(c.index, c.how, c.tokens) for c in chosen] == [(1, "all", 5), (0, "single", 0)]
    assert len(engine.calls) == 1 and len(engine.calls[0][0]) == 1
    # 20 responses do not fit 150 tokens, the first 10 do (10 x 10 + the instruction's mention).
    tight = UscEngine("Response 4", prompt_len=10)
    chosen = usc_select(tight, ["a"], ["Q"], [_samples(20)], max_tokens=8, max_model_len=150)
    assert (chosen[0].index, chosen[0].how) == (3, "first_10")
    none_fit = UscEngine("Response 4", prompt_len=100)
    chosen = usc_select(none_fit, ["a"], ["Q"], [_samples(20)], max_tokens=8, max_model_len=150)
    assert chosen[0].how == "random" and none_fit.calls == []


def test_unknown_placeholder_is_reported():
    bad = METHODS["rar2"].with_prompts({"respond": "{question} {nothing}"})
    with pytest.raises(ValueError, match=r"unknown placeholder \{nothing\}"):
        bad.check_templates({"question"})
    later = METHODS["rar2"].with_prompts({"rephrase": "{respond}"})
    with pytest.raises(ValueError, match="unknown placeholder"):
        later.check_templates({"question"})


class ShortContextEngine(EchoEngine):
    """Refuses prompts longer than `limit` characters, as Engine.generate does for prompts
    that do not fit max_model_len: an error per prompt, never for the whole call."""

    def __init__(self, limit: int, long_reply: str = ""):
        super().__init__()
        self.limit, self.long_reply = limit, long_reply

    def generate(self, texts, *, n, temperature, top_p, max_tokens):
        from s2d_ray.engine import Completion

        self.calls.append((texts, n))
        return [
            [Completion("", 0, f"prompt of {len(t)} tokens does not fit engine.max_model_len {self.limit}")] * n
            if len(t) > self.limit else [Completion(self.long_reply or f"out{len(self.calls)}-{i}", 3) for i in range(n)]
            for t in texts
        ]  # fmt: skip


def test_an_input_too_long_for_the_context_fails_alone():
    import json

    import pandas as pd

    from s2d_ray.generation import Pass, run_batch, vote_batch
    from s2d_ray.config import FilterConfig

    task = LastLetter(words_per_example=2)
    short, long_ = task.examples("train")[:2]
    long_question = long_.question + " pad" * 400
    batch = pd.DataFrame({
        "id": [short.id, long_.id], "input": [short.question, long_question], "answer": [short.answer, long_.answer],
        "fields": [json.dumps(short.fields), json.dumps(long_.fields)],
    })  # fmt: skip
    engine = ShortContextEngine(limit=1200)
    p = Pass("system2", METHODS["rar2"], 2, 0.7, 1.0, 8)
    out = run_batch(engine, task, [p], batch, max_model_len=2048)
    assert not isinstance(out["system2_failure"].tolist()[0], str) and out["system2_failed_samples"].tolist() == [0, 2]
    assert out["system2_failure"].tolist()[1].startswith("rephrase: prompt of ")
    assert out["system2_tokens_respond"].tolist()[1] == 0  # a failed sample takes no further step
    voted = vote_batch(out, "system2", FilterConfig(samples=2), task)
    assert voted["vote_reason"].tolist()[1] == "failed" and not voted["kept"].tolist()[1]
    assert voted["vote_reason"].tolist()[0] != "failed"


def test_a_step_two_prompt_grown_by_step_one_fails_that_sample_only():
    engine = ShortContextEngine(limit=900, long_reply="x" * 1000)  # step 1's output makes step 2 too long
    inputs = [{"question": "q1", "format": "F"}]
    (samples,) = run_program(engine, METHODS["rar2"], inputs, samples=2, temperature=0.7, top_p=1.0, max_tokens=8)
    assert all(s.error and s.error.startswith("respond: prompt of ") for s in samples)
    assert all(s.final == "" and s.tokens == {"rephrase": 3, "respond": 0} for s in samples)
