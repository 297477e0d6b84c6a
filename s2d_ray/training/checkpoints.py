"""ZeRO-3 checkpoints through Ray Train (when, how they are saved), and finding a whole
exported model again after a kill."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from s2d_ray.config import TrainConfig


ZERO_TAG = "zero"  # DeepSpeed's checkpoint tag: <checkpoint>/zero/<one file per rank and kind>


TRAIN_STATE = "s2d_train_state.json"  # step, tokens, micro-batches consumed; "final" on the export


READY = "export-ready"  # in an attempt's storage: the export, moved out of Ray Train's records


def checkpoint_interval(cfg: TrainConfig, steps: int) -> int:
    """Steps between checkpoints: `train.checkpoint_every`, or about ten a run; 0: none.
    Unset and under ten steps: none (redoing a few steps costs less than saving them)."""
    if cfg.checkpoint_every is not None:
        return cfg.checkpoint_every
    return steps // 10 if steps >= 10 else 0


def save_checkpoint(engine, rank: int, state: dict, metrics: dict) -> None:
    """Every rank writes its own ZeRO-3 shard (model, optimizer, scheduler) to local disk
    and reports it; Ray Train merges the ranks' files into one checkpoint folder, which
    counts only once every rank's upload has finished (a cut-short save never becomes the
    latest checkpoint). Collective."""
    import ray.train

    folder = Path(tempfile.mkdtemp(prefix="s2d-ckpt-"))
    try:
        engine.save_checkpoint(str(folder), tag=ZERO_TAG)
        if rank == 0:
            (folder / TRAIN_STATE).write_text(json.dumps(state))
        ray.train.report(dict(metrics), checkpoint=ray.train.Checkpoint.from_directory(str(folder)))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


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

