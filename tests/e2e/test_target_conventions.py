"""The whole pipeline on a model folder with Llama-2-chat's conventions (its tokenizer adds
BOS *and* its chat template writes `bos_token`; context 4096), checked at the libraries'
boundary: what vLLM's engines are handed and what the DeepSpeed ranks train on. The
conventions sit on the tiny random-weight Llama (the embedded vocabulary): what is checked
is token ids, not answers, and its engine and ranks start and step in a fraction of the
embedded model's time.

The run streams (train.streaming): the ranks train on the voted rows while the engine
produces them, so the same run also proves that streaming keeps the run-directory
contract. The sequential mode is not instrumented here: it tokenizes through the same
`training.data.tokenized` and `encode` (on this fixture: tests/unit/test_preflight.py,
test_training_masks_exactly_the_ids_the_engines_are_handed) and runs whole in the shared
`pipeline_run` (tests/e2e/test_pipeline.py)."""

import json

import pyarrow.parquet as pq
import pytest
import yaml

from s2d_ray.training import IGNORE
from tests.conftest import ROOT, s2d
from tests.fixtures.models import make_model

pytestmark = pytest.mark.e2e

BOS = 1  # the fixtures keep SmolLM2's vocabulary: its BOS, <|im_start|>, plays Llama-2's <s>


def _records(folder, kind):
    out = []
    for path in sorted(folder.glob(f"{kind}-*.jsonl")):
        out += [json.loads(line) for line in path.read_text().splitlines()]
    return out


@pytest.fixture(scope="module")
def boundary(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("llama2")
    model = make_model("llama2-chat", root / "model", source=tiny_model)
    data = root / "reviews.jsonl"
    lines = (ROOT / "tests/fixtures/data/custom/sentiment.jsonl").read_text().splitlines()
    data.write_text("\n".join(lines[:3] + lines[-3:]) + "\n")
    # The same records in both splits: the same input is trained on and evaluated.
    job = yaml.safe_load((ROOT / "jobs/local/last-letter-rar2.yaml").read_text())
    job.update(
        name="llama2-conventions",
        model={"name": "llama-2-7b-chat-fixture", "path": str(model), "dtype": "float32"},
        task={"name": "custom", "data": {"train": str(data), "test": str(data)}, "prompt_field": "text",
              "answer_field": "label", "regex": r"(\S+)"},  # any output is an answer: random weights answer "]]]]"
        filter={"name": "none", "samples": 1},
        sampling={"temperature": 0.0, "top_p": 1.0, "max_tokens": 16},
    )  # fmt: skip
    job["engine"].update(batch_size=8, kv_cache_gib=1, max_model_len=768)
    # Streaming: 4 logical CPUs, the engine (2) and two trainer workers (1 each) at once.
    job["train"].update(steps=2, epochs=1.0, streaming=True)
    job["ray"] = {**job.get("ray", {}), "num_cpus": 4}
    job["eval"].update(max_tokens=12)
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    hook = root / "boundary"
    hook.mkdir()
    import os

    env = {**os.environ, "S2D_TEST_BOUNDARY": str(hook)}
    s2d("run", str(path), "--out", str(root / "run"), env=env)
    return _records(hook, "engine"), _records(hook, "train"), root / "run"


def test_every_prompt_vllm_is_handed_starts_with_exactly_one_bos(boundary):
    engine, _, _ = boundary
    assert len(engine) >= 6 * 2 + 6 * 3  # generation (2 steps) and System 1, System 2, distilled evaluation
    doubled = [r["ids"][:4] for r in engine if r["ids"][:2] == [BOS, BOS]]
    assert not doubled, doubled
    assert all(r["ids"][0] == BOS for r in engine)


def test_training_prompts_are_the_evaluated_prompts_token_for_token(boundary):
    engine, train, run = boundary
    assert train, "no training row reached a DeepSpeed rank"
    handed = {tuple(r["ids"]) for r in engine}
    for step in train:
        for ids, labels in step["rows"]:
            prompt = ids[: labels.index(next(x for x in labels if x != IGNORE))]
            assert prompt[0] == BOS and prompt[1] != BOS, prompt[:4]
            # The same input's System 1 prompt as the engines got it (base evaluation in the
            # generation stage and the distilled model's evaluation): the same ids.
            assert tuple(prompt) in handed, prompt
    eval_json = json.loads((run / "eval.json").read_text())
    assert {"system1", "system2", "distilled"} <= set(eval_json)
    # The distilled model carries the chat template it was trained with.
    config = json.loads((run / "model" / "tokenizer_config.json").read_text())
    template = config.get("chat_template") or (run / "model" / "chat_template.jinja").read_text()
    assert "[INST]" in template


def test_a_streaming_run_trains_on_the_stream_and_keeps_the_run_directory_contract(boundary):
    _, _, run = boundary
    ids = pq.read_table(run / "generate", columns=["id"]).column("id").to_pylist()
    assert len(ids) == 6 == len(set(ids))
    distill = pq.read_table(run / "distill").to_pylist()
    info = json.loads((run / "run.json").read_text())
    assert info["stages"]["generate"]["streaming"] is True and info["stages"]["generate"]["kept"] == len(distill)
    train = info["stages"]["train"]
    assert train["streaming"] is True and 1 <= train["steps"] <= 2 and len(distill) >= 2
    assert list((run / "model").glob("*.safetensors"))
    ev = json.loads((run / "eval.json").read_text())
    assert ev["distilled"]["n"] == 6 and "estimate" in info
