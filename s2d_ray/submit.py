"""Submitting a job to a Ray cluster through the Ray Jobs SDK, and following it.

The job file and the package travel in the job's runtime environment (the file in
`working_dir`, the package in `py_modules`), so the cluster needs only the pinned
stack (Ray, vLLM, DeepSpeed) in its image. The job file is validated here first: a
typo fails on the laptop, not after the upload.

Ray token authentication (`RAY_AUTH_MODE=token` on the cluster): the token is read
from `RAY_AUTH_TOKEN`, else the file named by `RAY_AUTH_TOKEN_PATH`, else
`~/.ray/auth_token`, and sent as an `Authorization` header. It is never printed or
logged; errors say where a token was looked for, not what it was.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import tempfile
import time
from pathlib import Path

from s2d_ray.errors import S2DError

PACKAGE = Path(__file__).resolve().parent
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def read_token() -> tuple[str | None, str]:
    """The token and where it came from (for messages; never the token itself)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            return Path(path).expanduser().read_text().strip(), "RAY_AUTH_TOKEN_PATH"
        except OSError:
            raise S2DError(f"RAY_AUTH_TOKEN_PATH {path}: cannot read the token file") from None
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file():
        return default.read_text().strip(), str(default)
    return None, "none (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)"


def is_loopback(host: str) -> bool:
    import ipaddress

    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_transport(address: str, insecure: bool = False) -> None:
    """A token is a password to the whole cluster: it may go over plain http only to this
    machine (an SSH tunnel or a port-forward ends here), else over https."""
    from urllib.parse import urlsplit

    parts = urlsplit(address if "://" in address else f"http://{address}")
    if parts.scheme == "http" and not is_loopback(parts.hostname or "") and not insecure:
        raise S2DError(
            f"refusing to send the Ray token over plain http:// to {parts.hostname}: use https://, or an SSH "
            "tunnel / port-forward and --address http://127.0.0.1:8265 (or pass --insecure)"
        )


def client(address: str | None, insecure: bool = False):
    """A JobSubmissionClient for the dashboard at `address`, authenticated if a token is set."""
    from ray.job_submission import JobSubmissionClient

    address = _address(address)
    if not address:
        raise S2DError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    token, source = read_token()
    if token:
        check_transport(address, insecure)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as err:  # the SDK raises several types; each becomes one line
        raise S2DError(_explain(err, address, source)) from None


def _explain(err: Exception, address: str, source: str) -> str:
    text = str(err)
    if "Authentication failed" in text or "403" in text:
        return f"the Ray cluster at {address} refused the token from {source}: it is not this cluster's token"
    if "Authentication required" in text or "401" in text:
        return f"the Ray cluster at {address} requires a token; none found in {source}"
    if "Failed to connect" in text or "Connection" in type(err).__name__ or "onnect" in text:
        return f"cannot reach a Ray dashboard at {address} (is the cluster up, and the address http://HEAD:8265?)"
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return f"Ray at {address}: {first}"


def _call(address: str, fn, *args):
    """Run one SDK call; any failure becomes one line."""
    try:
        return fn(*args)
    except S2DError:
        raise
    except Exception as err:  # noqa: BLE001
        raise S2DError(_explain(err, address, read_token()[1])) from None


AGENT_WAIT_S = 60.0


def _until_an_agent_answers(submit_job, wait_s: float = AGENT_WAIT_S):
    """A cluster that has just started may not have its job agent yet: Ray's head answers
    "No available agent to submit job, please try again later" (an HTTP 500). Try again,
    for up to `wait_s`; any other error at once."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return submit_job()
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(2.0)


def cluster_run_dir(out: str | None, cfg) -> str:
    """Where the run directory is on the cluster, explicitly: an absolute path on storage
    every node sees. A relative one would land in the job's temporary working directory
    on the head node and vanish with it."""
    path = out or cfg.out
    if os.path.isabs(path):
        return path
    base = os.environ.get("S2D_RUNS") or cfg.cluster.runs_dir
    if not base:
        raise S2DError(
            f"run directory {path!r} is relative: on a cluster it would land in the job's temporary folder. "
            "Pass an absolute --out on shared storage, or set S2D_RUNS or cluster.runs_dir"
        )
    if not os.path.isabs(base):
        raise S2DError(f"S2D_RUNS / cluster.runs_dir must be an absolute path on shared storage, not {base!r}")
    return os.path.join(base, path)


def submit(
    job: Path, overrides: tuple[str, ...], address: str | None, command: str = "run", out: str | None = None,
    insecure: bool = False,
) -> tuple[object, str]:
    """Upload the job file and the package and start `s2d <command>` on the cluster."""
    from s2d_ray.config import load_config

    from s2d_ray.preflight import model_facts

    cfg = load_config(job, overrides)  # fails here, on the laptop, on any bad setting
    # The model as far as this machine can tell (a folder here, else its family's limits);
    # `s2d run` repeats the whole check on the cluster before anything starts there.
    model_facts(cfg, required=False)
    out = cluster_run_dir(out, cfg)
    jc = client(address, insecure)
    staging = Path(tempfile.mkdtemp(prefix="s2d-submit-"))
    try:
        shutil.copy(job, staging / "job.yaml")
        args = ["python", "-m", "s2d_ray.cli", command, "job.yaml"]
        for o in overrides:
            args += ["--set", o]
        args += ["--out", out]
        runtime_env = {
            "working_dir": str(staging),
            "py_modules": [str(PACKAGE)],
            "env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"},
        }
        submit_job = lambda: jc.submit_job(  # noqa: E731
            entrypoint=shlex.join(args), runtime_env=runtime_env, metadata={"s2d_job": cfg.name}
        )
        job_id = _call(_address(address), lambda: _until_an_agent_answers(submit_job))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return jc, job_id


def follow(jc, job_id: str, echo=print) -> str:
    """Stream the job's logs until it ends; return its final status."""

    async def tail() -> None:
        async for lines in jc.tail_job_logs(job_id):
            echo(lines.rstrip("\n"))

    asyncio.run(tail())
    return _status_name(jc.get_job_status(job_id))


def _status_name(status) -> str:
    return str(getattr(status, "value", status))


def _address(address: str | None) -> str:
    return address or os.environ.get("RAY_ADDRESS", "")


def status(address: str | None, job_id: str, insecure: bool = False) -> str:
    jc = client(address, insecure)
    info = _call(_address(address), jc.get_job_info, job_id)
    message = f" ({info.message})" if getattr(info, "message", None) else ""
    return f"{job_id}: {_status_name(info.status)}{message}"


def logs(address: str | None, job_id: str, insecure: bool = False) -> str:
    jc = client(address, insecure)
    return _call(_address(address), jc.get_job_logs, job_id)


def stop(address: str | None, job_id: str, insecure: bool = False) -> bool:
    jc = client(address, insecure)
    return bool(_call(_address(address), jc.stop_job, job_id))
