"""Engines that die or stall mid-batch, on the real vLLM engine: their actor leaves, Ray
starts another, the batch is redone and every input lands exactly once; a crash loop
ends after engine.max_restarts with one line.

Faults are injected into the real engine through S2D_TEST_ENGINE_FAULT (engine.py): a
step that never returns ("stall") or vLLM's own engine-dead error ("die"). The third
kind is real: the test kills the engine's process with SIGKILL. On the tiny random-weight
Llama: what is checked is which inputs land and how often, not what they answer."""

import json
import os
import re
import signal
import subprocess
import threading
import time

import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT, S2D, on_tiny, overrides, s2d

pytestmark = pytest.mark.e2e
INPUTS = 16


def _settings(model, *extra: str, inputs: int = INPUTS) -> list[str]:
    return overrides(*on_tiny(model), f"task.train={inputs}", "engine.batch_size=4", "filter.samples=4", "sampling.max_tokens=24", *extra)


def test_a_stalled_and_a_killed_engine_are_replaced_and_every_input_lands_once(tmp_path, local_job, tiny_model):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "S2D_TEST_ENGINE_FAULT": f"stall:{tmp_path / 'stalled-once'}"}
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [*S2D, "generate", str(local_job), "--out", str(out), "--verbose", *_settings(tiny_model, "engine.stall_timeout_s=20", "engine.max_restarts=8", inputs=64)],
        cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    killed = None
    deadline = time.time() + 900
    while proc.poll() is None:
        assert time.time() < deadline, "generation did not finish\n" + "".join(lines[-40:])
        started = [m for line in list(lines) if (m := re.search(r"pid=(\d+)\).*engine on node \w+: vLLM uses", line))]
        if killed is None and len(started) == 2:  # the engine that replaced the stalled one
            time.sleep(2)  # now busy with a batch
            killed = int(started[1].group(1))
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.5)
    reader.join(timeout=30)
    log = "".join(lines)
    assert proc.returncode == 0, log[-4000:]
    assert "engine stalled: no step finished for" in log, log[-4000:]
    assert killed is not None, "the replacement engine was never seen starting\n" + log[-4000:]
    ids = pq.read_table(out / "generate", columns=["id"]).column("id").to_pylist()
    assert len(ids) == 64 and len(set(ids)) == 64  # every input exactly once
    stage = json.loads((out / "run.json").read_text())["stages"]["generate"]
    # Every death is counted: the injected stall, the kill, and any further stall that a
    # loaded machine's slow step trips (CI's 2 cores, a replacement engine importing vLLM
    # beside the working one, took 4 deaths with a 5 s timeout: hence 20 s and room for
    # 8 restarts). Each stall prints its line; the kill is the one death without a line.
    stalls = len(re.findall(r"engine on node \w+: engine stalled: no step finished for", log))
    assert stage["engine_restarts"] == stalls + 1 and stage["failed"] == 0, (stalls, stage)


def test_an_engine_that_keeps_dying_fails_the_stage_with_one_line(tmp_path, local_job, tiny_model):
    env = {**os.environ, "S2D_TEST_ENGINE_FAULT": "die"}
    # max_restarts 0: the first death ends the stage (one engine start, not two; that a
    # replaced engine's deaths add up is the stall-and-kill test's engine_restarts count).
    proc = s2d("generate", str(local_job), "--out", str(tmp_path), *_settings(tiny_model, "engine.max_restarts=0"), check=False, env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("s2d: error: engine died once in this stage (engine.max_restarts 0)"), last
    assert "vLLM's engine core died" in last, last
    assert not list((tmp_path / "generate").glob("part-*.parquet"))  # nothing half-done was written


def test_prompts_too_long_for_the_context_fail_alone_and_the_run_completes(tmp_path, local_job, tiny_model):
    # Step 1's prompts (~87 tokens) fit a 100-token context; step 2's, grown by step 1's
    # output, mostly do not: those samples fail with their reason, the stage goes on.
    s2d("generate", str(local_job), "--out", str(tmp_path),
               *overrides(*on_tiny(tiny_model), "task.train=6", "engine.max_model_len=100", "filter.samples=2", "sampling.max_tokens=24"))  # fmt: skip
    stage = json.loads((tmp_path / "run.json").read_text())["stages"]["generate"]
    assert stage["failed"] >= 1 and any(k.startswith("respond: prompt") for k in stage["failure_reasons"]), stage
    table = pq.read_table(tmp_path / "generate").to_pylist()
    failed = {r["id"] for r in table if isinstance(r["system2_failure"], str)}
    assert len(table) == 6 and len(failed) == stage["failed"]
    assert all(r["system2_failure"].startswith("respond: prompt of ") for r in table if r["id"] in failed)
    kept = set(pq.read_table(tmp_path / "distill").column("id").to_pylist()) if (tmp_path / "distill").exists() else set()
    assert not kept & failed  # a failed input never enters the distillation set
