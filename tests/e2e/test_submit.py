"""`s2d submit` / `s2d jobs` against a real local Ray head started with token authentication."""

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from s2d_ray.models import cache_dir
from tests.conftest import on_tiny, s2d

pytestmark = pytest.mark.e2e
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    token = secrets.token_hex(24)
    home = tmp_path_factory.mktemp("home")  # no ~/.ray/auth_token to fall back on
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}
    # The job's `python` is the cluster's: here, this virtualenv's.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    dash = _free_port()
    subprocess.run(
        [RAY, "start", "--head", f"--port={_free_port()}", "--num-cpus=2", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--disable-usage-stats"],
        env=env, check=True, capture_output=True, timeout=180,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dash}"
    client_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # The embedded model where it was prepared (not converted again under the new HOME).
    client_env.update(HOME=str(home), RAY_AUTH_TOKEN=token, S2D_CACHE=str(cache_dir().parent))
    try:
        deadline = time.time() + 120
        while s2d("jobs", "status", "none", "--address", address, env=client_env, check=False).stderr.count("cannot reach"):
            assert time.time() < deadline, "the dashboard did not come up"
            time.sleep(2)
        yield address, token, client_env
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_submit_runs_a_tiny_job_with_the_token(head, tmp_path, local_job, tiny_model):
    address, token, env = head
    out = tmp_path / "run"
    proc = s2d(
        "submit", str(local_job), "--address", address, "--command", "generate", "--out", str(out),
        "--set", "task.train=2", "--set", "filter.samples=1", "--set", "sampling.max_tokens=8",
        "--set", "method.name=rar1", "--set", "engine.kv_cache_gib=1", "--set", "engine.batch_size=1",
        "--set", "budget.tokens=1",  # the budget stops generation cleanly after the first part
        *[arg for setting in on_tiny(tiny_model) for arg in ("--set", setting)],  # the cluster is this machine
        env=env, timeout=900,
    )  # fmt: skip
    assert "submitted: raysubmit_" in proc.stdout and "SUCCEEDED" in proc.stdout
    assert "generate: kept" in proc.stdout  # the job's own log lines were streamed
    assert "budget: token budget 1 reached" in proc.stdout
    ids = pq.read_table(out / "generate", columns=["id"]).column("id").to_pylist()
    assert len(ids) == 1  # what was produced is kept; nothing more was generated
    stage = json.loads((out / "run.json").read_text())["stages"]["generate"]
    assert stage["budget_stop"].startswith("token budget 1 reached") and "1 of 2 inputs" in stage["budget_stop"]
    job_id = proc.stdout.split("submitted: ")[1].split()[0]
    assert s2d("jobs", "status", job_id, "--address", address, env=env).stdout.startswith(f"{job_id}: SUCCEEDED")
    logs = s2d("jobs", "logs", job_id, "--address", address, env=env).stdout
    assert "generate: 2 inputs" in logs
    for text in (proc.stdout, proc.stderr, logs):
        assert token not in text  # never printed or logged


def test_wrong_or_missing_token_is_refused_with_one_clear_line(head, local_job):
    address, token, env = head
    wrong = s2d("jobs", "status", "raysubmit_x", "--address", address, env={**env, "RAY_AUTH_TOKEN": "not-" + token}, check=False)
    assert wrong.returncode == 1
    assert wrong.stderr.strip() == f"s2d: error: the Ray cluster at {address} refused the token from RAY_AUTH_TOKEN: it is not this cluster's token"
    missing = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    proc = s2d("submit", str(local_job), "--address", address, "--out", "/shared/runs/x", "--no-wait", env=missing, check=False)
    assert proc.returncode == 1 and "requires a token; none found" in proc.stderr and token not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_bad_job_file_fails_before_anything_is_uploaded(head, tmp_path):
    address, _, env = head
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: {name: last_letter}\nfilter: {samples: 0}\n")
    proc = s2d("submit", str(bad), "--address", address, env=env, check=False)
    assert proc.returncode == 2 and "filter.samples" in proc.stderr
