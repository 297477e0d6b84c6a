"""The run directory contract (SPEC section 6) and crash-safe writes into it.

Every file lands by write-to-temp-then-rename, so an interrupted or failed stage
never leaves a half-written result where an earlier good one was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from s2d_ray.errors import S2DError


FILE_MODE = 0o644  # group- and world-readable: run directories live on shared volumes
DIR_MODE = 0o755
LOCK = ".s2d.lock"
# Written by s2d into every run directory it creates, before anything else: a folder is a
# run directory because s2d marked it, never because of the names of what it holds (a
# user's own folder with a model/ in it is not one, and nothing in it is touched).
MARKER = ".s2d-run-directory"


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new entry in `directory` durable (a crash may otherwise lose it)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Temp file, fsync, rename, fsync of the directory: whole or not at all, durably."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root` (a finished temp folder, before it is renamed in)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            if path.is_symlink():
                continue
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished temp directory into place, replacing an older result only now.

    Two renames (final -> .final.old-*, tmp -> final): a kill between them leaves no
    `final` but the old one beside it, which `RunDir.repair` puts back on the next start."""
    fsync_tree(tmp)
    os.chmod(tmp, DIR_MODE)
    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def write_part(directory: Path, table: pa.Table, replacing: Path | None = None) -> Path:
    """Write one Parquet part atomically and durably: a new part, or `replacing` an
    existing one by a rename onto it (a crash leaves the old part or the new, never both)."""
    directory.mkdir(parents=True, exist_ok=True)
    final = replacing or directory / f"part-{uuid.uuid4().hex}.parquet"
    tmp = directory / f".{final.name}.tmp"
    pq.write_table(table, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, FILE_MODE)
    os.replace(tmp, final)
    fsync_dir(directory)
    return final


def quarantine_corrupt_parts(directory: Path, log=print) -> list[Path]:
    """Move aside every part whose Parquet footer cannot be read (a part truncated by a
    full disk or a dead node): its ids then count as not generated and are generated again."""
    moved = []
    for part in sorted(directory.glob("part-*.parquet")) if directory.is_dir() else []:
        try:
            pq.read_metadata(part)
        except Exception as err:  # pyarrow raises several kinds for a damaged file
            aside = directory / ".quarantine" / part.name
            aside.parent.mkdir(exist_ok=True)
            os.replace(part, aside)
            fsync_dir(directory)
            log(f"warning: {part} is damaged ({type(err).__name__}); moved to {aside}, its inputs will be generated again")
            moved.append(aside)
    return moved


def read_parts(directory: Path, columns: list[str] | None = None) -> pa.Table | None:
    """All finished parts of a directory as one table (stale temp files are ignored). A
    part merged away while this read (a stage ending in another process) is read again
    from the listing that holds its merged part."""
    for attempt in range(5):
        parts = sorted(directory.glob("part-*.parquet")) if directory.is_dir() else []
        if not parts:
            return None
        try:
            return pa.concat_tables([pq.read_table(p, columns=columns) for p in parts], promote_options="default")
        except FileNotFoundError:
            if attempt == 4:
                raise
    return None


class RunDirInUse(S2DError):
    """Another s2d process holds the run directory."""


