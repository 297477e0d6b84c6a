"""A run directory only one node can see, on a real two-node Ray cluster: the second node
runs in a mount namespace of its own, where the run directory's parent is a private
tmpfs (as a GPU node's local disk would be). `s2d check` names it; `s2d run` refuses it in
one line before any engine starts. A folder both nodes see passes."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import ROOT, newest_log, s2d

pytestmark = pytest.mark.e2e

RAY = str(Path(sys.executable).with_name("ray"))
JOB = ROOT / "jobs" / "local" / "last-letter-rar2.yaml"


def _unshare_works() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    return probe.returncode == 0


def _start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    """A Ray node in the foreground (--block), its output in `log`; returns once the log
    says it has started."""
    import time

    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while "Ray runtime started" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError("the Ray node did not start:\n" + log.read_text(errors="replace")[-3000:])
        time.sleep(0.2)
    return proc


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if not _unshare_works():
        pytest.skip("needs `unshare --mount` (root, or user namespaces) to give a node storage of its own")
    from s2d_ray.training import free_port

    root = tmp_path_factory.mktemp("storage")
    private = root / "node-local"  # a tmpfs on the second node: what it writes there, only it sees
    private.mkdir()
    port = free_port()
    import uuid

    # `ray start` turns Ray's token authentication on: every client needs the token.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex}
    # SIGTERM to a node's process group takes its GCS down too, and the node then waits
    # its whole drain timeout (30 s) for a GCS that is gone (ray/_private/node.py): no drain.
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    common = ["--num-cpus=1", "--block", "--disable-usage-stats"]
    head = _start([RAY, "start", "--head", f"--port={port}", "--include-dashboard=false", *common], env, root / "head.log")
    node = _start(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   f"mount -t tmpfs tmpfs {private} && exec {RAY} start --address=127.0.0.1:{port} {' '.join(common)}"],
                  env, root / "node.log")  # fmt: skip
    wait = ("import ray, time; ray.init(address='127.0.0.1:%d', log_to_driver=False); deadline = time.monotonic() + 60\n"
            "while sum(1 for n in ray.nodes() if n.get('Alive')) < 2:\n"
            "    assert time.monotonic() < deadline, 'the second node never joined'; time.sleep(0.5)") % port
    subprocess.run([sys.executable, "-c", wait], env=env, check=True, timeout=120, capture_output=True)
    yield f"127.0.0.1:{port}", root, private, env
    for proc in (node, head):
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
    # `ray start --head` wrote its address where a later `ray.init()` without one looks for a
    # cluster to join; stopped by a signal, not `ray stop`, it leaves it there.
    current = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    if current.is_file() and current.read_text().strip().endswith(f":{port}"):
        current.unlink()


def test_s2d_check_names_a_run_directory_one_node_cannot_see(cluster):
    address, root, private, env = cluster
    proc = s2d("check", str(JOB), "--out", str(private / "run"), "--address", address, check=False, timeout=300, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "PROBLEM: the run directory's storage is not shared" in proc.stdout, proc.stdout
    assert "cluster: 2 node(s)" in proc.stdout
    shared = s2d("check", str(JOB), "--out", str(root / "shared" / "run"), "--address", address, timeout=300, env=env)
    assert "storage: the run directory, model and data files are the same on every node" in shared.stdout
    assert not list(root.glob("**/.s2d-probe-*"))  # the probe files are removed


def test_s2d_run_refuses_it_before_any_engine_starts(cluster):
    address, _, private, env = cluster
    out = private / "run2"
    proc = s2d("run", str(JOB), "--out", str(out), "--set", f"ray.address={address}", check=False, timeout=300, env=env)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("s2d: error:")]
    assert len(errors) == 1 and "the run directory's storage is not shared" in errors[0], proc.stderr
    assert "vLLM uses" not in newest_log(out, "run")  # no engine was started
    assert not (out / "generate").exists()
