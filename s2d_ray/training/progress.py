"""Training progress: rank 0 appends a line per step to a file in the attempt's storage;
the driver reads it live (`StepWatch`) and keeps it as the run's loss curve."""

from __future__ import annotations

import json
from pathlib import Path


def note_step(path: str, record: dict) -> None:
    """Rank 0: one line per step (or resume) in the attempt's progress file, read by the
    driver for its live progress and kept as the run's loss curve."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as err:  # progress only: never worth a failed step (the loss is printed in the log too)
        print(f"train: could not write the progress file {path}: {err}", flush=True)


def _records(lines: list[str]):
    """The progress file's records; a line cut short by a kill is skipped."""
    for line in lines:
        try:
            yield json.loads(line)
        except ValueError:
            continue


def read_steps(path: Path) -> tuple[list[dict], list[int]]:
    """(one record per step, the latest of repeats after a resume; the steps resumed from)."""
    steps: dict[int, dict] = {}
    resumed = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return [], []
    for rec in _records(lines):
        if "resumed" in rec:
            resumed.append(int(rec["resumed"]))
        elif "step" in rec:
            steps[int(rec["step"])] = rec
    return [steps[k] for k in sorted(steps)], resumed


class StepWatch:
    """The driver's view of a training while Ray Train runs it: rank 0's progress file,
    read every second, shown as the training's progress (one line per step on a terminal)."""

    def __init__(self, path: Path, steps: int, log):
        from s2d_ray.console import Console, progress

        self.path, self.steps, self.log = path, steps, log
        self.per_step = isinstance(log, Console) and log.tty
        self.tracker = progress(log, "train", steps, "steps")
        # Only what this command's training writes (an earlier, interrupted one wrote the rest).
        self._offset = path.stat().st_size if path.exists() else 0
        self._stop = None

    def __enter__(self) -> "StepWatch":
        import threading

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()
        self.tracker.close()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.poll()

    def poll(self) -> None:
        try:
            with open(self.path, encoding="utf-8") as f:
                f.seek(self._offset)
                chunk = f.read()
        except OSError:
            return
        whole = chunk[: chunk.rfind("\n") + 1]
        self._offset += len(whole.encode("utf-8"))
        for rec in _records(whole.splitlines()):
            if "resumed" in rec:
                self.log(f"train: resumed from the checkpoint of step {rec['resumed']} of {rec['steps']}")
                self.tracker.base = int(rec["resumed"])  # the ETA counts only this command's steps
                continue
            rate = rec["tokens"] / max(rec["seconds"], 1e-9)
            status = f"loss {rec['loss']:.4f}, {rate:,.0f} tok/s/worker (padding {rec['padding']:.0%})"
            if self.per_step:
                self.log(f"train step {rec['step']}/{self.steps}: {status}")
            self.tracker.update(rec["step"], status)

