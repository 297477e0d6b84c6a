"""Reading task data from local files: JSONL, Parquet, or a `datasets` folder saved to disk.

Nothing here touches the network. Every failure is one line naming the file and,
for a bad record, the record and the field.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

from pydantic import field_validator

from s2d_ray.errors import DataError
from s2d_ray.tasks.base import SPLITS, Example, Task

# Split names a `DatasetDict` folder may use for ours.
_SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "val", "dev"), "test": ("test",)}


def resolve_path(path: str) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(path)))


def read_records(path: str, split: str = "train") -> list[dict]:
    """All records of a JSONL / JSON-array / Parquet file or a `datasets` folder."""
    p = resolve_path(path)
    if "$" in str(p):
        raise DataError(f"{path}: environment variable {str(p)[str(p).index('$'):].split('/')[0]} is not set")
    if not p.exists():
        raise DataError(f"{p}: file not found")
    if p.is_dir():
        return _read_folder(p, split)
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(p)
    if suffix in (".jsonl", ".json", ".ndjson"):
        return _read_json(p)
    raise DataError(f"{p}: unknown data format {suffix or '(no suffix)'}; use .jsonl, .json, .parquet or a datasets folder")


def _read_json(p: Path) -> list[dict]:
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = p.read_bytes()[: err.start].count(b"\n") + 1
        raise DataError(f"{p} line {line}: not UTF-8 text (byte {err.start}); save the file as UTF-8") from None
    except OSError as err:
        raise DataError(f"{p}: cannot read ({err.strerror})") from None
    if p.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{p}: not valid JSON (line {err.lineno})") from None
        return _objects(p, records)
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise DataError(f"{p} line {n}: not valid JSON") from None
    return _objects(p, records)


def _objects(p: Path, records: list) -> list[dict]:
    for n, r in enumerate(records, 1):
        if not isinstance(r, dict):
            raise DataError(f"{p} record {n}: expected a JSON object, got {type(r).__name__}")
    return records


def _read_parquet(p: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(p).to_pylist()
    except Exception as err:  # pyarrow raises several types for a broken file
        raise DataError(f"{p}: not a readable Parquet file ({type(err).__name__})") from None


def _read_arrow_stream(p: Path) -> list[dict]:
    import pyarrow as pa

    try:
        with pa.memory_map(str(p)) as source:
            return pa.ipc.open_stream(source).read_all().to_pylist()
    except Exception as err:
        raise DataError(f"{p}: not a readable Arrow file ({type(err).__name__})") from None


def _read_folder(p: Path, split: str) -> list[dict]:
    """A `Dataset.save_to_disk` folder (state.json + Arrow stream files), a
    `DatasetDict.save_to_disk` folder (dataset_dict.json + one folder per split),
    or a folder of Parquet / JSONL files."""
    if (p / "dataset_dict.json").exists():
        try:
            splits = json.loads((p / "dataset_dict.json").read_text())["splits"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{p / 'dataset_dict.json'}: no 'splits' list") from None
        for name in _SPLIT_ALIASES[split]:
            if name in splits:
                return _read_folder(p / name, split)
        raise DataError(f"{p}: no {split!r} split (has {', '.join(splits)})")
    if (p / "state.json").exists():
        try:
            files = [f["filename"] for f in json.loads((p / "state.json").read_text())["_data_files"]]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{p / 'state.json'}: not a datasets state file (no _data_files)") from None
        return [r for f in files for r in _read_arrow_stream(p / f)]
    files = sorted(p.glob("*.parquet")) or sorted(p.glob("*.jsonl"))
    if not files:
        raise DataError(f"{p}: folder holds no datasets state.json, *.parquet or *.jsonl files")
    return [r for f in files for r in (_read_parquet(f) if f.suffix == ".parquet" else _read_json(f))]


KINDS = {str: "text", list: "a list", dict: "an object", int: "an integer"}


def get(record: dict, dotted: str, where: str, kind: type | None = None) -> Any:
    """record["a"]["b"] for "a.b", or one clear line naming the record and the field.

    With `kind`, the value must be of that type (text also takes a number, as text; an
    integer also takes a string of digits)."""
    node: Any = record
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if node is not None and not isinstance(node, dict):
            raise DataError(f"{where}: field {'.'.join(parts[:i])!r} should be an object, not {type(node).__name__}")
        if part not in node or node[part] is None:
            raise DataError(f"{where}: no field {dotted!r}")
        node = node[part]
    if kind is str and isinstance(node, (int, float)) and not isinstance(node, bool):
        return str(node)
    if kind is int and isinstance(node, str) and node.strip().isdigit():
        return int(node)
    if kind is not None and (not isinstance(node, kind) or isinstance(node, bool)):
        raise DataError(f"{where}: field {dotted!r} should be {KINDS[kind]}, not {type(node).__name__}")
    return node


def record_id(split: str, record: dict, seen: dict[str, int]) -> str:
    """Stable id from the record's content; repeated records get -2, -3, ..."""
    digest = hashlib.sha1(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:12]
    seen[digest] = seen.get(digest, 0) + 1
    return f"{split}-{digest}" + (f"-{seen[digest]}" if seen[digest] > 1 else "")


def known_splits(value: dict) -> dict:
    """A per-split mapping of a task config: every key must name a split."""
    for key in value:
        if key not in SPLITS:
            raise ValueError(f"unknown split {key!r}; splits: {', '.join(SPLITS)}")
    return value


class FileTask(Task):
    """A task whose inputs are records in local files, one file (or folder) per split."""

    # Path per split; `$VARS` and `~` are expanded, so a job file can say $S2D_DATA/gsm8k/train.jsonl.
    data: dict[str, str] = {}
    # At most this many examples per split: a seeded sample, kept in file order.
    limit: dict[str, int] = {}
    seed: int = 0

    @field_validator("data", "limit")
    @classmethod
    def _splits(cls, value: dict):
        return known_splits(value)

    @field_validator("limit")
    @classmethod
    def _positive(cls, value: dict):
        for key, n in value.items():
            if n < 0:
                raise ValueError(f"limit.{key} must be >= 0")
        return value

    def examples(self, split: str) -> list[Example]:
        if split not in self.data:
            raise DataError(f"task.data.{split}: no file given for the {split} split of task {self.name!r}")
        path = self.data[split]
        records = read_records(path, split)
        if not records:
            raise DataError(f"{path}: the {split} split is empty")
        seen: dict[str, int] = {}
        out = []
        for n, record in enumerate(records, 1):
            where = f"{path} record {n}"
            try:
                out.append(self.example(record, self.id_of(record, split, seen, where), where))
            except (TypeError, AttributeError, ValueError, KeyError) as err:  # a type the checks above missed
                raise DataError(f"{where}: a field has an unexpected type ({type(err).__name__}: {err})") from None
        return self.select(out, split)

    def id_of(self, record: dict, split: str, seen: dict, where: str) -> str:
        return record_id(split, record, seen)

    def select(self, examples: list[Example], split: str) -> list[Example]:
        n = self.limit.get(split)
        if n is None or n >= len(examples):
            return examples
        keep = set(random.Random(f"{self.name}-{self.seed}-{split}").sample(range(len(examples)), n))
        return [e for i, e in enumerate(examples) if i in keep]

    def example(self, record: dict, id: str, where: str) -> Example:
        raise NotImplementedError


__all__ = ["FileTask", "get", "known_splits", "read_records", "record_id", "resolve_path"]
