import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
S2D = [sys.executable, "-m", "s2d_ray.cli"]

# Small, fast settings shared by the end-to-end tests (real Ray, vLLM, DeepSpeed, SmolLM2).
TINY = [
    "task.words_per_example=2",
    "engine.batch_size=8",
    "engine.kv_cache_gib=1",
    "engine.max_model_len=768",
    "train.steps=2",
    "eval.max_tokens=24",
    "sampling.max_tokens=32",
]


def s2d(*args, check=True, timeout=1500, env=None, **kw) -> subprocess.CompletedProcess:
    env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [*S2D, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **kw
    )
    if check and proc.returncode != 0:
        out = args[args.index("--out") + 1] if "--out" in args else None
        logs = f"\n--- its log (RUN/logs/) ---\n{newest_log(Path(out), args[0])[-6000:]}" if out else ""
        raise AssertionError(f"s2d {' '.join(args)} exited {proc.returncode}\n{proc.stderr[-4000:]}{logs}")
    return proc


def newest_log(run_dir: Path, command: str, before: int = 0) -> str:
    """What Ray, vLLM and DeepSpeed printed during the latest `s2d COMMAND` on `run_dir`
    (`before`: that many commands earlier)."""
    logs = sorted((run_dir / "logs").glob(f"{command}-*.log"), key=lambda p: p.stat().st_mtime)
    return logs[-1 - before].read_text(errors="replace") if len(logs) > before else ""


def overrides(*settings: str) -> list[str]:
    out = []
    for s in (*TINY, *settings):
        out += ["--set", s]
    return out


@pytest.fixture(scope="session")
def local_job() -> Path:
    return ROOT / "jobs" / "local" / "last-letter-rar2.yaml"


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory, local_job):
    """One `s2d run` through every stage, shared by the tests that read a finished run
    directory (the contract, serving); none of them changes what the run wrote."""
    out = tmp_path_factory.mktemp("run")
    # Near-greedy samples: the 135M model rarely agrees with itself at higher temperatures,
    # and the tests need a non-empty distillation set (voting itself is unit-tested).
    proc = s2d(
        "run", str(local_job), "--out", str(out),
        *overrides("task.train=12", "task.test=6", "filter.samples=3", "sampling.temperature=0.05",
                   "tracking.mlflow=true", f"tracking.uri={out}-mlruns"),
    )  # fmt: skip
    return out, proc