class RunDir:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()

    generate = property(lambda self: self.root / "generate")
    distill = property(lambda self: self.root / "distill")
    model = property(lambda self: self.root / "model")
    eval_dir = property(lambda self: self.root / "eval")
    eval_json = property(lambda self: self.root / "eval.json")
    report_html = property(lambda self: self.root / "report.html")
    run_json = property(lambda self: self.root / "run.json")
    ray_train = property(lambda self: self.root / "ray_train")
    logs = property(lambda self: self.root / "logs")  # one file per command: what Ray, vLLM, DeepSpeed printed

    def create(self) -> "RunDir":
        self.root.mkdir(parents=True, exist_ok=True)
        return self

    def is_ours(self) -> bool:
        """Marked by s2d; or a run directory of an s2d from before the marker: its run.json
        is s2d's (it records s2d-ray's version), and it gets the marker now."""
        if (self.root / MARKER).is_file():
            return True
        try:
            legacy = "s2d-ray" in json.loads(self.run_json.read_text()).get("versions", {})
        except (OSError, ValueError, AttributeError):
            return False
        if legacy:
            self._mark()
        return legacy

    def _mark(self) -> None:
        atomic_write_text(self.root / MARKER, "An s2d-ray run directory (s2d writes here; see its README).\n")

    def check_ours(self) -> None:
        """A non-empty --out that s2d did not mark as its run directory is refused, so that
        nothing of someone else's (a model/ or distill/ of theirs) is replaced or deleted."""
        if not self.root.exists():
            return
        if not self.root.is_dir():
            raise S2DError(f"{self.root}: --out is a file, not a run directory")
        entries = sorted(p.name for p in self.root.iterdir())
        if entries and not self.is_ours():
            raise S2DError(
                f"{self.root} is not empty and not an s2d run directory (it holds {', '.join(entries[:3])}"
                f"{'...' if len(entries) > 3 else ''}); choose a new or empty --out"
            )

    @contextmanager
    def lock(self, command: str = "s2d"):
        """One writer at a time: an exclusive lock on RUN/.s2d.lock for the whole command.

        The kernel drops the lock when its process dies, however it dies, so a lock left
        by a dead process is simply taken over; the file says who holds it."""
        import fcntl
        import socket

        self.check_ours()
        self.create()
        if not (self.root / MARKER).is_file():
            self._mark()  # before anything else is written here
        path = self.root / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
                raise RunDirInUse(f"{self.root} is in use by {holder}; wait for it to end or use another --out") from None
            except OSError as err:  # a shared filesystem mounted without lock support (Lustre without -o flock)
                print(f"warning: {self.root}: no file locks on this filesystem ({err.strerror}); "
                      "nothing stops a second s2d process on this run directory", flush=True)  # fmt: skip
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
            info = f"`s2d {command}` (pid {os.getpid()} on {socket.gethostname()}, since {since})".encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, info, 0)
            self.repair()
            yield self
        finally:
            os.close(fd)  # releases the lock

    STAGE_OUTPUTS = {
        "generate": ("generate", "distill"),
        "train": ("model", "ray_train"),
        "eval": ("eval", "eval.json", "report.html"),
    }

    def restart(self, stages: tuple[str, ...], log=print) -> None:
        """--restart: remove what these stages wrote (under the lock), so they start over."""
        for stage in stages:
            for name in self.STAGE_OUTPUTS[stage]:
                path = self.root / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        if set(stages) == set(self.STAGE_OUTPUTS):
            self.run_json.unlink(missing_ok=True)
        log(f"restart: {', '.join(stages)} start over in {self.root}")

    def repair(self, log=print) -> None:
        """Under the lock, before any stage: finish or undo what an interrupted writer left.

        A replace killed between its two renames left `.<name>.old-*` and no `<name>`: the
        old result goes back. Temp files and folders of interrupted writes are removed.
        Damaged Parquet parts are moved aside (their ids are generated again)."""
        for old in sorted(self.root.glob(".*.old-*")):
            final = self.root / old.name[1:].rsplit(".old-", 1)[0]
            if not final.exists():
                os.replace(old, final)
                log(f"repaired: {final.name}/ restored from an interrupted replace")
            else:
                shutil.rmtree(old, ignore_errors=True)
        leftovers = list(self.root.glob(".*.tmp"))  # run.json, eval.json, report.html, .distill.tmp
        for sub in (self.generate, self.distill, self.eval_dir):
            if sub.is_dir():
                leftovers += [p for p in sub.iterdir() if p.name.startswith(".") and p.name != ".quarantine"]
        for path in leftovers:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        quarantine_corrupt_parts(self.generate, log)
        if self.root.exists():
            fsync_dir(self.root)

    def read_run(self) -> dict[str, Any]:
        if not self.run_json.exists():
            return {}
        return json.loads(self.run_json.read_text())

    def update_run(self, **sections: Any) -> dict[str, Any]:
        """Merge top-level sections into run.json (stages are merged by name)."""
        data = self.read_run()
        for key, value in sections.items():
            if key == "stages":
                data.setdefault("stages", {}).update(value)
            else:
                data[key] = value
        atomic_write_json(self.run_json, data)
        return data

    def model_ready(self) -> bool:
        return (self.model / "config.json").exists() and any(self.model.glob("*.safetensors"))
