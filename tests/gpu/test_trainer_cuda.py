"""The trainer on CUDA: ZeRO-3 in bf16 with gradient checkpointing, optimizer offload off
and on, the streamed export, and a reload in plain transformers whose logits match the
trainer's on the same batch. One rank per GPU, two when the node has two."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.gpu.conftest import GPUS, needs_cuda
from tests.zero3_run import reload_and_compare

pytestmark = needs_cuda


@pytest.mark.parametrize("offload", [False, True], ids=["no-offload", "cpu-adam-offload"])
def test_zero3_bf16_trains_exports_and_reloads_on_cuda(tmp_path, offload):
    world = min(GPUS, 2)
    flags = ["--device", "cuda", "--world", str(world), "--bf16", "--checkpointing"] + (["--offload"] if offload else [])
    proc = subprocess.run(
        [sys.executable, "-m", "tests.zero3_run", str(tmp_path), *flags], cwd=ROOT, capture_output=True, text=True,
        timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads((tmp_path / "train.json").read_text())
    assert info["device"].startswith("cuda") and info["world"] == world
    assert all(loss == loss and loss > 0 for loss in info["losses"])
    result = reload_and_compare(tmp_path, device="cuda")
    assert result["missing"] == [] and result["unexpected"] == []
    assert result["dtype"] == "torch.bfloat16"
    assert result["max_abs_diff"] <= 2e-2 * max(1.0, result["logit_scale"]), result
