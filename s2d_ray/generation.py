"""System 2 generation at scale: inputs -> generator actor pool -> vote -> Parquet parts.

Ray Data streams the inputs through an autoscaling pool of `GeneratorActor`s (one
vLLM engine each) and then through the voting stage; the driver writes every
finished block as one Parquet part, atomically. A rerun reads the ids already in
the output folder and only generates the rest, so each id lands exactly once.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa

from s2d_ray.config import EngineConfig, FilterConfig
from s2d_ray.console import progress
from s2d_ray.engine import CPU_ENGINE_ENV, FAULT_ENV, GPU_ENGINE_ENV
from s2d_ray.errors import S2DError
from s2d_ray.filters import Vote, adaptive_vote, first_round, majority_vote, no_filter, swap_vote, usc_vote
from s2d_ray.methods import Program
from s2d_ray.methods.dataflow import Flow
from s2d_ray.placement import FAKE_GPUS_ENV, engine_remote_args, fake_gpus, release_engine_groups, runs_on_cpu
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
    # Adaptive voting: (min_agreement, confidence, round_size, window); None samples N at once.
    adaptive: tuple[float, float | None, int, int | None] | None = None


@dataclass(frozen=True)
class EngineStage:
    """Everything one stage's engines need, in one object (as a Ray Data LLM stage is
    described by one config): the model, how to run it, the task and the passes, and the
    vote to apply to each generated row (None: rows are written as generated)."""

    model_path: str
    engine: EngineConfig
    dtype: str
    seed: int
    task: Task
    passes: tuple[Pass, ...]
    vote: dict | None = None


class EngineFailed(S2DError):
    """Engines died more often than `engine.max_restarts` allows in one stage."""


class EngineHealth:
    """One per generation stage, on the driver's node: counts engine deaths over every
    actor of the pool and keeps the last reasons, so that a crash loop ends with one line."""

    def __init__(self, max_restarts: int):
        self.max_restarts = max_restarts
        self.reasons: dict[str, str] = {}  # actor id -> why its last process died
        self.deaths: list[str] = []

    def dying(self, actor: str, reason: str) -> None:
        self.reasons[actor] = reason

    def restarted(self, actor: str, node: str) -> str | None:
        """A process of `actor` died and Ray started another: counted. Returns the line to
        fail with when that exceeds the budget."""
        reason = self.reasons.pop(actor, "its process died without a word (killed, out of memory, a crash, "
                                           "or its node was lost; see the actor's log)")  # fmt: skip
        self.deaths.append(f"{reason} (node {node[:8]})")
        return self.failure()

    def restarts(self) -> list[str]:
        return list(self.deaths)

    def failure(self) -> str | None:
        if len(self.deaths) <= self.max_restarts:
            return None
        return (f"engine died {len(self.deaths)} times in this stage (engine.max_restarts {self.max_restarts}); "
                f"last: {self.deaths[-1]}")  # fmt: skip


def engine_health(engine: EngineConfig):
    """The stage's EngineHealth, on the driver's node (it must outlive any engine node)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(EngineHealth).options(num_cpus=0, scheduling_strategy=here).remote(engine.max_restarts)


def engine_failure(health) -> str | None:
    """The stage's engine-death line, if the pool's deaths exceeded the budget."""
    import ray

    try:
        return ray.get(health.failure.remote(), timeout=30)
    except Exception:  # noqa: BLE001 (the original error is raised instead)
        return None


