"""One stage's generation, driven from the driver: what is left to do, the pipeline's
blocks written as parts, progress, the budget, and engine deaths."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pyarrow as pa

from s2d_ray.console import progress
from s2d_ray.generation.dataset import batch_rows, generation_dataset
from s2d_ray.generation.health import EngineFailed, engine_failure, engine_health
from s2d_ray.generation.parts import compact, finished_ids, tokens_in, uniform_types
from s2d_ray.generation.stage import EngineStage, batch_job
from s2d_ray.placement import release_engine_groups
from s2d_ray.rundir import read_parts, write_part
from s2d_ray.tasks import Example


def run_passes(examples: list[Example], stage: EngineStage, out_dir: Path, *, budget=None, log=print,
               also: list[tuple[list[Example], EngineStage, Path]] = (), title: str = "engines",
               cost=None) -> dict:  # fmt: skip
    """Generate every example not yet in `out_dir`; returns what this call did.

    Progress (inputs done, kept so far, tokens/s, ETA, and `cost(seconds)`'s text if
    given) is shown as `title` where `log` is a Console.

    `budget(tokens, seconds)`, if given, is asked after every written part (tokens: all
    generated so far in `out_dir`, seconds: this call's) and returns a reason to stop
    or None; generation then stops cleanly, keeping every part already written.

    `also`: (examples, stage, folder) run by the same engines in the same pipeline, their
    rows written to their own folders; `also_complete` says which of them finished."""
    import ray

    done = finished_ids(out_dir)
    todo = [e for e in examples if e.id not in done]
    extra = [([e for e in ex if e.id not in finished_ids(folder)], st, folder) for ex, st, folder in also]
    if done:
        log(f"resuming: {len(done)} inputs already in {out_dir.name}/, {len(todo)} to generate")
    started = time.perf_counter()
    written = 0
    restarts: list[str] = []
    engine = stage.engine
    token_columns = [f"{p.label}_tokens" for p in stage.passes]
    spent = tokens_in(read_parts(out_dir, columns=token_columns), token_columns) if done else 0
    stopped = budget(spent, 0.0) if budget and todo else None
    if (todo or any(t for t, _, _ in extra)) and not stopped:
        tag = uuid.uuid4().hex[:8]
        health = engine_health(engine)
        total = len(todo) + sum(len(t) for t, _, _ in extra)
        others: dict[str, int] = {}
        for t, _, f in extra:
            if t:
                others[f.parent.name] = others.get(f.parent.name, 0) + len(t)
        also_text = ", ".join(f"{n} of {where}/" for where, n in others.items())
        log(f"engines: {len(todo)} inputs" + (f" (and {also_text} with the same engines)" if others else "")
            + f" in batches of {batch_rows(total, engine, stage.batch_scale)}, up to {engine.concurrency[1]} engine(s) holding "
            f"{engine.batches_per_engine} batch(es) each")  # fmt: skip
        ds = generation_dataset(todo, stage, tag=tag, health=health, also=[(t, st) for t, st, _ in extra])
        shown = Shown(progress(log, title, total, "inputs"), cost, started)
        try:
            for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                job = 0
                if "job" in block.column_names:
                    job = batch_job(block.select(["job"]).to_pandas()) if block.num_rows else 0
                    block = block.drop_columns(["job"])
                if job and block.num_rows:
                    write_part(extra[job - 1][2], uniform_types(block))
                    shown.add(block, [f"{p.label}_tokens" for p in extra[job - 1][1].passes])
                    continue
                if block.num_rows:
                    write_part(out_dir, uniform_types(block))
                    written += block.num_rows
                    spent += shown.add(block, token_columns)
                if budget and (stopped := budget(spent, time.perf_counter() - started)):
                    break  # closing the stream shuts the pipeline and its engines down
        except Exception as err:
            failure = engine_failure(health)
            if failure:
                raise EngineFailed(f"{failure}; {written} inputs written this time are kept") from err
            raise
        finally:
            shown.tracker.close()
            if engine.gpus_per_engine > 1:
                release_engine_groups(tag)
        restarts = ray.get(health.restarts.remote())
        if restarts:
            log(f"engines: {len(restarts)} restart(s), batches redone; last: {restarts[-1]}")
    if stopped:
        log(f"budget: {stopped}; stopped with {len(done) + written} of {len(examples)} inputs generated")
    for folder in (out_dir, *(f for _, _, f in also)):  # every part was written here, by this loop
        compact(folder)
    return {
        "generated": written, "skipped": len(done), "seconds": time.perf_counter() - started,
        "tokens": spent, "budget_stop": stopped, "engine_restarts": restarts,
        "also_complete": [not stopped and finished_ids(f) >= {e.id for e in ex} for ex, _, f in also],
    }  # fmt: skip


class Shown:
    """What a generation's progress shows, from the blocks as they are written."""

    def __init__(self, tracker, cost, started: float):
        self.tracker, self.cost, self.started = tracker, cost, started
        self.done = self.kept = self.tokens = 0
        self.voted = False

    def add(self, block: pa.Table, token_columns: list[str]) -> int:
        """Counts a written block; returns its generated tokens."""
        tokens = tokens_in(block, token_columns)
        self.done += block.num_rows
        self.tokens += tokens
        if "kept" in block.column_names:
            self.voted = True
            self.kept += sum(bool(k) for k in block.column("kept").to_pylist())
        seconds = time.perf_counter() - self.started
        status = [f"kept {self.kept}"] if self.voted else []
        status.append(f"{self.tokens / max(seconds, 1e-9):,.0f} tok/s")
        if self.cost is not None:
            status.append(self.cost(seconds))
        self.tracker.update(self.done, ", ".join(status))
        return tokens

