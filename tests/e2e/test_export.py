"""ZeRO-3 training and the streamed export on CPU ranks (real DeepSpeed, no Ray): the
exported checkpoint reloads in plain transformers with no missing or extra weights, and
its logits equal the trainer's on the same batch. tests/gpu/ runs the same on CUDA."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.zero3_run import reload_and_compare

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize(
    "flags, tolerance",
    # One rank: the 2-rank export runs in the learning test under Ray Train. (Two CPU ranks
    # here used to abort now and then inside DeepSpeed's shared-memory comm op, which is no
    # longer loaded: zero3.init_distributed. Not tried again.)
    [([], 1e-5), (["--bf16", "--checkpointing"], 2e-2)],
    ids=["fp32", "bf16-checkpointing"],
)
def test_streamed_export_reloads_with_the_trainers_logits(tmp_path, flags, tolerance):
    proc = subprocess.run(
        [sys.executable, "-m", "tests.zero3_run", str(tmp_path), "--device", "cpu", *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "shm_comm" not in proc.stdout + proc.stderr  # not compiled (~50 s): training never uses it
    model_dir = tmp_path / "model"
    shards = sorted(model_dir.glob("model-*-of-*.safetensors"))
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == [p.name for p in shards]
    assert "lm_head.weight" not in index["weight_map"]  # tied to the embeddings: stored once
    assert not list(model_dir.glob(".shard-*"))  # no temporary names left
    config = json.loads((model_dir / "config.json").read_text())
    assert config["use_cache"] is True and config["dtype"] == ("bfloat16" if "--bf16" in flags else "float32")

    result = reload_and_compare(tmp_path)
    assert result["missing"] == [] and result["unexpected"] == []
    assert result["max_abs_diff"] <= tolerance * max(1.0, result["logit_scale"]), result
    losses = json.loads((tmp_path / "train.json").read_text())["losses"]
    assert all(loss == loss and loss > 0 for loss in losses)  # finite, real steps
