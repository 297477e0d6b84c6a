"""A generation folder's Parquet parts: which ids are done (resume), failed inputs taken
out for a retry, every part read back one row per id, uniform column types, and the
small parts of a finished stage merged into few."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from s2d_ray.rundir import fsync_dir, read_parts, write_part

# A finished stage's parts (one per block: ~16 rows) are merged into parts of up to this
# many rows or uncompressed bytes: 50k inputs are then ~7 files, not ~3,000, and every
# later scan (a rerun, --retry-failed, evaluation, the report) opens those few.
COMPACT_ROWS = 8192
COMPACT_BYTES = 256 * 2**20


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


def compact(out_dir: Path) -> int:
    """Merge the folder's small parts (under half of COMPACT_ROWS and COMPACT_BYTES) into
    parts of up to COMPACT_ROWS rows; returns how many parts were merged away. Run at a
    stage's end; a writer still at work is harmless (a part appears whole, by a rename, and
    only the parts listed here are merged). A merged part is written durably before its
    sources are removed, and holds no id that an earlier part holds: a crash in between
    leaves ids in two parts, which every reader takes once, and the next merge drops the
    second copy; no row is lost."""
    import pyarrow.parquet as pq

    ids = lambda part: pq.read_table(part, columns=["id"]).column("id").to_pylist()  # noqa: E731
    whole, groups, rows, size = [], [[]], 0, 0
    for part in sorted(out_dir.glob("part-*.parquet")) if out_dir.is_dir() else []:
        meta = pq.read_metadata(part)
        nbytes = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        if meta.num_rows >= COMPACT_ROWS // 2 or nbytes >= COMPACT_BYTES // 2:
            whole.append(part)
            continue
        if groups[-1] and (rows + meta.num_rows > COMPACT_ROWS or size + nbytes > COMPACT_BYTES):
            groups.append([])
            rows, size = 0, 0
        groups[-1].append(part)
        rows, size = rows + meta.num_rows, size + nbytes
    seen: set[str] = {i for part in whole for i in ids(part)}
    merged = 0
    for group in filter(None, groups):
        alone = ids(group[0]) if len(group) == 1 else None
        if alone is not None and seen.isdisjoint(alone):  # nothing to merge it with, no copy to drop
            seen.update(alone)
            continue
        table = unseen(pa.concat_tables([pq.read_table(p) for p in group], promote_options="default"), seen)
        if table.num_rows:
            write_part(out_dir, uniform_types(table))
        seen.update(table.column("id").to_pylist())
        for part in group:
            part.unlink()
        fsync_dir(out_dir)
        merged += len(group)
    return merged


def unseen(table: pa.Table, seen: set[str] = frozenset()) -> pa.Table:
    """`table`'s rows whose id is not in `seen`, the first copy of each id only; `seen` is
    left as it is (the caller adds the ids once their rows are safely written). Linear in
    the rows of `table`, whatever the size of `seen`."""
    ids = table.column("id").to_pylist()
    here: set[str] = set()
    keep = [i for i, x in enumerate(ids) if x not in seen and not (x in here or here.add(x))]
    return table.take(pa.array(keep, pa.int64())) if len(keep) != len(ids) else table


def load_results(out_dir: Path) -> pa.Table | None:
    """All parts of a generation folder, one row per id (first copy wins, defensively)."""
    table = read_parts(out_dir)
    return None if table is None else unseen(table)


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

