"""Full fine-tuning with DeepSpeed ZeRO-3 in a Ray Train worker group.

The only module that imports DeepSpeed. Each worker reads its Ray Data shard of
the distillation set, trains on (prompt -> final answer) with the prompt masked out
of the loss, and rank 0 exports a Hugging Face safetensors checkpoint that is
handed back through Ray Train's checkpointing.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from pathlib import Path

from s2d_ray.chat import chat_prompt
from s2d_ray.config import TrainConfig
from s2d_ray.errors import S2DError
from s2d_ray.placement import FAKE_GPUS_ENV, fake_gpus, trainer_scaling

IGNORE = -100


class EmptyDistillSet(S2DError):
    """No input passed the filter: there is nothing to fine-tune on."""


def build_zero3_config(cfg: TrainConfig, world_size: int, total_steps: int, on_cpu: bool | None = None) -> dict:
    """The DeepSpeed config for ZeRO-3 full fine-tuning, from the job's train section."""
    on_cpu = not cfg.use_gpu if on_cpu is None else on_cpu
    zero = {
        "stage": 3,
        "overlap_comm": not on_cpu,
        "contiguous_gradients": True,
        "reduce_bucket_size": 5e7,
        "stage3_prefetch_bucket_size": 5e7,
        "stage3_param_persistence_threshold": 1e5,
        # Gather the sharded weights on rank 0 when exporting the checkpoint.
        "stage3_gather_16bit_weights_on_model_save": True,
    }
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": cfg.bf16},
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.lr,
                "betas": [0.9, 0.95],
                "eps": 1e-8,
                "weight_decay": cfg.weight_decay,
                # Without offload, plain torch AdamW: no fused kernel to build (none on CPU).
                "torch_adam": not cfg.offload_optimizer,
            },
        },
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": cfg.lr,
                "warmup_num_steps": max(1, min(cfg.warmup_steps, total_steps - 1)),  # DeepSpeed wants >= 1
                "total_num_steps": max(total_steps, 1),
                "warmup_type": "linear",
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def total_steps(cfg: TrainConfig, rows: int) -> int:
    if cfg.steps:
        return cfg.steps
    per_step = cfg.micro_batch_size * cfg.grad_accum * cfg.workers
    return max(1, math.ceil(cfg.epochs * rows / per_step))


def encode(tokenizer, prompt: str, target: str, max_len: int) -> tuple[list[int], list[int]]:
    """Token ids and labels: the chat-formatted prompt is masked, the answer is learned."""
    prefix = tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    answer = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prefix + answer)[-max_len:]
    labels = ([IGNORE] * len(prefix) + answer)[-max_len:]
    return ids, labels


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int):
    import torch

    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (ids, labs) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(labs)] = torch.tensor(labs)
        mask[i, : len(ids)] = 1
    return input_ids, labels, mask


def _cycle_batches(shard, batch_size: int):
    """Micro-batches forever: every worker must take the same number of steps, or the
    ZeRO-3 collectives of the worker with more data would wait for ever."""
    while True:
        empty = True
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="pandas"):
            empty = False
            yield batch
        if empty:
            raise RuntimeError("this worker's shard of the distillation set is empty")


