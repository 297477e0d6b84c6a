"""The run directory survives faults and second processes: one writer at a time, foreign
folders refused, every write durable, interrupted writes repaired or cleaned up."""

import os
import subprocess
import sys
import textwrap

import pyarrow as pa
import pytest

from s2d_ray import rundir
from s2d_ray.errors import S2DError
from s2d_ray.rundir import RunDir, RunDirInUse, atomic_write_json, read_parts, replace_dir, write_part
from tests.conftest import ROOT, S2D

HOLD = textwrap.dedent(
    """
    import sys, time
    from s2d_ray.rundir import RunDir
    with RunDir(sys.argv[1]).lock("generate"):
        print("locked", flush=True)
        time.sleep(float(sys.argv[2]))
    """
)


def test_a_second_writer_is_refused_with_the_holder_named(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path), "30"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirInUse, match=rf"in use by `s2d generate` \(pid {holder.pid} on "):
            with RunDir(tmp_path).lock("run"):
                pass
        # The command: one line, exit 1, before anything starts.
        job = ROOT / "jobs" / "local" / "last-letter-rar2.yaml"
        second = subprocess.run([*S2D, "generate", str(job), "--out", str(tmp_path)], capture_output=True, text=True,
                                cwd=ROOT, timeout=120)  # fmt: skip
        assert second.returncode == 1 and f"in use by `s2d generate` (pid {holder.pid} on " in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1, second.stderr
    finally:
        holder.kill()
        holder.wait()
    # The holder died without cleaning up: its lock is taken over.
    with RunDir(tmp_path).lock("run"):
        assert f"pid {os.getpid()}" in (tmp_path / ".s2d.lock").read_text()


def test_a_foreign_folder_is_refused_and_left_alone(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "thesis.tex").write_text("mine")
    with pytest.raises(S2DError, match="not an s2d run directory"):
        with RunDir(tmp_path).lock("run"):
            pass
    assert (tmp_path / "model").is_dir() and (tmp_path / "thesis.tex").read_text() == "mine"
    assert not (tmp_path / ".s2d.lock").exists()


def test_a_run_directory_is_known_by_the_marker_s2d_wrote_not_by_names(tmp_path):
    from s2d_ray.rundir import MARKER

    # A user's folder whose every entry has a run-directory name is still not ours.
    mine = tmp_path / "mine"
    (mine / "model").mkdir(parents=True)
    (mine / "model" / "config.json").write_text("{}")
    with pytest.raises(S2DError, match="not an s2d run directory"):
        with RunDir(mine).lock("run"):
            pass
    assert (mine / "model" / "config.json").read_text() == "{}" and sorted(p.name for p in mine.iterdir()) == ["model"]
    # A new or empty folder becomes one: marked before anything else is written there.
    fresh = tmp_path / "fresh"
    with RunDir(fresh).lock("run"):
        assert (fresh / MARKER).is_file()
    (fresh / "model").mkdir()
    with RunDir(fresh).lock("train"):  # marked: ours, whatever it holds
        pass
    # A run directory of an s2d from before the marker: its run.json records s2d-ray's version.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "run.json").write_text('{"versions": {"s2d-ray": "0.1.0"}}')
    with RunDir(legacy).lock("eval"):
        pass
    assert (legacy / MARKER).is_file()
    # A run.json of someone else's is not enough.
    other = tmp_path / "other"
    other.mkdir()
    (other / "run.json").write_text('{"epochs": 3}')
    with pytest.raises(S2DError, match="not an s2d run directory"):
        with RunDir(other).lock("run"):
            pass


