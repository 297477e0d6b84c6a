"""The Ray Data pipeline: inputs -> GeneratorActor pool (autoscaling) -> vote; and the
streaming variant whose voted blocks are written on the driver's node as they finish."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa

from s2d_ray.config import EngineConfig
from s2d_ray.generation.actor import GeneratorActor, engine_env
from s2d_ray.generation.parts import finished_ids, uniform_types, unseen
from s2d_ray.generation.stage import EngineStage
from s2d_ray.generation.vote import DISTILL_SCHEMA, distill_rows
from s2d_ray.placement import engine_remote_args
from s2d_ray.rundir import write_part
from s2d_ray.tasks import Example


def input_rows(examples: list[Example]) -> list[dict]:
    return [
        {"id": e.id, "input": e.question, "answer": e.answer, "group": e.group, "fields": json.dumps(e.fields)}
        for e in examples
    ]


def batch_rows(inputs: int, engine: EngineConfig, scale: int = 1) -> int:
    """Rows per batch: `engine.batch_size` (times a stage's `batch_scale`), or fewer when
    that would leave an engine of the full pool without work: every engine gets at least
    max(2, batches_per_engine) batches of `inputs`."""
    per_engine = max(2, engine.batches_per_engine)
    return max(1, min(engine.batch_size * scale, math.ceil(inputs / (per_engine * engine.concurrency[1]))))


def generation_dataset(todo: list[Example], stage: EngineStage, *, tag: str = "", health=None,
                       also: list[tuple[list[Example], EngineStage]] = ()):  # fmt: skip
    """The lazy Ray Data pipeline: inputs -> GeneratorActor pool (autoscaling min..max),
    whose blocks come back voted.
    `health` (an EngineHealth actor) counts the pool's engine deaths.

    `also`: more stages on the same model and engine settings (base-model evaluation in
    `s2d run`), run by the same engines: their rows carry a `job` column (1, 2, ...), each
    block holds one stage's rows and is one batch."""
    import ray

    engine = stage.engine
    lo, hi = engine.concurrency
    jobs = [(todo, stage), *also]
    total = sum(len(t) for t, _ in jobs)
    size = batch_rows(total, engine, stage.batch_scale)
    if also:
        parts = [
            ray.data.from_items([{**r, "job": j} for r in input_rows(t)],
                                override_num_blocks=math.ceil(len(t) / batch_rows(total, engine, st.batch_scale)))
            for j, (t, st) in enumerate(jobs) if t
        ]  # fmt: skip
        ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    else:
        ds = ray.data.from_items(input_rows(todo), override_num_blocks=math.ceil(len(todo) / size))
    k = engine.batches_per_engine
    ds = ds.map_batches(
        GeneratorActor,
        fn_constructor_kwargs=dict(stage=stage, health=health, also=tuple(s for _, s in also)),
        batch_size=None if also else size,  # with `also`: a block is a batch, one stage's rows
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(
            min_size=lo, max_size=hi, max_concurrent_calls_per_actor=k, enable_true_multi_threading=k > 1,
            # k more batches wait, ready, at each engine; and Ray Data grows the pool only when
            # tasks in flight reach 1.75 x the actors' concurrency: 2k lets it.
            max_tasks_in_flight_per_actor=2 * k,
        ),  # fmt: skip
        **engine_remote_args(engine, engine_env(engine), tag),
    )
    return ds


class PartWriter:
    """Writes generation parts on the driver's node (streaming mode), so generate/ fills
    exactly as in the sequential mode while the trainer reads the same stream.

    Exactly once: Ray Data may retry the task that hands a block over (a lost node), so
    rows whose id is already in generate/ are dropped (one actor, calls in order)."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.written = finished_ids(self.out_dir)

    def write(self, table: pa.Table) -> int:
        new = unseen(table, self.written)
        if new.num_rows:
            write_part(self.out_dir, uniform_types(new))
            self.written.update(new.column("id").to_pylist())
        return new.num_rows


def _write_and_keep(block: pa.Table, writer) -> pa.Table:
    import ray

    if block.num_rows:
        ray.get(writer.write.remote(block))
    return distill_rows(block)


def distillation_stream(todo: list[Example], stage: EngineStage, out_dir: Path, earlier: pa.Table | None, tag: str, health=None):
    """Streaming mode: the generation pipeline whose voted blocks are written to `out_dir`
    as they finish and whose kept rows flow on to the trainer (plus `earlier` kept rows
    of a resumed run). Its engines' placement groups carry `tag` (release them after)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    writer = ray.remote(PartWriter).options(
        num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)
    ).remote(str(out_dir))
    parts = []
    if earlier is not None and earlier.num_rows:
        parts.append(ray.data.from_arrow(earlier))
    if todo:
        ds = generation_dataset(todo, stage, tag=tag, health=health)
        parts.append(ds.map_batches(_write_and_keep, fn_kwargs={"writer": writer}, batch_format="pyarrow", batch_size=None, num_cpus=0))
    if not parts:
        return ray.data.from_arrow(DISTILL_SCHEMA.empty_table())
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]

