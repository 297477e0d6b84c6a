"""Interrupting generation and rerunning the same command: each id once, nothing redone.
On the tiny random-weight Llama: resuming is about parts and ids, not answers."""

import json
import os
import signal
import subprocess
import time

import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT, S2D, newest_log, on_tiny, overrides, s2d

pytestmark = pytest.mark.e2e

INPUTS = 64  # 16 batches: some are still to do when the first part lands, even on the fast tiny engine


def test_interrupted_generation_resumes_without_redoing_work(tmp_path, local_job, tiny_model):
    args = [
        "generate", str(local_job), "--out", str(tmp_path),
        *overrides(*on_tiny(tiny_model), f"task.train={INPUTS}", "engine.batch_size=4", "filter.samples=2", "sampling.max_tokens=24"),
    ]  # fmt: skip
    proc = subprocess.Popen(
        [*S2D, *args], cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    parts_dir = tmp_path / "generate"
    deadline = time.time() + 900
    try:
        while not list(parts_dir.glob("part-*.parquet")):
            assert proc.poll() is None, "generation ended before it could be interrupted"
            assert time.time() < deadline, "no part written in time"
            time.sleep(0.2)
    finally:  # at once: (a second process on the run directory is refused: tests/unit/test_rundir.py)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait()
    first = {r["id"]: r for r in pq.read_table(parts_dir).to_pylist()}
    done_before = len(first)
    assert 0 < done_before < INPUTS

    rerun = s2d(*args)
    assert f"resuming: {done_before} inputs already in generate/" in rerun.stderr

    ids = pq.read_table(parts_dir).column("id").to_pylist()
    assert len(ids) == INPUTS and len(set(ids)) == INPUTS
    after = {r["id"]: r for r in pq.read_table(parts_dir).to_pylist()}
    assert all(after[i] == row for i, row in first.items())  # finished rows kept as they were, not redone
    assert len(list(parts_dir.glob("part-*.parquet"))) == 1  # the stage's small parts merged at its end
    stage = json.loads((tmp_path / "run.json").read_text())["stages"]["generate"]
    assert stage["resumed"] == done_before and stage["generated_now"] == INPUTS - done_before

    again = s2d(*args)  # a finished run is a no-op
    assert f"resuming: {INPUTS} inputs already" in again.stderr
    assert "Ray's session logs" in newest_log(tmp_path, "generate", 1)  # the rerun that did work started Ray
    assert "Ray's session logs" not in newest_log(tmp_path, "generate")  # nothing to do: neither Ray nor an engine
    assert pq.read_table(parts_dir).num_rows == INPUTS

    # A rerun refused for changed settings leaves the run directory as it was, byte for byte.
    before = (tmp_path / "run.json").read_bytes()
    refused = s2d(*args, "--set", "sampling.temperature=0.9", check=False)
    assert refused.returncode == 1 and "generated with other sampling settings" in refused.stderr
    assert (tmp_path / "run.json").read_bytes() == before
