"""ZeRO-3 checkpoints through Ray Train (when, how they are saved), and finding a whole
exported model again after a kill."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from s2d_ray.config import TrainConfig


ZERO_TAG = "zero"  # DeepSpeed's checkpoint tag: <checkpoint>/zero/<one file per rank and kind>


TRAIN_STATE = "s2d_train_state.json"  # step, tokens, micro-batches consumed; "final" on the export


READY = "export-ready"  # in an attempt's storage: the export, moved out of Ray Train's records


# A checkpoint may cost at most this share of the training time between two of them
# when train.checkpoint_every is unset (its cost: s2d_ray.estimate.checkpoint_plan).
CHECKPOINT_BUDGET = 0.10


def checkpoint_interval(cfg: TrainConfig, steps: int, steps_per_checkpoint: float = 0.0) -> int:
    """Steps between checkpoints: `train.checkpoint_every`, else chosen from the cost of one
    (`steps_per_checkpoint`: how many training steps' time one takes to write, from the
    estimate): about ten a run, but never so often that writing them takes more than
    CHECKPOINT_BUDGET of the training time. 0: none, also under ten steps (redoing a few
    steps costs less than saving them) and when even one would cost more than that."""
    if cfg.checkpoint_every is not None:
        return cfg.checkpoint_every
    if steps < 10:
        return 0
    every = max(steps // 10, math.ceil(steps_per_checkpoint / CHECKPOINT_BUDGET))
    return every if every < steps else 0


@contextmanager
def checkpoint_folder(name: str, staging: str):
    """(folder, report): where this rank writes the checkpoint `name`, and the collective
    that hands it to Ray Train, which counts it only once every rank has reported (a save
    cut short never becomes the latest checkpoint).

    staging "none": straight into the run directory's storage, one folder for all ranks
    (each writes its own files), recorded where it is (no copy). staging "local": on the
    node's disk ($TMPDIR), then copied by Ray Train into its storage."""
    import ray.train
    from ray.train import Checkpoint, CheckpointUploadMode

    if staging == "local":
        folder = Path(tempfile.mkdtemp(prefix="s2d-ckpt-"))
        options = {}
    else:
        folder = Path(ray.train.get_context().get_storage().experiment_fs_path) / name
        folder.mkdir(parents=True, exist_ok=True)
        options = {"checkpoint_dir_name": name, "checkpoint_upload_mode": CheckpointUploadMode.NO_UPLOAD}

    def report(metrics: dict, with_checkpoint: bool = True) -> None:
        checkpoint = Checkpoint.from_directory(str(folder)) if with_checkpoint else None
        ray.train.report(dict(metrics), checkpoint=checkpoint, **options)

    try:
        yield folder, report
    finally:
        if staging == "local":
            shutil.rmtree(folder, ignore_errors=True)


def save_checkpoint(engine, rank: int, state: dict, metrics: dict, staging: str = "none") -> None:
    """Every rank writes its own ZeRO-3 shard (model, optimizer, scheduler) and reports it
    (see `checkpoint_folder`). Collective."""
    with checkpoint_folder(f"checkpoint_step_{state['step']:06d}", staging) as (folder, report):
        engine.save_checkpoint(str(folder), tag=ZERO_TAG)
        if rank == 0:
            (folder / TRAIN_STATE).write_text(json.dumps(state))
        report(metrics)


def complete_export(folder: Path) -> bool:
    """An exported model whose every file is whole: config.json, and each safetensors file
    (all those the index names) as long as its own header says (an upload cut short is not)."""
    if not (folder / "config.json").is_file():
        return False
    index = folder / "model.safetensors.index.json"
    try:
        names = set(json.loads(index.read_text())["weight_map"].values()) if index.exists() else {"model.safetensors"}
        for name in names:
            path = folder / name
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if path.stat().st_size != 8 + size + end:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def finished_export(attempt_dir: Path) -> Path | None:
    """The exported model of an attempt whose training ended but whose driver did not get
    to move it into place (killed in between), if there is a whole one."""
    if complete_export(attempt_dir / READY):
        return attempt_dir / READY
    done = []
    for state in attempt_dir.glob(f"checkpoint_*/{TRAIN_STATE}"):
        try:
            final = json.loads(state.read_text()).get("final")
        except (OSError, ValueError):
            continue
        if final and complete_export(state.parent):
            done.append(state.parent)
    return max(done, key=lambda p: p.name) if done else None

