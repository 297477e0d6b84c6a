"""Proof that training, export and reload work: fine-tuning on correct (prompt -> answer)
pairs makes the distilled model reproduce them, where the base model does not.

The same run proves that training survives a dead rank: one trainer worker is killed
with SIGKILL mid-run; Ray Train restarts the group from the last checkpoint within the
same command, and no step before that checkpoint is trained again. Reruns of a finished
stage are no-ops."""

import json
import os
import re
import signal
import subprocess
import time

import pyarrow as pa
import pytest

from s2d_ray.config import load_config
from s2d_ray.rundir import RunDir, write_part
from tests.conftest import ROOT, S2D, overrides, s2d

pytestmark = pytest.mark.e2e

PAIRS = 10
STEPS = 8


def test_training_survives_a_dead_rank_and_teaches_the_model_its_targets(tmp_path, local_job):
    cfg = load_config(local_job, ["task.words_per_example=2", f"task.train={PAIRS}"])
    examples = cfg.task.examples("train")
    run = RunDir(tmp_path).create()
    write_part(
        run.distill,
        pa.table(
            {
                "id": [e.id for e in examples],
                "prompt": [e.question for e in examples],
                "target": [cfg.task.target(e.answer) for e in examples],
            }
        ),
    )
    settings = overrides(
        f"task.train={PAIRS}", f"train.steps={STEPS}", "train.lr=3e-4", "train.warmup_steps=2", "train.micro_batch_size=5",
        "train.checkpoint_every=2", "eval.split=train", "eval.system2=false",
    )  # fmt: skip
    trainer = subprocess.Popen(
        [*S2D, "train", str(local_job), "--out", str(tmp_path), *settings], cwd=ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    lines, killed = [], None
    deadline = time.time() + 1200
    for line in trainer.stdout:
        lines.append(line)
        step = re.search(r"RayTrainWorker pid=(\d+)\).*?train step (\d+)/", line)
        if killed is None and step and int(step.group(2)) == 3:  # after the checkpoint of step 2
            killed = int(step.group(1))
            os.kill(killed, signal.SIGKILL)  # the rank that prints: rank 0
        assert time.time() < deadline, "training did not finish in time"
    assert trainer.wait() == 0, "".join(lines[-40:])
    log = "".join(lines)
    assert killed is not None, "no step 3 was seen to kill a worker at\n" + log[-3000:]
    assert "resumed from the checkpoint of step 2 of 8" in log, log[-3000:]
    after = [int(s) for s in re.findall(r"train step (\d+)/8", log.split("resumed from the checkpoint")[-1])]
    assert min(after) == 3 and max(after) == 8, after  # nothing before the checkpoint was trained again
    assert not list((tmp_path / "ray_train").glob("*/checkpoint_*"))  # spent checkpoints removed
    assert (tmp_path / "model" / "config.json").exists() and not (tmp_path / "model" / "s2d_train_state.json").exists()

    again = s2d("train", str(local_job), "--out", str(tmp_path), *settings)  # same inputs: nothing to do
    assert "already trained from this distillation set" in again.stderr

    s2d("eval", str(local_job), "--out", str(tmp_path), *settings)
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["distilled"]["n"] == PAIRS
    assert ev["system1"]["accuracy"] < 0.10, ev["system1"]
    assert ev["distilled"]["accuracy"] >= 0.90, ev["distilled"]
