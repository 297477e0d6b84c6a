"""Proof that training, export and reload work: fine-tuning on correct (prompt -> answer)
pairs makes the distilled model reproduce them, where the base model does not."""

import json

import pyarrow as pa
import pytest

from s2d_ray.config import load_config
from s2d_ray.rundir import RunDir, write_part
from tests.conftest import overrides, s2d

pytestmark = pytest.mark.e2e

PAIRS = 10


def test_training_teaches_the_model_its_targets(tmp_path, local_job):
    cfg = load_config(local_job, ["task.words_per_example=2", f"task.train={PAIRS}"])
    examples = cfg.task.examples("train")
    run = RunDir(tmp_path).create()
    write_part(
        run.distill,
        pa.table(
            {
                "id": [e.id for e in examples],
                "prompt": [e.question for e in examples],
                "target": [cfg.task.target(e.answer) for e in examples],
            }
        ),
    )
    settings = overrides(
        f"task.train={PAIRS}", "train.steps=8", "train.lr=3e-4", "train.micro_batch_size=5",
        "eval.split=train", "eval.system2=false",
    )  # fmt: skip
    s2d("train", str(local_job), "--out", str(tmp_path), *settings)
    s2d("eval", str(local_job), "--out", str(tmp_path), *settings)
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["distilled"]["n"] == PAIRS
    assert ev["system1"]["accuracy"] < 0.10, ev["system1"]
    assert ev["distilled"]["accuracy"] >= 0.90, ev["distilled"]