class GeneratorActor:
    """Hosts one vLLM engine; runs whole multi-step programs on batches of inputs.

    An engine that dies (EngineDead) or stalls (no step finished for
    `engine.stall_timeout_s` while it has work) is never used again: the actor's process
    exits, Ray starts the actor again (on the same or another node) and retries its batch.
    Every restart is counted by the stage's `EngineHealth`; past `engine.max_restarts` the
    restarted actor refuses to start and the stage fails with that line."""

    def __init__(self, stage: EngineStage, health=None, also: tuple[EngineStage, ...] = ()):
        import ray

        from s2d_ray.engine import Engine
        from s2d_ray.placement import pin_assigned_gpus

        context = ray.get_runtime_context()
        self.node = context.get_node_id()
        self.actor = context.get_actor_id() or "driver"
        self.health = health
        with warnings.catch_warnings():  # Ray's own use of a deprecated accessor
            warnings.simplefilter("ignore", DeprecationWarning)
            restarted = context.was_current_actor_reconstructed
        if health is not None and restarted:
            try:
                failure = ray.get(health.restarted.remote(self.actor, self.node), timeout=60)
            except Exception as err:  # noqa: BLE001 (counting must never stop an engine)
                print(f"engine on node {self.node[:8]}: restart not counted ({type(err).__name__})", flush=True)
                failure = None
            if failure:
                raise EngineFailed(failure)
        pin_assigned_gpus()
        engine = stage.engine
        if not runs_on_cpu(engine.device):
            _before_gpu_engine(engine)
        self.engine = Engine(stage.model_path, engine, dtype=stage.dtype, seed=stage.seed)
        limits = ", ".join(f"{k} {v}" for k, v in self.engine.limits.items())
        print(f"engine on node {self.node[:8]}: vLLM uses {limits}", flush=True)
        self.stages = (stage, *also)  # a batch's `job` column picks one (same model and engine)
        # One thread turns the engine for every batch this actor holds (Ray Data hands it
        # engine.batches_per_engine at once): a batch's tail never leaves the engine idle.
        self.flow = Flow(self.engine)
        self.active: set = set()
        self.broken: BaseException | None = None
        self.lock = threading.Lock()  # `broken` and `active` change together
        self.flow.start(on_error=self._flow_failed)
        if engine.stall_timeout_s is not None:
            threading.Thread(target=self._watch, args=(engine.stall_timeout_s,), daemon=True).start()

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        stage = self.stages[_job(batch)]
        out = run_batch(self.flow, stage.task, list(stage.passes), batch, stage.engine.max_model_len, wait=self._wait)
        out["engine_node"] = self.node  # where each row was generated (elastic runs, debugging)
        return out

    def _wait(self, work) -> None:
        with self.lock:
            if self.broken is not None:
                raise self.broken
            self.active.add(work)
        try:
            self.flow.add(work)
            work.done.wait()
        finally:
            self.active.discard(work)
        work.result()  # raises the flow's error, if it failed

    def _flow_failed(self, err: BaseException) -> None:
        from s2d_ray.engine import EngineDead

        if isinstance(err, EngineDead):
            self._exit(f"engine dead: {err}")
        # Anything else is a bug of ours, not the engine's: every batch fails with it (Ray
        # Data reports it), and so does every later one.
        with self.lock:
            self.broken = err
            failing = list(self.active)
        for work in failing:
            work.fail(err)

    def _watch(self, timeout: float) -> None:
        while True:
            time.sleep(min(5.0, timeout / 4))
            idle = time.monotonic() - self.engine.last_progress
            if self.engine.busy and idle > timeout:
                self._exit(f"engine stalled: no step finished for {idle:.0f} s (engine.stall_timeout_s {timeout:g})")

    def _exit(self, reason: str) -> None:
        """Leave for good: Ray restarts this actor in a fresh process and retries the batch."""
        import ray

        print(f"engine on node {self.node[:8]}: {reason}; the actor exits, Ray restarts it and its batch is redone",
              flush=True)  # fmt: skip
        if self.health is not None:
            try:
                ray.get(self.health.dying.remote(self.actor, reason), timeout=30)
            except Exception:  # noqa: BLE001 (the restart is counted all the same)
                pass
        os._exit(1)

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


