"""A generation folder's Parquet parts: which ids are done (resume), failed inputs taken
out for a retry, every part read back one row per id, and uniform column types."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from s2d_ray.rundir import read_parts, write_part


def finished_ids(out_dir: Path) -> set[str]:
    table = read_parts(out_dir, columns=["id"])
    return set(table.column("id").to_pylist()) if table is not None else set()


def drop_failed(out_dir: Path, label: str = "system2") -> int:
    """--retry-failed: take the inputs recorded as failed out of their parts, so that they
    count as not generated. Each part is rewritten whole and renamed onto itself."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    dropped = 0
    for part in sorted(out_dir.glob("part-*.parquet")) if out_dir.is_dir() else []:
        table = pq.read_table(part)
        columns = [c for c in table.column_names if c.startswith(label) and c.endswith("_failure")]  # swapped pass too
        if not columns:
            continue
        failed = pc.is_valid(table.column(columns[0]))
        for c in columns[1:]:
            failed = pc.or_(failed, pc.is_valid(table.column(c)))
        n = pc.sum(failed).as_py() or 0
        if not n:
            continue
        write_part(out_dir, table.filter(pc.invert(failed)), replacing=part)
        dropped += n
    return dropped


def load_results(out_dir: Path) -> pa.Table | None:
    """All parts of a generation folder, one row per id (first copy wins, defensively)."""
    table = read_parts(out_dir)
    if table is None:
        return None
    ids = table.column("id").to_pylist()
    seen: set[str] = set()
    keep = [i for i, x in enumerate(ids) if not (x in seen or seen.add(x))]
    return table.take(keep) if len(keep) != len(ids) else table


def tokens_in(table: pa.Table | None, columns: list[str]) -> int:
    if table is None:
        return 0
    return int(sum(sum(v or 0 for v in table.column(c).to_pylist()) for c in columns if c in table.column_names))


def text_types(t: pa.DataType) -> pa.DataType:
    if pa.types.is_null(t) or pa.types.is_large_string(t):
        return pa.string()
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return pa.list_(text_types(t.value_type))
    return t


def uniform_types(block: pa.Table) -> pa.Table:
    """Same column types in every part, so `pq.read_table("generate/")` reads them all
    (a block whose answers are all missing would otherwise be typed `null`)."""
    return block.cast(pa.schema([pa.field(f.name, text_types(f.type)) for f in block.schema]))

