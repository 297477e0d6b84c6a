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

from s2d_ray.config import EngineConfig, FilterConfig
from s2d_ray.engine import CPU_ENGINE_ENV, GPU_ENGINE_ENV
from s2d_ray.filters import Vote, adaptive_vote, first_round, majority_vote, no_filter, swap_vote, usc_vote
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
    # Run on the task's perturbed inputs (A/B swapped); answers are stored mapped back.
    perturbed: bool = False
    # "usc": after sampling, the model picks the most consistent response.
    select: str | None = None
    usc_fallback: int = 10
    usc_max_tokens: int = 24
    # Adaptive voting: (min_agreement, confidence, round_size); None samples N at once.
    adaptive: tuple[float, float | None, int] | None = None


class GeneratorActor:
    """Hosts one vLLM engine; runs whole multi-step programs on batches of inputs."""

    def __init__(self, model_path: str, engine: EngineConfig, dtype: str, seed: int, task: Task, passes):
        from s2d_ray.engine import Engine

        self.engine = Engine(model_path, engine, dtype=dtype, seed=seed)
        self.max_model_len = engine.max_model_len
        self.task = task
        self.passes = passes

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return run_batch(self.engine, self.task, self.passes, batch, self.max_model_len)

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


def run_batch(engine, task: Task, passes: list[Pass], batch: pd.DataFrame, max_model_len: int) -> pd.DataFrame:
    """Every pass over one batch of input rows; adds the pass's columns."""
    from s2d_ray.methods.runner import run_program, run_rounds, usc_select

    originals = [
        {"format": task.answer_format, **json.loads(f), "question": q} for f, q in zip(batch["fields"], batch["input"])
    ]
    out = batch.copy()
    for p in passes:
        started = time.perf_counter()
        inputs = [task.perturb(v) for v in originals] if p.perturbed else originals
        sampling = dict(temperature=p.temperature, top_p=p.top_p, max_tokens=p.max_tokens)
        if p.adaptive is not None:
            min_agreement, confidence, round_size = p.adaptive

            def decided(samples) -> bool:
                answers = [task.extract(s.final) for s in samples]
                return adaptive_vote(answers, p.samples, min_agreement, confidence) is not None

            results = run_rounds(
                engine, p.program, inputs, n_max=p.samples, first=first_round(p.samples, confidence),
                round_size=round_size, decided=decided, **sampling,
            )  # fmt: skip
        else:
            results = run_program(engine, p.program, inputs, samples=p.samples, **sampling)
        answers = [[task.extract(s.final) for s in samples] for samples in results]
        if p.perturbed:
            answers = [[task.unperturb(a) for a in row] for row in answers]
        out[f"{p.label}_outputs"] = [[s.final for s in samples] for samples in results]
        out[f"{p.label}_answers"] = answers
        out[f"{p.label}_samples"] = [len(samples) for samples in results]
        for step in p.program.step_names:
            out[f"{p.label}_tokens_{step}"] = [sum(s.tokens[step] for s in samples) for samples in results]
        tokens = [sum(sum(s.tokens.values()) for s in samples) for samples in results]
        if p.select == "usc":
            chosen = usc_select(
                engine, list(batch["id"]), [v["question"] for v in inputs], results,
                max_tokens=p.usc_max_tokens, max_model_len=max_model_len, fallback_shown=p.usc_fallback,
            )  # fmt: skip
            out[f"{p.label}_selected"] = [c.index for c in chosen]
            out[f"{p.label}_selected_how"] = [c.how for c in chosen]
            out[f"{p.label}_tokens_usc"] = [c.tokens for c in chosen]
            tokens = [t + c.tokens for t, c in zip(tokens, chosen)]
        out[f"{p.label}_tokens"] = tokens
        out[f"{p.label}_seconds"] = (time.perf_counter() - started) / max(len(batch), 1)
    return out


def vote_row(row: dict, label: str, filt: FilterConfig) -> Vote:
    """The configured filter over one input's samples (columns written by `run_batch`)."""
    answers = list(row[f"{label}_answers"])
    if filt.name == "usc":
        return usc_vote(answers, int(row[f"{label}_selected"]), row[f"{label}_selected_how"])
    if filt.name == "swap":
        return swap_vote(answers, list(row[f"{label}_swapped_answers"]))
    if filt.name == "none":
        return no_filter(answers)
    if filt.adaptive:
        vote = adaptive_vote(answers, filt.samples, filt.min_agreement, filt.confidence)
        if vote is not None:
            return vote
    return majority_vote(answers, filt.min_agreement)


def vote_batch(batch: pd.DataFrame, label: str, filt: FilterConfig, task: Task) -> pd.DataFrame:
    """The consistency-voting stage: a pure function of each row's sampled answers."""
    votes = [vote_row(row, label, filt) for row in batch.to_dict("records")]
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
        {"id": e.id, "input": e.question, "answer": e.answer, "group": e.group, "fields": json.dumps(e.fields)}
        for e in examples
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
