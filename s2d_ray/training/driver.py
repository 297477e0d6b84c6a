"""The driver's side of training: the distillation set (or stream) into Ray Train's
worker group, attempts named by their inputs, and the exported model moved into place."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

from s2d_ray.config import TrainConfig
from s2d_ray.errors import S2DError
from s2d_ray.placement import FAKE_GPUS_ENV, fake_gpus, trainer_scaling
from s2d_ray.training.checkpoints import READY, TRAIN_STATE, checkpoint_interval, finished_export
from s2d_ray.training.data import tokenized, tokenized_distill_set, total_steps
from s2d_ray.training.loop import train_loop
from s2d_ray.training.progress import StepWatch, read_steps


class EmptyDistillSet(S2DError):
    """No input passed the filter: there is nothing to fine-tune on."""


TRAINED_FROM = ".s2d-trained-from.json"  # in model/: the inputs it was trained from (pipeline.py)
ROWS_PER_BLOCK = 4096  # the tokenized set's blocks in Ray's object store


def train(
    distill_dir: Path, model_path: Path, out_dir: Path, storage: Path, cfg: TrainConfig, log=print,
    attempt: str | None = None, trained_from: dict | None = None, chat_template: str | None = None,
    steps_per_checkpoint: float = 0.0,
) -> dict:
    """Fine-tune on the distillation set; writes a Hugging Face checkpoint to `out_dir`.

    `steps_per_checkpoint`: how many steps' time one checkpoint takes to write (from the
    estimate), for the default interval (`checkpoints.checkpoint_interval`).

    `attempt` names this training's storage under `storage` (a fingerprint of its inputs):
    a rerun with the same inputs resumes from its latest checkpoint; other attempts'
    storage is removed, so a stale checkpoint never becomes this run's result."""
    import pandas as pd
    import ray

    # Tokenized once, here: the workers only batch and pad.
    rows_df, rows = tokenized_distill_set(distill_dir, model_path, cfg, chat_template)
    if rows == 0:
        raise EmptyDistillSet("the distillation set is empty: the filter kept no input")
    fitting = len(rows_df)
    too_long = rows - fitting
    if not fitting:
        raise S2DError(f"every one of the {rows} distillation rows is longer than train.max_seq_len {cfg.max_seq_len} "
                       "tokens (prompt and answer): raise train.max_seq_len")  # fmt: skip
    if too_long:
        log(f"training: {too_long} of {rows} rows are longer than train.max_seq_len {cfg.max_seq_len} tokens and are "
            "left out (cutting them would lose the prompt's start or the answer)")  # fmt: skip
    if fitting < cfg.workers:
        # Every worker needs rows of its own; a tiny set is repeated (training cycles over
        # its data anyway), in the same order.
        log(f"training: {fitting} row(s) for {cfg.workers} workers; repeating them so every worker has data")
        rows_df = pd.concat([rows_df] * math.ceil(cfg.workers / fitting), ignore_index=True)
    # In id order, block after block (the ranks read with preserve_order).
    ds = ray.data.from_pandas([rows_df.iloc[i : i + ROWS_PER_BLOCK] for i in range(0, len(rows_df), ROWS_PER_BLOCK)])
    # The ranks read it through their own executors; their progress bars, finished after
    # training by the time Ray streams them, would reach the terminal after s2d's lines.
    ds.context.enable_progress_bars = False
    steps = total_steps(cfg, fitting)
    every = checkpoint_interval(cfg, steps, steps_per_checkpoint)
    log(f"training: {fitting} rows, {steps} steps, {cfg.workers} workers, ZeRO-3"
        + (f", a checkpoint every {every} steps" if every else ""))  # fmt: skip
    stats = fit(ds, fitting, steps, model_path, out_dir, storage, cfg, stream=False, attempt=attempt, log=log,
                trained_from=trained_from, chat_template=chat_template, every=every)  # fmt: skip
    return {**stats, "too_long": too_long}


def train_stream(ds, model_path: Path, out_dir: Path, storage: Path, cfg: TrainConfig, log=print,
                 chat_template: str | None = None) -> dict:  # fmt: skip
    """Fine-tune on a distillation stream while it is generated (one pass, `cfg.steps` at most).

    A stream cannot be replayed: no checkpoints, no restarts; a failure fails the stage
    (the rows are in generate/ and distill/, so `s2d train` can then train on them)."""
    log(f"training: streaming, up to {cfg.steps} steps, {cfg.workers} workers, ZeRO-3 (rows longer than "
        f"train.max_seq_len {cfg.max_seq_len} are left out, uncounted)")  # fmt: skip
    return fit(tokenized(ds, model_path, cfg, chat_template), None, cfg.steps, model_path, out_dir, storage, cfg,
               stream=True, attempt=None, log=log, chat_template=chat_template)  # fmt: skip


