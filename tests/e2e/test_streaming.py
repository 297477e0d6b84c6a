"""train.streaming: the trainer consumes the distillation stream while the engine produces it."""

import json

import pyarrow.parquet as pq
import pytest

from tests.conftest import overrides, s2d

pytestmark = pytest.mark.e2e


def test_streaming_run_trains_on_the_stream_and_keeps_the_run_directory_contract(tmp_path, default_job):
    # 4 logical CPUs: the engine (2) and two trainer workers (1 each) at the same time.
    # `make run`'s job: its System 2 answers are well-formed often enough to keep rows.
    s2d("run", str(default_job), "--out", str(tmp_path), *overrides(
        "train.streaming=true", "train.steps=2", "ray.num_cpus=4", "task.limit.train=8", "task.limit.test=4",
        "filter.name=none", "filter.samples=1", "sampling.temperature=0.05", "eval.system2=false", "eval.no_harm=[]",
    ))  # fmt: skip
    ids = pq.read_table(tmp_path / "generate", columns=["id"]).column("id").to_pylist()
    assert len(ids) == 8 == len(set(ids))
    distill = pq.read_table(tmp_path / "distill").to_pylist()
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["stages"]["generate"]["streaming"] is True and info["stages"]["generate"]["kept"] == len(distill)
    train = info["stages"]["train"]
    assert train["streaming"] is True and 1 <= train["steps"] <= 2 and len(distill) >= 2
    assert list((tmp_path / "model").glob("*.safetensors"))
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["distilled"]["n"] == 4 and "estimate" in info
