"""Before a run: will it fit, and what will it cost?

Memory: a 70B model's weights per engine GPU under tensor/pipeline parallelism, and a
ZeRO-3 trainer's per-GPU and per-node host memory under the chosen offload settings,
against `cluster.gpu_memory_gib` (checked when the job file is loaded, so a job that
cannot fit fails on a laptop, before a single GPU is allocated).

Cost: generated tokens (every step of the method, every sample, USC and swap passes),
evaluation tokens, trained tokens, device-hours and money, from the job's sizes and
throughput assumptions the job can set (`cost.*`). Defaults and where they come from:

* CPU, generation: 40 tokens/s per engine, SmolLM2-135M fp32 on 2 cores, measured by
  bench/generation.py (README). CPU, training: 15 tokens/s per worker, measured in the
  local runs (ZeRO-3, 2 gloo workers).
* GPU, generation: 1,500 tokens/s per engine, an assumption for a 70B model in bf16 on a
  4-GPU (A100/H100 80 GB) vLLM engine with a full batch; measure yours with
  bench/generation.py and set `cost.generation_tokens_per_second`.
* GPU, training: 6 x params FLOPs per trained token at 30% of an A100's 312 bf16 TFLOP/s
  (~220 tokens/s per GPU for 70B), x0.7 with optimizer offload (PCIe traffic). Still an
  assumption: no GPU has been lent to measure it. `bench/training.py --device cuda`
  prints tokens/s per GPU and MFU of this trainer for ~1B and ~7B Llama shapes, with
  and without offload; put yours in `cost.training_tokens_per_second`.
* Checkpoints: 12 bytes per parameter (DeepSpeed ZeRO-3's optimizer-state files: fp32
  master weights and both Adam moments; the model-state files hold no weights under
  ZeRO-3), written at `cluster.storage_gib_per_s` (default 1 GiB/s, all ranks together)
  while every trainer GPU waits.
"""

from __future__ import annotations

import json
import math

GIB = 2**30
BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
CPU_GENERATION_TPS = 40.0
CPU_TRAINING_TPS = 15.0
GPU_GENERATION_TPS = 1500.0
GPU_PEAK_FLOPS, GPU_MFU, OFFLOAD_SLOWDOWN = 312e12, 0.30, 0.7
OPTIMIZER_BYTES = 16  # per parameter: fp32 master weights, Adam's two moments, fp32 gradients
CHECKPOINT_BYTES = 12  # per parameter in a ZeRO-3 checkpoint: fp32 master weights, Adam's two moments
KV_RESERVE_GIB = 2.0  # an engine without room for a KV cache cannot serve
GPU_OVERHEAD_GIB = 2.0  # CUDA context, NCCL buffers, allocator slack


def params_from_config(config: dict) -> float:
    """Parameter count of a Llama-style decoder from its config.json."""
    h, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    inter = config.get("intermediate_size", 4 * h)
    heads = config.get("num_attention_heads", 1)
    kv = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim", h // heads)
    attention = h * heads * head_dim * 2 + h * kv * head_dim * 2
    per_layer = attention + 3 * h * inter + 2 * h
    embeddings = vocab * h * (1 if config.get("tie_word_embeddings", False) else 2)
    return float(layers * per_layer + embeddings + h)


def llama_shape(params: float) -> tuple[float, float]:
    """(layers, hidden size) of a Llama-proportioned decoder: params ~ 12 layers h^2 with
    h ~ 110 layers (Llama-2 7B/13B/70B: 4096/32, 5120/40, 8192/80)."""
    hidden = (max(params, 0.0) * 110 / 12) ** (1 / 3)
    return hidden / 110, hidden


