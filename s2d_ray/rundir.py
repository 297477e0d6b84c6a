"""The run directory contract (SPEC section 6) and crash-safe writes into it.

Every file lands by write-to-temp-then-rename, so an interrupted or failed stage
never leaves a half-written result where an earlier good one was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished temp directory into place, replacing an older result only now."""
    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_part(directory: Path, table: pa.Table) -> Path:
    """Write one Parquet part atomically; parts are never rewritten."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"part-{uuid.uuid4().hex}.parquet"
    tmp = directory / f".{final.name}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, final)
    return final


def read_parts(directory: Path, columns: list[str] | None = None) -> pa.Table | None:
    """All finished parts of a directory as one table (stale temp files are ignored)."""
    parts = sorted(directory.glob("part-*.parquet")) if directory.is_dir() else []
    if not parts:
        return None
    return pa.concat_tables([pq.read_table(p, columns=columns) for p in parts], promote_options="default")


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

    def create(self) -> "RunDir":
        self.root.mkdir(parents=True, exist_ok=True)
        return self

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