def _before_gpu_engine(engine: EngineConfig) -> None:
    """On real GPUs: wait until an earlier stage's processes have released the memory this
    engine will claim (Ray frees the resource before the memory), and warn when a
    pipeline-parallel engine's placement split a tensor-parallel group across nodes."""
    from s2d_ray.placement import engine_bundle_nodes, split_tp_groups, wait_for_free_gpu_elsewhere, wait_for_group_gpus

    need = engine.gpu_memory_utilization
    seen = [wait_for_free_gpu_elsewhere(need)] if engine.gpus_per_engine == 1 else wait_for_group_gpus(need)
    if any(free < need for free in seen):
        print(f"engine: GPU memory still held by another process ({min(seen):.0%} free, "
              f"engine.gpu_memory_utilization {need}); vLLM will say whether it can start", flush=True)  # fmt: skip
    if engine.pipeline_parallel > 1:
        split = split_tp_groups(engine_bundle_nodes(), engine.tensor_parallel)
        if split:
            print(f"engine: a tensor-parallel group of {engine.tensor_parallel} spans nodes ({', '.join(split)} hold a "
                  "partial group): it will run, slowly; give nodes a multiple of engine.tensor_parallel free GPUs",
                  flush=True)  # fmt: skip


def pass_run(p: Pass, task: Task, max_model_len: int):
    """What the dataflow needs of a pass: sampling, rounds and the adaptive stop, USC."""
    from s2d_ray.methods.dataflow import PassRun

    first, round_size, decided = p.samples, 1, None
    if p.adaptive is not None:
        min_agreement, confidence, round_size, window = p.adaptive
        first = first_round(p.samples, confidence, window)

        def stop(samples) -> bool:
            answers = [task.extract(s.final) for s in samples]
            return adaptive_vote(answers, p.samples, min_agreement, confidence, window) is not None

        decided = stop

    return PassRun(
        program=p.program, samples=p.samples, first=first, round_size=round_size, decided=decided,
        sampling=dict(temperature=p.temperature, top_p=p.top_p, max_tokens=p.max_tokens),
        usc=(p.usc_max_tokens, max_model_len, p.usc_fallback) if p.select == "usc" else None,
    )  # fmt: skip


def run_batch(flow, task: Task, passes: list[Pass], batch: pd.DataFrame, max_model_len: int, wait=None) -> pd.DataFrame:
    """Every pass over one batch of input rows, all at once on `flow` (a `Flow`, or an
    engine to make one for this batch); adds the pass's columns. `wait(run)`, if given,
    hands the batch to a flow turned elsewhere and waits for it."""
    from s2d_ray.methods.dataflow import BatchRun, Flow

    if not isinstance(flow, Flow):
        flow = Flow(flow)
    originals = [
        {"format": task.answer_format, **json.loads(f), "question": q} for f, q in zip(batch["fields"], batch["input"])
    ]
    keys = list(batch["id"])
    work = BatchRun(flow, [
        (pass_run(p, task, max_model_len), [task.perturb(v) for v in originals] if p.perturbed else originals, keys)
        for p in passes
    ])  # fmt: skip
    if wait is None:
        flow.run(work)
    else:
        wait(work)
    out = batch.copy()
    for k, p in enumerate(passes):
        results, chosen, seconds = work.outputs(k)
        answers = [[task.extract(s.final) for s in samples] for samples in results]
        if p.perturbed:
            answers = [[task.unperturb(a) for a in row] for row in answers]
        # An input fails (recorded, never voted into distill/) when none of its samples got
        # through every step: a prompt too long for the context at some step, typically.
        errors = [[s.error for s in samples if s.error] for samples in results]
        out[f"{p.label}_failed_samples"] = [len(e) for e in errors]
        out[f"{p.label}_failure"] = [e[0] if e and len(e) == len(r) else None for e, r in zip(errors, results)]
        out[f"{p.label}_outputs"] = [[s.final for s in samples] for samples in results]
        if len(p.program.step_names) > 1:  # the reasoning before the final step, per sample: {step: text}
            before = p.program.step_names[:-1]
            out[f"{p.label}_steps"] = [[json.dumps({k: s.values.get(k, "") for k in before}) for s in samples]
                                       for samples in results]  # fmt: skip
        out[f"{p.label}_answers"] = answers
        out[f"{p.label}_samples"] = [len(samples) for samples in results]
        for step in p.program.step_names:
            out[f"{p.label}_tokens_{step}"] = [sum(s.tokens[step] for s in samples) for samples in results]
        tokens = [sum(sum(s.tokens.values()) for s in samples) for samples in results]
        if p.select == "usc":
            out[f"{p.label}_selected"] = [c.index for c in chosen]
            out[f"{p.label}_selected_how"] = [c.how for c in chosen]
            out[f"{p.label}_tokens_usc"] = [c.tokens for c in chosen]
            tokens = [t + c.tokens for t, c in zip(tokens, chosen)]
        out[f"{p.label}_tokens"] = tokens
        # The pass's share of the engine's time (batches and passes overlap on one engine).
        out[f"{p.label}_seconds"] = seconds / max(len(batch), 1)
    return out