def train_loop(config: dict) -> None:
    """Runs in every Ray Train worker."""
    os.environ.update(config["env"])  # before DeepSpeed picks its accelerator on import
    from s2d_ray.placement import pin_assigned_gpus

    pin_assigned_gpus()  # before CUDA initialises
    import deepspeed
    import ray.train
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations import HfDeepSpeedConfig

    cfg = TrainConfig.model_validate(config["train"])
    if config["on_cpu"]:
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    steps = config["steps"]
    # Ray Train already set up torch.distributed; DeepSpeed wraps that process group.
    deepspeed.init_distributed(dist_backend=config["backend"])
    ds_config = build_zero3_config(cfg, world, steps, on_cpu=config["on_cpu"])
    # Must exist before from_pretrained so the weights load straight into ZeRO-3 shards.
    hf_ds = HfDeepSpeedConfig(ds_config)  # noqa: F841 (kept alive on purpose)
    tokenizer = AutoTokenizer.from_pretrained(config["model_path"])
    model = AutoModelForCausalLM.from_pretrained(
        config["model_path"],
        dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
        attention_dropout=cfg.dropout,
    )
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)

    shard = ray.train.get_dataset_shard("train")
    if config["stream"]:
        # One pass over the distillation stream as generation produces it; the split is
        # equal across ranks, so every rank runs out at the same step.
        batches = iter(shard.iter_batches(batch_size=cfg.micro_batch_size, batch_format="pandas"))
    else:
        batches = _cycle_batches(shard, cfg.micro_batch_size)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    started = time.perf_counter()
    tokens_seen = 0
    metrics = {"step": 0, "loss": None, "tokens": 0, "seconds": 0.0}
    for step in range(1, steps + 1):
        losses = []
        for _ in range(cfg.grad_accum):
            batch = next(batches, None)
            if batch is None:
                break
            encoded = [encode(tokenizer, p, t, cfg.max_seq_len) for p, t in zip(batch["prompt"], batch["target"])]
            input_ids, labels, mask = collate(encoded, pad)
            tokens_seen += int(mask.sum())
            loss = engine(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            engine.backward(loss)
            engine.step()
            losses.append(float(loss))
        if not losses:
            if rank == 0:
                print(f"train: the stream ended after {step - 1} of {steps} steps", flush=True)
            break
        elapsed = time.perf_counter() - started
        metrics = {"step": step, "loss": sum(losses) / len(losses), "tokens": tokens_seen, "seconds": elapsed}
        if rank == 0:
            print(
                f"train step {step}/{steps}  loss {metrics['loss']:.4f}  "
                f"{tokens_seen / elapsed:.0f} tok/s/worker  {elapsed:.0f}s",
                flush=True,
            )

    if metrics["step"] == 0:  # nothing came down the stream: no model, not the base one renamed
        ray.train.report(metrics)
        return
    # Collective: every rank takes part in gathering the ZeRO-3 shards.
    state = engine._zero3_consolidated_16bit_state_dict()
    export = Path(tempfile.mkdtemp(prefix="s2d-export-"))
    try:
        checkpoint = None
        if rank == 0:
            model.config.use_cache = True
            model.save_pretrained(export, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(export)
            checkpoint = ray.train.Checkpoint.from_directory(str(export))
        ray.train.report({**metrics, "tokens_total": tokens_seen * world}, checkpoint=checkpoint)
    finally:
        shutil.rmtree(export, ignore_errors=True)


def train(distill_dir: Path, model_path: Path, out_dir: Path, storage: Path, cfg: TrainConfig, log=print) -> dict:
    """Fine-tune on the distillation set; writes a Hugging Face checkpoint to `out_dir`."""
    import ray

    # Materialized up front: the distillation set is small text, and the trainer workers
    # may hold every CPU, which would leave a lazy read waiting for ever.
    ds = ray.data.read_parquet(str(distill_dir), columns=["id", "prompt", "target"]).materialize()
    rows = ds.count()
    if rows == 0:
        raise EmptyDistillSet("the distillation set is empty: the filter kept no input")
    if rows < cfg.workers:
        # Every worker needs a non-empty shard; a tiny set is repeated (training cycles
        # over its data anyway).
        log(f"training: {rows} row(s) for {cfg.workers} workers; repeating them so every worker has data")
        ds = ray.data.from_items(ds.take_all() * math.ceil(cfg.workers / rows)).materialize()
    steps = total_steps(cfg, rows)
    log(f"training: {rows} rows, {steps} steps, {cfg.workers} workers, ZeRO-3")
    return fit(ds, rows, steps, model_path, out_dir, storage, cfg, stream=False)


def train_stream(ds, model_path: Path, out_dir: Path, storage: Path, cfg: TrainConfig, log=print) -> dict:
    """Fine-tune on a distillation stream while it is generated (one pass, `cfg.steps` at most)."""
    log(f"training: streaming, up to {cfg.steps} steps, {cfg.workers} workers, ZeRO-3")
    return fit(ds, None, cfg.steps, model_path, out_dir, storage, cfg, stream=True)


def fit(ds, rows: int | None, steps: int, model_path: Path, out_dir: Path, storage: Path, cfg: TrainConfig, stream: bool) -> dict:
    """Run the Ray Train worker group over `ds` and move its checkpoint into `out_dir`."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from s2d_ray.rundir import replace_dir

    env = {"TOKENIZERS_PARALLELISM": "false"}
    on_cpu = not cfg.use_gpu or fake_gpus()  # fake GPUs (tests): GPU resources, CPU compute
    if on_cpu:
        env["DS_ACCELERATOR"] = "cpu"
        env["OMP_NUM_THREADS"] = str(max(1, int(cfg.cpus_per_worker)))
    if fake_gpus():
        env[FAKE_GPUS_ENV] = "1"
    backend = "gloo" if on_cpu else cfg.backend
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "train": cfg.model_dump(mode="json"),
            "model_path": str(model_path),
            "steps": steps,
            "env": env,
            "on_cpu": on_cpu,
            "backend": backend,
            "stream": stream,
        },
        scaling_config=ScalingConfig(**trainer_scaling(cfg)),
        torch_config=TorchConfig(backend=backend),
        datasets={"train": ds},
        run_config=RunConfig(name="train", storage_path=str(storage)),
    )
    started = time.perf_counter()
    result = trainer.fit()
    metrics = result.metrics or {}
    if result.checkpoint is None:
        if stream and not metrics.get("step"):
            raise EmptyDistillSet("the distillation stream brought no rows: the filter kept no input")
        raise S2DError("training finished without a checkpoint")
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    result.checkpoint.to_directory(str(tmp))
    replace_dir(tmp, out_dir)
    return {
        "rows": rows,
        "steps": metrics.get("step", steps),
        "streaming": stream,
        "final_loss": metrics.get("loss"),
        "tokens": metrics.get("tokens_total"),
        "seconds": time.perf_counter() - started,
        "workers": cfg.workers,
    }
