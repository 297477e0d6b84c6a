import pytest

from s2d_ray.methods import METHODS
from s2d_ray.methods import Program, Step, split_items
from s2d_ray.methods.dataflow import PassRun, run_pass
from s2d_ray.tasks import LastLetter

SAMPLING = dict(temperature=0.7, top_p=1.0, max_tokens=8)


def one_pass(program, samples, *, first=None, round_size=1, decided=None, usc=None) -> PassRun:
    return PassRun(program, samples, SAMPLING, first or samples, round_size, decided, usc)


class FakeEngine:
    """Request-level stand-in for unit tests only (Engine's submit/step interface): each
    step finishes the `per_step` oldest requests (all by default) with `reply(prompt, n)`,
    n counting replies from 1. Prompts longer than `limit` characters are refused at
    submit, as Engine.submit refuses prompts that do not fit max_model_len."""

    def __init__(self, reply=None, per_step=None, limit=None, prompt_len=10):
        self.reply = reply or (lambda prompt, n: (f"out{n}", 3))
        self.per_step, self.limit, self.prompt_len = per_step, limit, prompt_len
        self.queue: list[tuple[str, str]] = []
        self.events: list[tuple[str, str]] = []  # ("submit" | "done", prompt), in order
        self.replies = 0

    def encode(self, text):
        return text

    def encode_many(self, texts):
        return list(texts)

    @staticmethod
    def sampling(**kw):
        return kw

    def prompt_tokens(self, text):
        return self.prompt_len * text.count("Response ")

    def submit(self, prompt, params, on_text=None):
        if self.limit is not None and len(prompt) > self.limit:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit engine.max_model_len {self.limit}")
        rid = f"r{len(self.events)}"
        self.queue.append((rid, prompt))
        self.events.append(("submit", prompt))
        return rid

    def step(self):
        from s2d_ray.engine import Completion

        done, self.queue = self.queue[: self.per_step], self.queue[self.per_step :] if self.per_step else []
        out = []
        for rid, prompt in done:
            self.replies += 1
            self.events.append(("done", prompt))
            text, tokens = self.reply(prompt, self.replies)
            out.append((rid, [Completion(text, tokens)]))
        return out

    def submitted(self) -> list[str]:
        return [p for kind, p in self.events if kind == "submit"]


def test_rar2_runs_every_sample_through_both_steps():
    engine = FakeEngine()
    inputs = [{"question": "q1", "format": "F"}, {"question": "q2", "format": "F"}]
    res, chosen = run_pass(engine, one_pass(METHODS["rar2"], 3), inputs)
    prompts = engine.submitted()
    assert len(prompts) == 2 * 3 * 2 and chosen == [None, None]  # one request per sample and step
    respond = [p for p in prompts if "(rephrased)" in p]
    assert len(respond) == 6 and all("q1" in p or "q2" in p for p in respond)
    assert [len(r) for r in res] == [3, 3]
    assert res[0][0].tokens == {"rephrase": 3, "respond": 3} and res[0][0].final.startswith("out")
    assert res[0][0].values["respond"] == res[0][0].final


def test_a_sample_takes_its_next_step_as_soon_as_its_previous_one_is_back():
    engine = FakeEngine(per_step=1)  # the engine finishes one request at a time
    inputs = [{"question": "q1", "format": "F"}]
    run_pass(engine, one_pass(METHODS["rar2"], 3), inputs)
    kinds = [(kind, "(rephrased)" in p) for kind, p in engine.events]
    first_step2 = kinds.index(("submit", True))
    last_step1_done = max(i for i, k in enumerate(kinds) if k == ("done", False))
    assert first_step2 < last_step1_done  # no barrier: sample 1's step 2 runs beside samples 2-3's step 1


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


def test_bsm_solves_once_per_criterion_and_merges_in_order():
    def reply(prompt, n):
        if "Criterion:" in prompt:
            return f"solved{n}", 2
        if "1. accuracy" in prompt:  # the merge step sees every criterion's evaluation
            return "merged", 2
        return "1. accuracy\n2. clarity\n3. depth", 9

    engine = FakeEngine(reply)
    values = {"question": "Q", "format": "F", "question_text": "Q", "response_a": "RA", "response_b": "RB"}
    res, _ = run_pass(engine, one_pass(METHODS["bsm"], 2), [values])
    solve_prompts = [p for p in engine.submitted() if "Criterion:" in p]
    assert len(solve_prompts) == 2 * 3 and any("Criterion: clarity" in p for p in solve_prompts)
    sample = res[0][0]
    assert sample.tokens == {"branch": 9, "solve": 6, "merge": 2} and sample.final == "merged"
    assert sample.values["solve"].startswith("1. accuracy\n") and "3. depth" in sample.values["solve"]


def test_fan_out_must_follow_an_earlier_step():
    bad = Program("x", "", (Step("solve", "{item}", over="branch"),))
    with pytest.raises(ValueError, match="not an earlier step"):
        bad.check_templates({"question"})


