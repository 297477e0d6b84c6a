import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
S2D = [sys.executable, "-m", "s2d_ray.cli"]

# Small, fast settings shared by the end-to-end tests (real Ray, vLLM, DeepSpeed, SmolLM2).
TINY = [
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


def s2d_here(capsys, *args: str) -> subprocess.CompletedProcess:
    """`s2d ARGS` through its entry point (`main`, as the console script calls it) in this
    process: transformers is imported once for all such calls instead of ~8 s a call.
    Subprocess `s2d` stays where everything a whole process prints is the point."""
    from s2d_ray.cli import main

    capsys.readouterr()
    code = 0
    try:
        main(list(args))
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else int(err.code is not None)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["s2d", *args], code, out, err)


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
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer random-weight Llama on the embedded tokenizer (tests/fixtures/models.py):
    the real engine and trainer, seconds cheaper per start and per step, for the tests
    whose point is not what the model answers."""
    from tests.fixtures.models import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def parrot_model(tmp_path_factory) -> Path:
    """The tiny Llama made to answer every prompt "The answer is yes." (tests/fixtures/models.py):
    an answer every built-in task parses, identical in every sample, so the filters keep
    inputs and a run goes through training and the distilled evaluation at the tiny
    model's cost."""
    from tests.fixtures.models import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("parrot"), says="The answer is yes.")


def on_tiny(model: Path) -> list[str]:
    """The settings that put a job on the tiny model; top_p 1.0 because vLLM-CPU's top-p
    sampler sorts the whole vocabulary per sequence and step, which would make the tiny
    engine as slow as the embedded one (bench/scale.py)."""
    return [f"model.path={model}", "model.name=tiny-llama", "sampling.top_p=1.0"]


@pytest.fixture(scope="session")
def local_job() -> Path:
    return ROOT / "jobs" / "local" / "last-letter-rar2.yaml"


@pytest.fixture(scope="session")
def default_job() -> Path:
    """`make run`'s job: the one whose System 2 gives this model's well-formed answers."""
    return ROOT / "jobs" / "local" / "triviaqa-s2a-usc.yaml"


PIPELINE_NO_HARM = "eval.no_harm=[{task: {name: coin_flip, people: 2, train: 0, validation: 0, test: 4}}]"


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory, default_job):
    """One `s2d run` of `make run`'s job through every stage, shared by the tests that read
    a finished run directory (the contract, serving); none of them changes what it wrote."""
    out = tmp_path_factory.mktemp("run")
    proc = s2d(
        "run", str(default_job), "--out", str(out),
        # One trainer rank with both cores: on 2 cores two ZeRO-3 ranks take ~70 s to start
        # and ~20 s a step against ~25 s and ~10 s (measured); the 2-rank path is the
        # learning test's (tests/e2e/test_learning.py) and the conventions run's.
        *overrides("task.limit.train=12", "task.limit.test=6", "filter.samples=3", PIPELINE_NO_HARM,
                   "train.workers=1", "train.cpus_per_worker=2",
                   "tracking.mlflow=true", f"tracking.uri={out}-mlruns"),
    )  # fmt: skip
    return out, proc


class Command:
    """An `s2d` command in the background, its output collected as it comes."""

    def __init__(self, command: str, args: list[str], env: dict | None = None):
        self.proc = subprocess.Popen(
            [*S2D, command, *args], cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )  # fmt: skip
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()

    @property
    def log(self) -> str:
        return "".join(list(self.lines))

    def wait_until(self, condition, what: str, timeout: float = 900):
        deadline = time.time() + timeout
        while not (found := condition()):
            assert self.proc.poll() is None, f"exited ({self.proc.returncode}) before {what}\n{self.log[-3000:]}"
            assert time.time() < deadline, f"timed out waiting for {what}\n{self.log[-3000:]}"
            time.sleep(0.2)
        return found

    def wait_for(self, pattern: str) -> re.Match:
        return self.wait_until(lambda: re.search(pattern, self.log), repr(pattern))

    def kill(self) -> None:
        """SIGKILL the driver. Ray's reaper takes its cluster down, but two agents of the dead
        raylet linger (~200 MB): those orphans are removed too."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)
        time.sleep(5)
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                ppid = int(stat.read_text().rsplit(") ", 1)[1].split()[1])
                cmd = (stat.parent / "cmdline").read_bytes()
            except (OSError, IndexError, ValueError):
                continue
            if ppid == 1 and cmd.startswith((b"ray::DashboardAgent", b"ray::RuntimeEnvAgent")):
                os.kill(int(stat.parent.name), signal.SIGKILL)
