"""System 2 generation at scale: inputs -> generator actor pool -> vote -> Parquet parts.

Ray Data streams the inputs through an autoscaling pool of `GeneratorActor`s (one
vLLM engine each) and then through the voting stage; the driver writes every
finished block as one Parquet part, atomically. A rerun reads the ids already in
the output folder and only generates the rest, so each id lands exactly once.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa

from s2d_ray.config import EngineConfig
from s2d_ray.engine import CPU_ENGINE_ENV, GPU_ENGINE_ENV
from s2d_ray.filters import apply_filter
from s2d_ray.methods import Program
from s2d_ray.rundir import read_parts, write_part
from s2d_ray.tasks import Example, Task


@dataclass(frozen=True)
class Pass:
    """One program run over every input, its outputs stored under `label`_* columns."""

    label: str
    program: Program
    samples: int
    temperature: float
    top_p: float
    max_tokens: int


class GeneratorActor:
    """Hosts one vLLM engine; runs whole multi-step programs on batches of inputs."""

    def __init__(self, model_path: str, engine: EngineConfig, dtype: str, seed: int, task: Task, passes):
        from s2d_ray.engine import Engine

        self.engine = Engine(model_path, engine, dtype=dtype, seed=seed)
        self.task = task
        self.passes = passes

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from s2d_ray.methods.runner import run_program

        inputs = [{**json.loads(f), "question": q} for f, q in zip(batch["fields"], batch["input"])]
        out = batch.copy()
        for p in self.passes:
            started = time.perf_counter()
            results = run_program(
                self.engine,
                p.program,
                inputs,
                samples=p.samples,
                temperature=p.temperature,
                top_p=p.top_p,
                max_tokens=p.max_tokens,
            )
            out[f"{p.label}_outputs"] = [[s.final for s in samples] for samples in results]
            out[f"{p.label}_answers"] = [[self.task.extract(s.final) for s in samples] for samples in results]
            out[f"{p.label}_tokens"] = [sum(sum(s.tokens.values()) for s in samples) for samples in results]
            for step in p.program.step_names:
                out[f"{p.label}_tokens_{step}"] = [sum(s.tokens[step] for s in samples) for samples in results]
            out[f"{p.label}_seconds"] = (time.perf_counter() - started) / max(len(batch), 1)
        return out

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


def vote_batch(batch: pd.DataFrame, label: str, filter_name: str, min_agreement: float, task: Task) -> pd.DataFrame:
    """The consistency-voting stage: a pure function of each row's sampled answers."""
    votes = [apply_filter(filter_name, list(a), min_agreement) for a in batch[f"{label}_answers"]]
    out = batch.copy()
    out["vote_answer"] = [v.answer for v in votes]
    out["vote_count"] = [v.count for v in votes]
    out["vote_total"] = [v.total for v in votes]
    out["agreement"] = [v.agreement for v in votes]
    out["kept"] = [v.kept for v in votes]
    out["vote_reason"] = [v.reason for v in votes]
    out["vote_counts"] = [json.dumps(v.counts, sort_keys=True) for v in votes]
    out["target"] = [task.target(v.answer) if v.kept else None for v in votes]
    return out


def engine_remote_args(cfg: EngineConfig) -> dict:
    """Ray resources of one generator actor: its CPUs, and its GPUs on a cluster.

    A single-GPU engine asks for the GPU directly. A tensor/pipeline-parallel engine
    gets its own placement group (one bundle per GPU; packed on one node unless
    pipeline parallel spreads it), and vLLM's Ray executor starts its GPU workers
    inside that group.
    """
    env = dict(CPU_ENGINE_ENV if cfg.device == "cpu" else GPU_ENGINE_ENV)
    if cfg.device == "cpu":
        # Ray sets OMP_NUM_THREADS=num_cpus (rounded down); say it explicitly.
        env["OMP_NUM_THREADS"] = str(max(1, int(cfg.cpus_per_engine)))
        return {"num_cpus": cfg.cpus_per_engine, "runtime_env": {"env_vars": env}}
    if cfg.gpus_per_engine == 1:
        return {"num_cpus": cfg.cpus_per_engine, "num_gpus": 1, "runtime_env": {"env_vars": env}}

    def placement() -> dict:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundles = [{"GPU": 1, "CPU": cfg.cpus_per_engine}] + [{"GPU": 1}] * (cfg.gpus_per_engine - 1)
        strategy = "STRICT_PACK" if cfg.pipeline_parallel == 1 else "PACK"
        pg = ray.util.placement_group(bundles, strategy=strategy)
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_capture_child_tasks=True)}

    return {"num_cpus": cfg.cpus_per_engine, "ray_remote_args_fn": placement, "runtime_env": {"env_vars": env}}


def finished_ids(out_dir: Path) -> set[str]:
    table = read_parts(out_dir, columns=["id"])
    return set(table.column("id").to_pylist()) if table is not None else set()


def _rows(examples: list[Example]) -> list[dict]:
    return [
        {"id": e.id, "input": e.question, "answer": e.answer, "fields": json.dumps(e.fields)} for e in examples
    ]


def run_passes(
    examples: list[Example],
    passes: list[Pass],
    *,
    task: Task,
    model_path: str,
    engine: EngineConfig,
    dtype: str,
    seed: int,
    out_dir: Path,
    vote: dict | None = None,
    log=print,
) -> dict:
    """Generate every example not yet in `out_dir`; returns what this call did."""
    import ray

    done = finished_ids(out_dir)
    todo = [e for e in examples if e.id not in done]
    if done:
        log(f"resuming: {len(done)} inputs already in {out_dir.name}/, {len(todo)} to generate")
    started = time.perf_counter()
    written = 0
    if todo:
        lo, hi = engine.concurrency
        args = engine_remote_args(engine)
        ds = ray.data.from_items(_rows(todo), override_num_blocks=math.ceil(len(todo) / engine.batch_size))
        ds = ds.map_batches(
            GeneratorActor,
            fn_constructor_kwargs=dict(
                model_path=str(model_path), engine=engine, dtype=dtype, seed=seed, task=task, passes=passes
            ),
            batch_size=engine.batch_size,
            batch_format="pandas",
            compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
            **args,
        )
        if vote is not None:
            # Voting is cheap bookkeeping: it must never wait for a CPU the engines hold.
            ds = ds.map_batches(vote_batch, fn_kwargs={**vote, "task": task}, batch_format="pandas", num_cpus=0)
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            if block.num_rows:
                write_part(out_dir, _uniform(block))
                written += block.num_rows
    return {"generated": written, "skipped": len(done), "seconds": time.perf_counter() - started}


def _text(t: pa.DataType) -> pa.DataType:
    if pa.types.is_null(t) or pa.types.is_large_string(t):
        return pa.string()
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return pa.list_(_text(t.value_type))
    return t


def _uniform(block: pa.Table) -> pa.Table:
    """Same column types in every part, so `pq.read_table("generate/")` reads them all
    (a block whose answers are all missing would otherwise be typed `null`)."""
    return block.cast(pa.schema([pa.field(f.name, _text(f.type)) for f in block.schema]))


def load_results(out_dir: Path) -> pa.Table | None:
    """All parts of a generation folder, one row per id (first copy wins, defensively)."""
    table = read_parts(out_dir)
    if table is None:
        return None
    ids = table.column("id").to_pylist()
    seen: set[str] = set()
    keep = [i for i, x in enumerate(ids) if not (x in seen or seen.add(x))]
    return table.take(keep) if len(keep) != len(ids) else table