def test_adaptive_rounds_stop_decided_inputs_and_never_exceed_n():
    engine = FakeEngine()
    inputs = [{"question": "easy", "format": ""}, {"question": "hard", "format": ""}]
    decided = lambda samples, values: values["question"] == "easy"  # noqa: E731
    res, _ = run_pass(engine, one_pass(METHODS["system1"], 7, first=3, round_size=3, decided=decided), inputs)
    assert [len(r) for r in res] == [3, 7]  # hard: 3 + 3 + 1, never more than N
    assert sum("easy" in p for p in engine.submitted()) == 3 and sum("hard" in p for p in engine.submitted()) == 7


def test_usc_asks_once_per_input_and_records_fallbacks():
    def answers(choice):
        return lambda prompt, n: (choice, 5) if "most consistent" in prompt else (f"answer {n}", 1)

    usc = (8, 1000, 10)  # max_tokens, max_model_len, fallback_shown
    engine = FakeEngine(answers("The most consistent response is Response 2"))
    inputs = [{"question": "Q1", "format": ""}]
    (samples,), (chosen,) = run_pass(engine, one_pass(METHODS["system1"], 3, usc=usc), inputs)
    assert (chosen.index, chosen.how, chosen.tokens) == (1, "all", 5) and len(samples) == 3
    assert sum("most consistent" in p for p in engine.submitted()) == 1
    _, (single,) = run_pass(FakeEngine(answers("x")), one_pass(METHODS["system1"], 1, usc=usc), inputs)
    assert (single.index, single.how, single.tokens) == (0, "single", 0)
    # 20 responses do not fit 150 tokens, the first 10 do (10 x 10 + the instruction's mention).
    tight = FakeEngine(answers("Response 4"), prompt_len=10)
    _, (chosen,) = run_pass(tight, one_pass(METHODS["system1"], 20, usc=(8, 150, 10)), inputs)
    assert (chosen.index, chosen.how) == (3, "first_10")
    none_fit = FakeEngine(answers("Response 4"), prompt_len=100)
    _, (chosen,) = run_pass(none_fit, one_pass(METHODS["system1"], 20, usc=(8, 150, 10)), inputs)
    assert chosen.how == "random" and not any("most consistent" in p for p in none_fit.submitted())


def test_unknown_placeholder_is_reported():
    bad = METHODS["rar2"].with_prompts({"respond": "{question} {nothing}"})
    with pytest.raises(ValueError, match=r"unknown placeholder \{nothing\}"):
        bad.check_templates({"question"})
    later = METHODS["rar2"].with_prompts({"rephrase": "{respond}"})
    with pytest.raises(ValueError, match="unknown placeholder"):
        later.check_templates({"question"})


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
    engine = FakeEngine(limit=1200)
    p = Pass("system2", METHODS["rar2"], 2, 0.7, 1.0, 8)
    out = run_batch(engine, task, [p], batch, max_model_len=2048)
    assert not isinstance(out["system2_failure"].tolist()[0], str) and out["system2_failed_samples"].tolist() == [0, 2]
    assert out["system2_failure"].tolist()[1].startswith("rephrase: prompt of ")
    assert out["system2_tokens_respond"].tolist()[1] == 0  # a failed sample takes no further step
    voted = vote_batch(out, "system2", FilterConfig(samples=2), task)
    assert voted["vote_reason"].tolist()[1] == "failed" and not voted["kept"].tolist()[1]
    assert voted["vote_reason"].tolist()[0] != "failed"


def test_a_step_two_prompt_grown_by_step_one_fails_that_sample_only():
    engine = FakeEngine(lambda prompt, n: ("x" * 1000, 3), limit=900)  # step 1's output makes step 2 too long
    (samples,), _ = run_pass(engine, one_pass(METHODS["rar2"], 2), [{"question": "q1", "format": "F"}])
    assert all(s.error and s.error.startswith("respond: prompt of ") for s in samples)
    assert all(s.final == "" and s.tokens == {"rephrase": 3, "respond": 0} for s in samples)


def test_batches_sharing_an_engine_split_its_time_and_fail_alone(monkeypatch):
    import itertools

    from s2d_ray.methods import dataflow
    from s2d_ray.methods.dataflow import BatchRun, Flow

    clock = itertools.count()  # each perf_counter() call: one second later
    monkeypatch.setattr(dataflow.time, "perf_counter", lambda: float(next(clock)))
    engine = FakeEngine(per_step=2)
    flow = Flow(engine)
    inputs = [{"question": f"q{i}", "format": "F"} for i in range(3)]

    def broken(samples, values):
        raise KeyError("a bug in a continuation")

    good = BatchRun(flow, [(one_pass(METHODS["rar2"], 2), inputs, ["a", "b", "c"]),
                           (one_pass(METHODS["system1"], 1), inputs, ["a", "b", "c"])])  # fmt: skip
    bad = BatchRun(flow, [(one_pass(METHODS["system1"], 3, first=1, decided=broken), inputs, ["a", "b", "c"])])
    flow.add(good)
    flow.add(bad)
    turns = 0
    while not (good.done.is_set() and bad.done.is_set()):
        flow.turn()
        turns += 1
    with pytest.raises(KeyError):
        bad.result()
    good.result()  # unharmed by the other batch's error
    assert [len(s) for s in good.outputs(0)[0]] == [2, 2, 2]
    shares = [good.outputs(0)[2], good.outputs(1)[2], bad.busy[0]]
    assert all(s > 0 for s in shares) and sum(shares) == pytest.approx(turns)  # every turn's second, once
