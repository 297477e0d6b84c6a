"""Every method and every filter's generation path on the real vLLM engine and SmolLM2,
at tiny scale: each sample ends in a parsed answer or a recorded parse failure."""


import pandas as pd
import pytest

from s2d_ray.config import parse_config
from s2d_ray.generation import input_rows, run_batch, vote_batch
from s2d_ray.models import resolve_model
from s2d_ray.pipeline import generation_passes
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e
DATA = ROOT / "tests" / "fixtures" / "data"

CASES = {
    "last_letter-rar1": ({"name": "last_letter", "train": 2}, "rar1", {"name": "majority", "samples": 2}),
    "coin_flip-rar2-adaptive": ({"name": "coin_flip", "train": 2}, "rar2",
                                {"name": "majority", "samples": 4, "adaptive": True, "confidence": 0.8}),
    "triviaqa-s2a-usc": ({"name": "triviaqa", "data": {"train": str(DATA / "triviaqa/train.jsonl")}, "limit": {"train": 2}},
                         "s2a", {"name": "usc", "samples": 3}),
    "pairwise-bsm-swap": ({"name": "pairwise", "data": {"train": str(DATA / "pairwise/oasst2-train.jsonl")}, "limit": {"train": 1}},
                          "bsm", {"name": "swap", "samples": 1}),
    "gsm8k-cot": ({"name": "gsm8k", "data": {"train": str(DATA / "gsm8k/train.jsonl")}, "limit": {"train": 2}},
                  "cot", {"name": "none", "samples": 1}),
}  # fmt: skip


@pytest.fixture(scope="module")
def engine():
    from s2d_ray.engine import Engine

    cfg = parse_config({"task": {"name": "last_letter"}, "engine": {"kv_cache_gib": 1, "max_model_len": 2048}})
    eng = Engine(str(resolve_model("smollm2", None)), cfg.engine, dtype="float32", seed=0)
    yield eng
    eng.close()


@pytest.mark.parametrize("case", sorted(CASES))
def test_method_runs_on_the_real_engine(engine, case):
    task, method, filt = CASES[case]
    cfg = parse_config({
        "task": task, "method": {"name": method}, "filter": filt,
        "sampling": {"temperature": 0.7, "max_tokens": 24}, "engine": {"max_model_len": 2048},
    })  # fmt: skip
    program = cfg.program(method)
    passes = generation_passes(cfg, program)
    batch = pd.DataFrame(input_rows(cfg.task.examples("train")))
    out = run_batch(engine, cfg.task, passes, batch, max_model_len=2048)
    voted = vote_batch(out, "system2", cfg.filter, cfg.task)
    for row in voted.to_dict("records"):
        for p in passes:
            outputs, answers = list(row[f"{p.label}_outputs"]), list(row[f"{p.label}_answers"])
            assert 1 <= len(outputs) == len(answers) == row[f"{p.label}_samples"] <= cfg.filter.samples
            assert all(a is None or (isinstance(a, str) and a) for a in answers)  # parsed, or a recorded failure
            assert all(row[f"{p.label}_tokens_{s}"] > 0 for s in program.step_names)
        assert row["kept"] == isinstance(row["target"], str)  # pandas turns None into NaN
        assert row["vote_reason"] in {"kept", "no_answer", "no_majority", "below_min_agreement",
                                      "order_inconsistent", "one_order_undecided"}  # fmt: skip
        if filt["name"] == "usc":
            assert row["system2_selected_how"] in {"all", "first_10", "random", "unparsed"}
            assert 0 <= row["system2_selected"] < filt["samples"]
        if filt["name"] == "swap":
            assert len(row["system2_swapped_answers"]) == 1