def vote_row(row: dict, label: str, filt: FilterConfig) -> Vote:
    """The configured filter over one input's samples (columns written by `run_batch`)."""
    answers = list(row[f"{label}_answers"])
    # pandas may hold a missing failure as NaN: only text is a failure.
    if any(isinstance(row.get(f"{lab}_failure"), str) for lab in (label, f"{label}_swapped")):
        return Vote(None, 0, len(answers), False, "failed", {})  # the reason is in <label>_failure
    if filt.name == "usc":
        return usc_vote(answers, int(row[f"{label}_selected"]), row[f"{label}_selected_how"])
    if filt.name == "swap":
        return swap_vote(answers, list(row[f"{label}_swapped_answers"]))
    if filt.name == "none":
        return no_filter(answers)
    if filt.adaptive:
        vote = adaptive_vote(answers, filt.samples, filt.min_agreement, filt.confidence, filt.window)
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


def engine_env(cfg: EngineConfig) -> dict[str, str]:
    env = dict(CPU_ENGINE_ENV if runs_on_cpu(cfg.device) else GPU_ENGINE_ENV)
    if runs_on_cpu(cfg.device):
        # Ray sets OMP_NUM_THREADS=num_cpus (rounded down); say it explicitly.
        env["OMP_NUM_THREADS"] = str(max(1, int(cfg.cpus_per_engine)))
    if fake_gpus():
        env[FAKE_GPUS_ENV] = "1"
    if os.environ.get(FAULT_ENV):
        env[FAULT_ENV] = os.environ[FAULT_ENV]
    return env


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


def finished_ids(out_dir: Path) -> set[str]:
    table = read_parts(out_dir, columns=["id"])
    return set(table.column("id").to_pylist()) if table is not None else set()


def _rows(examples: list[Example]) -> list[dict]:
    return [
        {"id": e.id, "input": e.question, "answer": e.answer, "group": e.group, "fields": json.dumps(e.fields)}
        for e in examples
    ]


def batch_rows(inputs: int, engine: EngineConfig) -> int:
    """Rows per batch: `engine.batch_size`, or fewer when that would leave an engine of the
    full pool without work: every engine gets at least max(2, batches_per_engine) batches."""
    per_engine = max(2, engine.batches_per_engine)
    return max(1, min(engine.batch_size, math.ceil(inputs / (per_engine * engine.concurrency[1]))))


def _job(batch: pd.DataFrame) -> int:
    """Which stage of a shared pipeline a batch belongs to (every batch holds one)."""
    if "job" not in batch.columns:
        return 0
    jobs = set(batch["job"].tolist())
    if len(jobs) != 1:
        raise RuntimeError(f"a batch mixes the rows of stages {sorted(jobs)}")
    return int(jobs.pop())


def vote_jobs(batch: pd.DataFrame, votes: list[dict | None], task: Task) -> pd.DataFrame:
    vote = votes[_job(batch)]
    return vote_batch(batch, **vote, task=task) if vote is not None else batch