def model_params(cfg) -> float | None:
    if cfg.model.params_billion:
        return cfg.model.params_billion * 1e9
    if cfg.model.path:
        from s2d_ray.tasks.data import resolve_path

        config = resolve_path(cfg.model.path) / "config.json"
    else:
        from s2d_ray.models import embedded_path

        config = embedded_path(cfg.model.name) / "config.json"
    try:
        return params_from_config(json.loads(config.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def engine_memory(cfg, params: float) -> dict:
    """Weights per GPU of one engine vs. what `gpu_memory_utilization` leaves for them."""
    per_gpu = params * BYTES[cfg.model.dtype] / max(cfg.engine.gpus_per_engine, 1) / GIB
    usable = cfg.engine.gpu_memory_utilization * cfg.cluster.gpu_memory_gib
    return {"weights_per_gpu_gib": per_gpu, "usable_per_gpu_gib": usable, "kv_cache_per_gpu_gib": usable - per_gpu}


def trainer_memory(cfg, params: float) -> dict:
    """ZeRO-3 per-GPU memory (parameters, gradients, AdamW states, activations) and the
    host memory per node that offload needs. Mixed precision: 16-bit weights and
    gradients, fp32 master weights, two moments and the fp32 gradient partition the
    optimizer steps on (16 bytes per parameter, on the GPU or, offloaded, on the host:
    DeepSpeed 0.19.8 stage3.py). Rank 0's node also holds one export shard and one
    module while the model is written (training.export_hf)."""
    t = cfg.train
    world = t.workers
    half = 2 if t.bf16 else 4
    shard = params / world
    on_gpu = {
        "parameters": 0.0 if t.offload_params else shard * half,
        "gradients": shard * half,
        "optimizer": 0.0 if t.offload_optimizer else shard * OPTIMIZER_BYTES,
    }
    # Activations: with checkpointing one hidden state per layer kept, plus one layer's
    # working set (~16 hidden-sized tensors) while it is recomputed; without, all of them.
    layers, hidden = llama_shape(params)
    tokens = t.micro_batch_size * t.max_seq_len
    act = tokens * hidden * half * ((layers if t.gradient_checkpointing else 16 * layers) + 16)
    on_gpu["activations"] = act
    per_gpu = sum(on_gpu.values()) / GIB + GPU_OVERHEAD_GIB
    ranks = min(cfg.cluster.gpus_per_node or 8, world)  # ranks on one node
    host = (shard * OPTIMIZER_BYTES * t.offload_optimizer + shard * half * t.offload_params) * ranks / GIB
    export = t.export_shard_gib + hidden * 32000 * half / GIB  # a shard + the embedding (Llama vocabulary)
    # Resuming: each rank reads its checkpoint shard into host memory (DeepSpeed loads it to
    # the CPU) on top of what is resident, before the states are copied into place.
    resume = shard * CHECKPOINT_BYTES * ranks / GIB
    return {
        "per_gpu_gib": per_gpu,
        "breakdown_gib": {k: v / GIB for k, v in on_gpu.items()},
        "host_per_node_gib": host + export,
        "host_per_node_resume_gib": host + resume,
        "export_host_gib": export,
    }


def checkpoint_plan(cfg, params: float | None, steps: int, step_seconds: float) -> dict:
    """What the training's checkpoints will cost: size (in all and per rank), how many,
    bytes written and held, and the time every trainer GPU waits for each at the storage's
    bandwidth, in device-hours and money. Also `steps_per_checkpoint`, the default
    interval's input (training.checkpoints.checkpoint_interval)."""
    from s2d_ray.training.checkpoints import checkpoint_interval

    t, c = cfg.train, cfg.cluster
    size = (params or 0.0) * CHECKPOINT_BYTES
    seconds = size / (c.storage_gib_per_s * GIB)
    if t.checkpoint_staging == "local":
        seconds *= 1.1  # the local write before the upload (node-local NVMe, ~10x the shared bandwidth)
    per_step = seconds / step_seconds if step_seconds > 0 else 0.0
    every = checkpoint_interval(t, steps, per_step)
    count = len(range(every, steps, every)) if every else 0  # none at the last step: the export follows
    idle_hours = count * seconds * t.workers / 3600
    ranks = min(c.gpus_per_node or 8, t.workers)
    return {
        "bytes": size,
        "bytes_per_rank": size / t.workers,
        "every": every,
        "count": count,
        "bytes_written": size * count,
        "bytes_held": size * min(count, t.keep_checkpoints),
        "local_bytes_per_node": size / t.workers * ranks if t.checkpoint_staging == "local" else 0.0,
        "seconds_each": seconds,
        "steps_per_checkpoint": per_step,
        "device_hours": idle_hours,
        "cost": idle_hours * cfg.cost.device_hour_price,
        "storage_gib_per_s": c.storage_gib_per_s,
        "steps": steps,
    }


def check_fits(cfg) -> None:
    """Raise ValueError (one line) if the job cannot fit the declared cluster."""
    e, t, c = cfg.engine, cfg.train, cfg.cluster
    if c.gpus_per_node is not None:
        if e.tensor_parallel > c.gpus_per_node or c.gpus_per_node % e.tensor_parallel:
            raise ValueError(
                f"engine.tensor_parallel {e.tensor_parallel} must divide cluster.gpus_per_node {c.gpus_per_node} "
                "(a tensor-parallel group lives on one node)"
            )
        if c.max_nodes is not None:
            total = c.gpus_per_node * c.max_nodes
            engine_gpus = e.concurrency[0] * e.gpus_per_engine
            if engine_gpus > total:
                raise ValueError(f"{e.concurrency[0]} engines x {e.gpus_per_engine} GPUs need {engine_gpus} GPUs; the cluster has at most {total}")
            if t.workers > total:
                raise ValueError(f"train.workers {t.workers} need {t.workers} GPUs; the cluster has at most {total}")
            if t.streaming and engine_gpus + t.workers > total:
                raise ValueError(
                    f"train.streaming runs {engine_gpus} engine GPUs and {t.workers} trainer GPUs at once; "
                    f"the cluster has at most {total}"
                )
    params = model_params(cfg)
    if params is None:
        return
    mem = engine_memory(cfg, params)
    if mem["kv_cache_per_gpu_gib"] < KV_RESERVE_GIB:
        raise ValueError(
            f"a {params / 1e9:.0f}B model in {cfg.model.dtype} needs {mem['weights_per_gpu_gib']:.1f} GiB of weights per GPU "
            f"with {e.gpus_per_engine} GPU(s) per engine, but {c.gpu_memory_gib:g} GiB x gpu_memory_utilization "
            f"{e.gpu_memory_utilization} leaves {mem['usable_per_gpu_gib']:.1f} GiB: raise engine.tensor_parallel"
        )
    if t.use_gpu:
        trainer = trainer_memory(cfg, params)
        if trainer["per_gpu_gib"] > c.gpu_memory_gib:
            parts = ", ".join(f"{k} {v:.1f}" for k, v in trainer["breakdown_gib"].items())
            raise ValueError(
                f"ZeRO-3 training of a {params / 1e9:.0f}B model on {t.workers} GPUs needs ~{trainer['per_gpu_gib']:.0f} GiB "
                f"per GPU ({parts} GiB) > cluster.gpu_memory_gib {c.gpu_memory_gib:g}: add workers or set "
                "train.offload_optimizer / train.offload_params"
            )
        if c.host_memory_gib is not None and trainer["host_per_node_gib"] > c.host_memory_gib:
            raise ValueError(
                f"CPU offload needs ~{trainer['host_per_node_gib']:.0f} GiB of host memory per node > "
                f"cluster.host_memory_gib {c.host_memory_gib:g}: add workers (smaller shards) or nodes"
            )
        if c.host_memory_gib is not None and trainer["host_per_node_resume_gib"] > c.host_memory_gib:
            raise ValueError(
                f"resuming from a checkpoint needs ~{trainer['host_per_node_resume_gib']:.0f} GiB of host memory per "
                f"node (the offloaded states plus each rank's checkpoint shard read back) > cluster.host_memory_gib "
                f"{c.host_memory_gib:g}: add workers (smaller shards) or nodes"
            )


def split_size(task, split: str) -> int | None:
    size = getattr(task, split, None)
    if isinstance(size, int):
        return size
    mix = getattr(task, "mix", {}).get(split)
    if mix:
        return sum(mix.values())
    limit = getattr(task, "limit", {}).get(split)
    try:
        return len(task.examples(split))  # readable here: count exactly
    except Exception:  # noqa: BLE001 (unreadable on this machine: fall back to the limit)
        return limit


def _calls(program) -> int:
    return sum(step.max_items if step.over else 1 for step in program.steps)


def estimate(cfg) -> dict:
    """Predicted tokens, device-hours and money per stage (see the module docstring). A
    pipeline (`tasks:`): generation and evaluation summed over its tasks; training as
    the job's train settings give it (set train.steps for the distillation set of all)."""
    out = _estimate(cfg)
    if not cfg.tasks:
        return out
    parts = [_estimate(sub)["stages"] for _, sub in cfg.entries()]
    for name in ("generate", "eval"):
        if all(name in p for p in parts):
            out["stages"][name] = {k: sum(p[name][k] for p in parts) for k in ("inputs", "tokens", "device_hours", "cost")}
    for key in ("tokens", "device_hours", "cost"):
        out[key] = sum(st[key] for st in out["stages"].values())
    return out


def _estimate(cfg) -> dict:
    f, s, e, t, cost = cfg.filter, cfg.sampling, cfg.engine, cfg.train, cfg.cost
    frac = cost.output_fraction
    swap = 2 if cfg.task.has_perturbation else 1
    train_inputs = split_size(cfg.task, "train")
    test_inputs = split_size(cfg.task, cfg.eval.split)
    program = cfg.program(cfg.method.name)
    per_input = f.samples * _calls(program) * s.max_tokens * frac
    per_input += f.usc_max_tokens * frac if f.name == "usc" else 0
    per_input *= 2 if f.name == "swap" else 1
    gpu = e.device == "cuda"
    params = model_params(cfg)
    gen_tps = cost.generation_tokens_per_second or (GPU_GENERATION_TPS if gpu else CPU_GENERATION_TPS)
    if cost.training_tokens_per_second:
        train_tps = cost.training_tokens_per_second
    elif gpu and params:
        train_tps = GPU_PEAK_FLOPS * GPU_MFU / (6 * params) * (OFFLOAD_SLOWDOWN if t.offload_optimizer else 1.0)
    else:
        train_tps = CPU_TRAINING_TPS
    engines = e.concurrency[1]
    engine_devices = engines * max(e.gpus_per_engine, 1)
    stages: dict[str, dict] = {}
    if train_inputs is not None:
        tokens = train_inputs * per_input
        hours = tokens / (gen_tps * engines) / 3600
        stages["generate"] = {"inputs": train_inputs, "tokens": tokens, "device_hours": hours * engine_devices}
        steps = t.steps or max(1, math.ceil(t.epochs * train_inputs * cost.kept_fraction / (t.micro_batch_size * t.grad_accum * t.workers)))
        tokens = steps * t.micro_batch_size * t.grad_accum * t.workers * t.max_seq_len * frac
        hours = tokens / (train_tps * t.workers) / 3600
        plan = checkpoint_plan(cfg, params, steps, hours * 3600 / steps)
        stages["train"] = {"steps": steps, "tokens": tokens, "device_hours": hours * t.workers + plan["device_hours"],
                           "checkpoints": plan}  # fmt: skip
    if test_inputs is not None:
        calls = 1 + (_calls(program) if cfg.eval.system2 else 0) + 1  # system1, system2, distilled
        tokens = test_inputs * calls * cfg.eval.max_tokens * frac * swap
        hours = tokens / (gen_tps * engines) / 3600
        stages["eval"] = {"inputs": test_inputs, "tokens": tokens, "device_hours": hours * engine_devices}
    for st in stages.values():
        st["cost"] = st["device_hours"] * cost.device_hour_price
    out = {
        "stages": stages,
        "tokens": sum(st["tokens"] for st in stages.values()),
        "device_hours": sum(st["device_hours"] for st in stages.values()),
        "cost": sum(st["cost"] for st in stages.values()),
        "currency": cost.currency,
        "assumptions": {
            "generation_tokens_per_second_per_engine": gen_tps,
            "training_tokens_per_second_per_worker": train_tps,
            "output_fraction": frac,
            "kept_fraction": cost.kept_fraction,
            "engines": engines,
            "params": params,
        },
    }
    if params and gpu:
        out["memory"] = {"engine": engine_memory(cfg, params), "trainer": trainer_memory(cfg, params) if t.use_gpu else None}
    return out


def render(cfg, est: dict) -> str:
    """`s2d estimate`'s text: per-stage table, assumptions, memory."""
    cur = est["currency"]
    a = est["assumptions"]
    params = f"{a['params'] / 1e9:.2f}B parameters" if a["params"] else "parameter count unknown (set model.params_billion)"
    lines = [
        f"estimate for {cfg.name}: {cfg.model.path or cfg.model.name}, {params}",
        f"{'stage':<10}{'size':>14}{'tokens':>16}{'device-hours':>15}{'cost':>16}",
    ]
    for name, st in est["stages"].items():
        size = f"{st['steps']} steps" if "steps" in st else f"{st['inputs']} inputs"
        lines.append(f"{name:<10}{size:>14}{st['tokens']:>16,.0f}{st['device_hours']:>15.3f}{st['cost']:>12.2f} {cur}")
    lines.append(f"{'total':<10}{'':>14}{est['tokens']:>16,.0f}{est['device_hours']:>15.3f}{est['cost']:>12.2f} {cur}")
    plan = est["stages"].get("train", {}).get("checkpoints")
    if plan is not None:
        lines.append(checkpoint_text(cfg, plan, cur))
    for split in ("train", cfg.eval.split):
        if not any(st.get("inputs") is not None for st in est["stages"].values()) or split_size(cfg.task, split) is None:
            lines.append(f"({split} split size unknown here: set task.limit.{split} to include it)")
    lines.append(
        f"assumptions: {a['generation_tokens_per_second_per_engine']:,.0f} generated tokens/s per engine x {a['engines']} "
        f"engines, {a['training_tokens_per_second_per_worker']:,.0f} trained tokens/s per worker, outputs use "
        f"{a['output_fraction']:.0%} of max_tokens, the filter keeps {a['kept_fraction']:.0%} (cost.* in the job file)"
    )
    mem = est.get("memory")
    if mem:
        e = mem["engine"]
        lines.append(
            f"memory: engine weights {e['weights_per_gpu_gib']:.1f} GiB per GPU of {e['usable_per_gpu_gib']:.1f} usable "
            f"({cfg.engine.gpus_per_engine} GPUs per engine), {e['kv_cache_per_gpu_gib']:.1f} GiB left for the KV cache"
        )
        t = mem["trainer"]
        if t:
            parts = ", ".join(f"{k} {v:.1f}" for k, v in t["breakdown_gib"].items())
            lines.append(
                f"memory: ZeRO-3 trainer ~{t['per_gpu_gib']:.1f} GiB per GPU of {cfg.cluster.gpu_memory_gib:g} ({parts} GiB), "
                f"host ~{t['host_per_node_gib']:.0f} GiB per node for offload, ~{t['host_per_node_resume_gib']:.0f} GiB "
                "while resuming from a checkpoint"
            )
    return "\n".join(lines)


def _bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:,.0f} B"


def checkpoint_text(cfg, plan: dict, currency: str) -> str:
    """`s2d estimate`'s checkpoint line."""
    each = f"{_bytes(plan['bytes'])} each ({_bytes(plan['bytes_per_rank'])} per rank)"
    if not plan["count"]:
        if cfg.train.checkpoint_every is not None:
            why = f"train.checkpoint_every {cfg.train.checkpoint_every} with {plan['steps']} steps"
        elif plan["steps"] < 10:
            why = f"{plan['steps']} steps: redoing them costs less"
        else:
            why = "one would cost more than 10% of the training time"
        return (f"checkpoints: none ({why}); one would be {each}, {plan['seconds_each'] / 60:.1f} min at "
                f"{plan['storage_gib_per_s']:g} GiB/s (cluster.storage_gib_per_s)")  # fmt: skip
    local = (f"; staged on each node's disk first: {_bytes(plan['local_bytes_per_node'])} per node"
             if plan["local_bytes_per_node"] else "")  # fmt: skip
    return (
        f"checkpoints: {plan['count']} x {each}, every {plan['every']} steps; {_bytes(plan['bytes_written'])} written, "
        f"{_bytes(plan['bytes_held'])} held (train.keep_checkpoints {cfg.train.keep_checkpoints}); "
        f"{plan['seconds_each'] / 60:.1f} min each at {plan['storage_gib_per_s']:g} GiB/s (cluster.storage_gib_per_s) "
        f"with {cfg.train.workers} GPUs waiting: {plan['device_hours']:.2f} device-hours, {plan['cost']:.2f} {currency} "
        f"(in the train stage's figures){local}"
    )
