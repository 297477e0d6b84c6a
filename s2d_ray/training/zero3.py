"""DeepSpeed ZeRO-3: the only module that imports DeepSpeed.

Its config from the job's train section, the LR schedule it wraps around the optimizer,
the model built into ZeRO-3 shards, the engine, parameter gathering for the export, and
the process groups (Ray Train's, and a local one for benchmarks and GPU tests).
"""

from __future__ import annotations

import os

from s2d_ray.config import TrainConfig


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
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Share of train.lr at optimizer step `step` (0-based): linear warm-up over `warmup`
    steps, then linear decay to 1/total at the last step. Step 0 trains at full rate when
    there is no warm-up (DeepSpeed's WarmupDecayLR spends its first steps at lr 0: two of
    the paper's three last-letter steps would have done nothing)."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def lr_schedule(cfg: TrainConfig, total: int):
    """The scheduler deepspeed.initialize builds around its optimizer (saved in checkpoints)."""

    def build(optimizer):
        import torch

        warmup = min(cfg.warmup_steps, max(0, total - 1))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total))

    return build


def load_zero3_model(model_path: str, cfg: TrainConfig, ds_config: dict):
    """The model and tokenizer, its weights loaded straight into ZeRO-3 shards.

    Returns (model, tokenizer, hf_ds_config): the HfDeepSpeedConfig must stay alive while
    the model is used, or transformers forgets that the weights are partitioned.
    `model_path` may also be a `transformers` config object (random weights: tests, benchmarks).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations import HfDeepSpeedConfig

    # Must exist before the model is built so from_pretrained uses deepspeed.zero.Init
    # (a bare zero.Init around from_pretrained crashes in weight init).
    hf_ds = HfDeepSpeedConfig(ds_config)
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    if isinstance(model_path, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attention_dropout=cfg.dropout)
    else:
        tokenizer = None
        model_path.attention_dropout = cfg.dropout
        model = AutoModelForCausalLM.from_config(model_path, dtype=dtype)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model, tokenizer, hf_ds


def set_data_parallel_timeout(world: int, seconds: float) -> None:
    """Create DeepSpeed's world-group clone ourselves, with the job's collective timeout
    (deepspeed.utils.groups keeps it in `_WORLD_GROUP` and creates it without one).
    Collective: every rank calls it, before deepspeed.initialize."""
    from datetime import timedelta

    import torch.distributed as dist
    from deepspeed.utils import groups

    if getattr(groups, "_WORLD_GROUP", "missing") is None:
        groups._WORLD_GROUP = dist.new_group(ranks=list(range(world)), timeout=timedelta(seconds=seconds))


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def local_process_group(backend: str, rank: int = 0, world_size: int = 1, port: int | None = None) -> None:
    """torch.distributed without Ray Train (benchmarks, GPU tests): the environment
    DeepSpeed expects, then its own init."""
    if port is None and "MASTER_PORT" not in os.environ:
        port = free_port()
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port) if port else os.environ["MASTER_PORT"],
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
    )  # fmt: skip
    init_distributed(backend)


def init_distributed(backend: str) -> None:
    """DeepSpeed's comm on the process group Ray Train already set up (it wraps that
    group), or on the environment `local_process_group` set."""
    import deepspeed

    if backend == "gloo":
        # On CPU, DeepSpeed's comm backend JIT-compiles a shared-memory all-reduce op when it
        # starts (deepspeed/comm/torch.py, build_shm_op): ~50 s on 2 cores the first time on
        # a machine, and a C++ compiler needed. Only inference_all_reduce (tensor-parallel
        # inference) uses it; ZeRO-3 training never does. Marked incompatible, it is skipped
        # (deepspeed/ops/__init__.py keeps that dict, "so edits to it persist").
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend)


def initialize(model, ds_config: dict, lr_scheduler):
    """The DeepSpeed engine around `model` (optimizer and scheduler built from `ds_config`)."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=ds_config, lr_scheduler=lr_scheduler
    )
    return engine


def gathered(params):
    """Context in which `params` are whole on every rank (a collective).

    modifier_rank=None: nothing is modified, so no broadcast on exit (modifier_rank=0
    would send every parameter again, and refuses parameters offloaded to the CPU)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