def test_every_write_is_fsynced_and_group_readable(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(rundir.os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    atomic_write_json(tmp_path / "run.json", {"a": 1})
    assert len(synced) == 2  # the file, then its directory
    synced.clear()
    part = write_part(tmp_path / "generate", pa.table({"id": ["x"]}))
    assert len(synced) == 2
    assert (tmp_path / "run.json").stat().st_mode & 0o777 == 0o644 and part.stat().st_mode & 0o777 == 0o644


def test_an_interrupted_replace_is_repaired_and_leftovers_removed(tmp_path):
    run = RunDir(tmp_path).create()
    (tmp_path / "run.json").write_text('{"versions": {"s2d-ray": "0.1.0"}}')
    old = tmp_path / ".model.old-1234abcd"  # killed between replace_dir's two renames
    old.mkdir()
    (old / "config.json").write_text("{}")
    write_part(run.generate, pa.table({"id": ["a"]}))
    (run.generate / ".part-0.parquet.tmp").write_bytes(b"half")
    (tmp_path / ".distill.tmp").mkdir()
    (tmp_path / ".eval.json.x.tmp").write_text("{")
    with run.lock("run"):
        pass
    assert (tmp_path / "model" / "config.json").exists() and not old.exists()
    assert not list(tmp_path.glob(".*.tmp")) and not list(run.generate.glob(".*"))
    assert read_parts(run.generate).num_rows == 1


def test_a_truncated_part_is_moved_aside_and_its_ids_count_as_not_done(tmp_path, capsys):
    run = RunDir(tmp_path).create()
    (tmp_path / "run.json").write_text('{"versions": {"s2d-ray": "0.1.0"}}')
    good = write_part(run.generate, pa.table({"id": ["a"]}))
    bad = write_part(run.generate, pa.table({"id": ["b"]}))
    bad.write_bytes(bad.read_bytes()[:20])  # a full disk or a dead node cut it short
    with run.lock("generate"):
        pass
    assert read_parts(run.generate).column("id").to_pylist() == ["a"] and good.exists()
    assert (run.generate / ".quarantine" / bad.name).exists()
    assert "damaged" in capsys.readouterr().out


def test_replace_dir_keeps_the_old_result_until_the_new_one_is_whole(tmp_path):
    final = tmp_path / "distill"
    write_part(final, pa.table({"id": ["old"]}))
    tmp = tmp_path / ".distill.tmp"
    write_part(tmp, pa.table({"id": ["new"]}))
    replace_dir(tmp, final)
    assert read_parts(final).column("id").to_pylist() == ["new"] and not tmp.exists()
    assert not list(tmp_path.glob(".distill.old-*"))


def test_a_retried_streaming_write_adds_no_row_twice(tmp_path):
    from s2d_ray.generation import PartWriter

    block = pa.table({"id": ["a", "b"], "x": [1, 2]})
    writer = PartWriter(str(tmp_path))
    assert writer.write(block) == 2
    assert writer.write(block) == 0  # the same block again: Ray Data retried the task
    assert PartWriter(str(tmp_path)).write(pa.table({"id": ["b", "c"], "x": [2, 3]})) == 1  # a new writer knows too
    assert sorted(read_parts(tmp_path).column("id").to_pylist()) == ["a", "b", "c"]


def test_retry_failed_takes_failed_inputs_out_of_their_part(tmp_path):
    from s2d_ray.generation import drop_failed, finished_ids

    part = write_part(tmp_path, pa.table({"id": ["a", "b", "c"], "system2_failure": [None, "respond: prompt of 900 tokens", None]}))
    write_part(tmp_path, pa.table({"id": ["d"], "system2_failure": pa.array([None], pa.string())}))
    assert drop_failed(tmp_path) == 1
    assert finished_ids(tmp_path) == {"a", "c", "d"} and part.exists()  # rewritten in place
    assert drop_failed(tmp_path) == 0 and not list(tmp_path.glob(".*"))


def test_retry_failed_also_takes_inputs_whose_swapped_pass_failed(tmp_path):
    from s2d_ray.generation import drop_failed, finished_ids

    write_part(tmp_path, pa.table({
        "id": ["a", "b"], "system2_failure": pa.array([None, None], pa.string()),
        "system2_swapped_failure": [None, "merge: prompt of 5000 tokens"],
    }))  # fmt: skip
    assert drop_failed(tmp_path) == 1 and finished_ids(tmp_path) == {"a"}


def test_a_finished_export_counts_only_when_every_shard_is_whole(tmp_path):
    import torch

    from s2d_ray.training import TRAIN_STATE, finished_export
    from s2d_ray.training.export import ShardWriter

    folder = tmp_path / "checkpoint_2026-01-01_00-00-00.000000"
    folder.mkdir()
    writer = ShardWriter(folder, shard_bytes=64)
    writer.add_module({"a": torch.zeros(16)})
    writer.add_module({"b": torch.zeros(16)})
    files = writer.close()
    (folder / "config.json").write_text("{}")
    (folder / TRAIN_STATE).write_text('{"final": true}')
    assert finished_export(tmp_path) == folder
    files[1].write_bytes(files[1].read_bytes()[:-8])  # an upload cut short
    assert finished_export(tmp_path) is None


def test_a_finished_stages_small_parts_are_merged_and_no_row_is_lost_or_doubled(tmp_path, monkeypatch):
    from s2d_ray.generation import parts

    monkeypatch.setattr(parts, "COMPACT_ROWS", 64)
    big = write_part(tmp_path, pa.table({"id": [f"big{i}" for i in range(40)], "x": [str(i) for i in range(40)]}))
    for p in range(30):  # blocks of 5 rows; one's answers all missing (typed null), one with a column of its own
        x = pa.array([None] * 5, pa.null()) if p == 3 else [str(i) for i in range(5)]
        extra = {"note": ["n"] * 5} if p == 7 else {}
        write_part(tmp_path, parts.uniform_types(pa.table({"id": [f"r{p}-{i}" for i in range(5)], "x": x, **extra})))
    before = {r["id"]: r for r in parts.load_results(tmp_path).to_pylist()}
    assert parts.compact(tmp_path) == 30
    files = sorted(tmp_path.glob("part-*.parquet"))
    assert len(files) == 4 and big in files  # 150 rows in parts of at most 64; the big part left as it was
    after = parts.load_results(tmp_path)
    assert after.num_rows == len(before) == 190
    assert {r["id"]: r for r in after.to_pylist()} == before
    assert parts.compact(tmp_path) == 0 and not list(tmp_path.glob(".*"))
    # A crash between writing a merged part and removing its sources: ids twice on disk,
    # once to every reader, and the next merge keeps one copy.
    for p in range(3):
        write_part(tmp_path, pa.table({"id": [f"late{p}"], "x": [str(p)]}))
    real = type(big).unlink
    monkeypatch.setattr(type(big), "unlink", lambda self, *a: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError):
        parts.compact(tmp_path)
    monkeypatch.setattr(type(big), "unlink", real)
    assert read_parts(tmp_path).num_rows > 193 and parts.load_results(tmp_path).num_rows == 193
    assert len(parts.finished_ids(tmp_path)) == 193
    parts.compact(tmp_path)
    assert read_parts(tmp_path).num_rows == 193 and parts.load_results(tmp_path).num_rows == 193