def fit(
    ds, rows: int | None, steps: int, model_path: Path, out_dir: Path, storage: Path, cfg: TrainConfig, stream: bool,
    attempt: str | None, log=print, trained_from: dict | None = None, chat_template: str | None = None,
    every: int = 0,
) -> dict:
    """Run the Ray Train worker group over `ds` and move its exported model into `out_dir`."""
    import uuid

    from s2d_ray.rundir import replace_dir

    name = f"train-{attempt or uuid.uuid4().hex[:16]}"
    storage.mkdir(parents=True, exist_ok=True)
    steps_file = storage / f"{name}.steps.jsonl"  # rank 0's progress: the loss curve
    for other in storage.iterdir():  # earlier attempts on other inputs: never this one's result
        if other.is_dir() and other.name != name:
            shutil.rmtree(other, ignore_errors=True)
        elif other.is_file() and other != steps_file:
            other.unlink(missing_ok=True)
    started = time.perf_counter()
    attempt_dir = storage / name
    exported = finished_export(attempt_dir)
    if exported is not None:
        log(f"training: this attempt had already finished ({storage.name}/{name}); using its exported model")
        metrics = json.loads((exported / TRAIN_STATE).read_text())
    else:
        with StepWatch(steps_file, steps, log):
            exported, metrics = _run_trainer(ds, steps, model_path, storage, cfg, stream, name, steps_file, chat_template,
                                             every)  # fmt: skip
    ready = attempt_dir / READY
    if exported != ready:
        # Ray Train's record of this attempt lists the export: once it is moved, a rerun
        # must not reload that record (it would name a missing checkpoint), so it goes first.
        (attempt_dir / "checkpoint_manager_snapshot.json").unlink(missing_ok=True)
        shutil.move(str(exported), str(ready))  # a rename on one filesystem: stored once
    (ready / TRAIN_STATE).write_text(json.dumps(metrics))  # found again if killed below
    if trained_from is not None:
        (ready / TRAINED_FROM).write_text(json.dumps(trained_from))
    replace_dir(ready, out_dir)  # killed before it: the rerun finds `ready` again
    (out_dir / TRAIN_STATE).unlink(missing_ok=True)
    shutil.rmtree(attempt_dir, ignore_errors=True)  # its ZeRO-3 checkpoints are spent
    curve, _ = read_steps(steps_file)
    steps_file.unlink(missing_ok=True)
    return {
        "rows": rows,
        "steps": metrics.get("step", steps),
        "streaming": stream,
        "final_loss": metrics.get("loss"),
        "tokens": metrics.get("tokens_total"),
        "seconds": time.perf_counter() - started,
        "workers": cfg.workers,
        # Per step: [step, loss, non-padding tokens/s per worker] (a resumed step: its last run).
        "loss_curve": [[r["step"], r["loss"], r["tokens"] / max(r["seconds"], 1e-9)] for r in curve],
    }


def _run_trainer(ds, steps: int, model_path: Path, storage: Path, cfg: TrainConfig, stream: bool, name: str,
                 steps_file: Path, chat_template: str | None = None, every: int = 0):  # fmt: skip
    """Ray Train's fit; returns (the exported model's folder in storage, final metrics)."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from s2d_ray.cluster import ray_logs_dir
    from s2d_ray.hooks import BOUNDARY_ENV

    env = {"TOKENIZERS_PARALLELISM": "false"}
    if os.environ.get(BOUNDARY_ENV):  # test hook: what the ranks train on is recorded
        env[BOUNDARY_ENV] = os.environ[BOUNDARY_ENV]
    on_cpu = not cfg.use_gpu or fake_gpus()  # fake GPUs (tests): GPU resources, CPU compute
    if on_cpu:
        env["DS_ACCELERATOR"] = "cpu"
        env["OMP_NUM_THREADS"] = str(max(1, int(cfg.cpus_per_worker)))
    if fake_gpus():
        env[FAKE_GPUS_ENV] = "1"
    backend = "gloo" if on_cpu else cfg.backend
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "train": cfg.model_dump(mode="json"),
            "model_path": str(model_path),
            "steps": steps,
            "env": env,
            "on_cpu": on_cpu,
            "backend": backend,
            "stream": stream,
            "progress": str(steps_file),
            "chat_template": chat_template,
            "checkpoint_every": every,
        },
        scaling_config=ScalingConfig(**trainer_scaling(cfg)),
        # Covers every collective, the export's gathers while rank 0 writes a shard included.
        torch_config=TorchConfig(backend=backend, timeout_s=int(cfg.collective_timeout_s)),
        datasets={"train": ds},
        # Sequential: every rank reads the whole set in order and takes its own rows (a
        # split that a resume can rely on, see data.micro_batches); a stream is split by Ray.
        dataset_config=DataConfig(datasets_to_split="all") if stream else DataConfig(
            datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage),
            # A dead rank restarts the group from the latest checkpoint (a stream cannot be replayed).
            failure_config=FailureConfig(max_failures=0 if stream else cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            # Ray Train's workers tee every print to their stdout and also log it through the
            # root logger, which its worker logging also sends to stdout: each rank's line
            # twice in RUN/logs/ (ray/train/v2/_internal/logging/patch_print.py). Plain print.
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        ),
    )
    try:
        result = trainer.fit()
    except Exception as err:  # Ray Train wraps the ranks' errors; one line, and where to look
        cause = str(err).strip().splitlines()
        kept = sorted((storage / name).glob("checkpoint_*"))
        resume = f"; the latest checkpoint is kept ({kept[-1].name}): rerun the same command to resume" if kept else ""
        raise S2DError(
            f"training failed after {cfg.max_failures} restart(s): {cause[-1] if cause else type(err).__name__}"
            f"{resume} (full log: {ray_logs_dir()})"
        ) from None
    metrics = result.metrics or {}
    if result.checkpoint is None or not metrics.get("final"):
        if stream and not metrics.get("step"):
            raise EmptyDistillSet("the distillation stream brought no rows: the filter kept no input")
        raise S2DError("training finished without an exported model")
    return Path(result.checkpoint.path), metrics