def generation_dataset(todo: list[Example], stage: EngineStage, *, tag: str = "", health=None,
                       also: list[tuple[list[Example], EngineStage]] = ()):  # fmt: skip
    """The lazy Ray Data pipeline: inputs -> GeneratorActor pool (autoscaling min..max) -> vote.
    `health` (an EngineHealth actor) counts the pool's engine deaths.

    `also`: more stages on the same model and engine settings (base-model evaluation in
    `s2d run`), run by the same engines: their rows carry a `job` column (1, 2, ...), each
    block holds one stage's rows and is one batch."""
    import ray

    engine = stage.engine
    lo, hi = engine.concurrency
    jobs = [(todo, stage), *also]
    size = batch_rows(sum(len(t) for t, _ in jobs), engine)
    if also:
        parts = [
            ray.data.from_items([{**r, "job": j} for r in _rows(t)], override_num_blocks=math.ceil(len(t) / size))
            for j, (t, _) in enumerate(jobs) if t
        ]  # fmt: skip
        ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    else:
        ds = ray.data.from_items(_rows(todo), override_num_blocks=math.ceil(len(todo) / size))
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
    votes = [s.vote for _, s in jobs]
    # Voting is cheap bookkeeping: it must never wait for a CPU the engines hold.
    if also and any(v is not None for v in votes):
        ds = ds.map_batches(vote_jobs, fn_kwargs={"votes": votes, "task": stage.task}, batch_size=None,
                            batch_format="pandas", num_cpus=0)  # fmt: skip
    elif stage.vote is not None:
        ds = ds.map_batches(vote_batch, fn_kwargs={**stage.vote, "task": stage.task}, batch_format="pandas", num_cpus=0)
    return ds


DISTILL_SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("target", pa.string())])


def distill_rows(table: pa.Table) -> pa.Table:
    """The kept rows of voted generation output as (id, prompt, target): no reasoning."""
    rows = [r for r in table.select(["id", "input", "target", "kept"]).to_pylist() if r["kept"]]
    return pa.Table.from_pylist(
        [{"id": r["id"], "prompt": r["input"], "target": r["target"]} for r in rows], schema=DISTILL_SCHEMA
    )


class PartWriter:
    """Writes generation parts on the driver's node (streaming mode), so generate/ fills
    exactly as in the sequential mode while the trainer reads the same stream.

    Exactly once: Ray Data may retry the task that hands a block over (a lost node), so
    rows whose id is already in generate/ are dropped (one actor, calls in order)."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.written = finished_ids(self.out_dir)

    def write(self, table: pa.Table) -> int:
        import pyarrow.compute as pc

        new = table.filter(pc.invert(pc.is_in(table.column("id"), pa.array(sorted(self.written), pa.string()))))
        if new.num_rows:
            write_part(self.out_dir, _uniform(new))
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
    spent = _tokens(read_parts(out_dir, columns=token_columns), token_columns) if done else 0
    stopped = budget(spent, 0.0) if budget and todo else None
    if (todo or any(t for t, _, _ in extra)) and not stopped:
        tag = uuid.uuid4().hex[:8]
        health = engine_health(engine)
        total = len(todo) + sum(len(t) for t, _, _ in extra)
        log(f"engines: {len(todo)} inputs" + "".join(f" (and {len(t)} of {f.parent.name}/ with the same engines)"
                                                      for t, _, f in extra if t)
            + f" in batches of {batch_rows(total, engine)}, up to {engine.concurrency[1]} engine(s) holding "
            f"{engine.batches_per_engine} batch(es) each")  # fmt: skip
        ds = generation_dataset(todo, stage, tag=tag, health=health, also=[(t, st) for t, st, _ in extra])
        shown = Shown(progress(log, title, total, "inputs"), cost, started)
        try:
            for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                job = 0
                if "job" in block.column_names:
                    job = _job(block.select(["job"]).to_pandas()) if block.num_rows else 0
                    block = block.drop_columns(["job"])
                if job and block.num_rows:
                    write_part(extra[job - 1][2], _uniform(block))
                    shown.add(block, [f"{p.label}_tokens" for p in extra[job - 1][1].passes])
                    continue
                if block.num_rows:
                    write_part(out_dir, _uniform(block))
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
        tokens = _tokens(block, token_columns)
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


def _tokens(table: pa.Table | None, columns: list[str]) -> int:
    if table is None:
        return 0
    return int(sum(sum(v or 0 for v in table.column(c).to_pylist()) for c in columns if c in table.column_names))


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
