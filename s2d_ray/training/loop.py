"""The training loop every Ray Train worker runs: ZeRO-3 steps over its micro-batches,
checkpoints and resume, rank 0's progress, and the export at the end."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from s2d_ray.config import TrainConfig
from s2d_ray.hooks import record_boundary
from s2d_ray.placement import wait_for_free_gpu
from s2d_ray.training import zero3
from s2d_ray.chat import RAW
from s2d_ray.training.checkpoints import TRAIN_STATE, ZERO_TAG, checkpoint_folder, save_checkpoint
from s2d_ray.training.data import collate, micro_batches
from s2d_ray.training.export import export_hf
from s2d_ray.training.progress import note_step


TRAINER_FREE_GPU = 0.8  # share of a GPU's memory a rank waits for before it loads the model


def train_micro_batch(engine, examples: list[tuple[list[int], list[int]]], pad_id: int, full_rows: int | None = None):
    """Forward, backward and step of one micro-batch; returns (detached loss, non-padding
    tokens). The loss stays on the device: reading it is one sync per step, by the caller.

    The gradient weighs each row alike: the micro-batch's mean loss is scaled by its rows
    over `full_rows` (train.micro_batch_size), so that a bucketing remainder of one row (or
    a short micro-batch under train.micro_batch_tokens) does not count as much as a full one.

    DeepSpeed's `engine.forward` does not move inputs: the batch goes to the engine's
    device here (a CUDA rank would otherwise get CPU tensors and fail on its first step).
    """
    batch = collate(examples, pad_id)
    tokens = int(batch[2].sum())  # on the host, before the copy: no device sync
    input_ids, labels, mask = (t.to(engine.device, non_blocking=True) for t in batch)
    record_boundary("train", {"rows": [[ids, labels] for ids, labels in examples]})
    loss = engine(input_ids=input_ids, attention_mask=mask, labels=labels).loss
    engine.backward(loss * (len(examples) / full_rows) if full_rows else loss)
    engine.step()
    return loss.detach(), tokens


def train_loop(config: dict) -> None:
    """Runs in every Ray Train worker."""
    os.environ.update(config["env"])  # before DeepSpeed picks its accelerator on import
    import ray.train
    import ray.train.torch
    import torch

    cfg = TrainConfig.model_validate(config["train"])
    if config["on_cpu"]:
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    else:
        # Ray Train shares the node's GPUs among its ranks (CUDA_VISIBLE_DEVICES, whatever
        # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES says) and has set this rank's device;
        # DeepSpeed picks cuda:LOCAL_RANK, which can differ past 10 GPUs a node (Ray sorts
        # GPU ids as numbers for LOCAL_RANK, as strings for the visible list).
        device = ray.train.torch.get_device()
        os.environ["LOCAL_RANK"] = str(device.index)
        # An engine of the generation stage may still be releasing this GPU.
        free = wait_for_free_gpu(TRAINER_FREE_GPU, device=device)
        if free < TRAINER_FREE_GPU:
            print(f"train: only {free:.0%} of this rank's GPU memory is free; going on", flush=True)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    steps = config["steps"]
    # Ray Train already set up torch.distributed; DeepSpeed wraps that group.
    zero3.init_distributed(config["backend"])
    # DeepSpeed clones the world group for data parallelism without a timeout (torch's
    # default, 10 minutes, would apply to ZeRO-3's reduce-scatters): give it ours.
    zero3.set_data_parallel_timeout(world, cfg.collective_timeout_s)
    ds_config = zero3.build_zero3_config(cfg, world, steps, on_cpu=config["on_cpu"])
    model, tokenizer, hf_ds = zero3.load_zero3_model(config["model_path"], cfg, ds_config)  # noqa: F841 (hf_ds kept alive)
    engine = zero3.initialize(model, ds_config, zero3.lr_schedule(cfg, steps))

    shard = ray.train.get_dataset_shard("train")
    # A stream is one pass as generation produces it, split by Ray; the split is equal across
    # ranks and micro-batches have fixed row counts there, so every rank runs out at the same
    # step. Otherwise every rank reads the whole set and takes its own rows.
    if config["stream"]:
        batches = micro_batches(shard, cfg, cycle=False)
    else:
        batches = micro_batches(shard, cfg, cycle=True, rank=rank, world=world)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    started = time.perf_counter()
    first, tokens_seen, consumed, padded = 1, 0, 0, 0
    resumed = None if config["stream"] else ray.train.get_checkpoint()
    if resumed is not None:
        # The group was restarted (a rank died) or the command rerun on the same inputs:
        # model, optimizer and LR schedule come back from every rank's shard, and the data
        # stream skips the micro-batches the checkpointed steps had consumed.
        with resumed.as_directory() as folder:
            state = json.loads((Path(folder) / TRAIN_STATE).read_text())
            if state.get("final"):  # a rank died after the export was reported: nothing left to do
                return
            loaded, _ = engine.load_checkpoint(
                folder, tag=ZERO_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
            )  # fmt: skip
            if loaded is None:  # DeepSpeed only warns: never go on from fresh weights as if resumed
                raise RuntimeError(f"rank {rank}: the checkpoint in {folder} could not be loaded ({sorted(os.listdir(folder))})")
        first, tokens_seen, consumed = state["step"] + 1, state["tokens"], state["micro_batches"]
        padded = state.get("padded", tokens_seen)
        for _ in range(consumed):
            next(batches)
        # Training time so far, without this restart's loading and skipping: tokens/s stays
        # a rate of training.
        started = time.perf_counter() - state.get("seconds", 0.0)
        if rank == 0:
            print(f"train: resumed from the checkpoint of step {state['step']} of {steps} ({Path(loaded).parent.parent.name})", flush=True)
            note_step(config["progress"], {"resumed": state["step"], "steps": steps})
    every = config["checkpoint_every"] if not config["stream"] else 0
    metrics = {"step": first - 1, "loss": None, "tokens": tokens_seen, "seconds": 0.0}
    for step in range(first, steps + 1):
        losses = []
        for _ in range(cfg.grad_accum):
            batch = next(batches, None)
            if batch is None:
                break
            consumed += 1
            loss, tokens = train_micro_batch(engine, batch, pad, cfg.micro_batch_size)
            tokens_seen += tokens
            padded += len(batch) * max(len(ids) for ids, _ in batch)
            losses.append((loss, len(batch)))
        if not losses:
            if rank == 0:
                print(f"train: the stream ended after {step - 1} of {steps} steps", flush=True)
            break
        elapsed = time.perf_counter() - started
        loss = sum(float(x) * n for x, n in losses) / sum(n for _, n in losses)  # per row, as trained
        metrics = {"step": step, "loss": loss, "tokens": tokens_seen, "seconds": elapsed}
        padding = 1 - tokens_seen / max(padded, 1)
        if rank == 0:
            print(
                f"train step {step}/{steps}  loss {metrics['loss']:.4f}  "
                f"{tokens_seen / elapsed:.0f} tok/s/worker (non-padding; padding {padding:.0%})  "
                f"{elapsed:.0f}s",
                flush=True,
            )
            note_step(config["progress"], {**metrics, "steps": steps, "padding": padding})
        if every and step % every == 0 and step < steps:
            state = {"step": step, "tokens": tokens_seen, "micro_batches": consumed, "padded": padded, "seconds": elapsed}
            save_checkpoint(engine, rank, state, metrics, staging=cfg.checkpoint_staging)

    if metrics["step"] == 0:  # nothing came down the stream: no model, not the base one renamed
        ray.train.report(metrics)
        return
    # Written straight into the run directory's storage (or, with train.checkpoint_staging
    # local, on the node's disk and then uploaded by Ray Train).
    final = {**metrics, "tokens_total": tokens_seen * world, "final": True}
    with checkpoint_folder("checkpoint_final", cfg.checkpoint_staging) as (export, report):
        # Collective: every rank takes part in gathering the ZeRO-3 shards; rank 0 writes.
        export_hf(engine, export if rank == 0 else None, shard_bytes=int(cfg.export_shard_gib * 2**30))
        if rank == 0:
            if config.get("chat_template") not in (None, RAW):
                tokenizer.chat_template = config["chat_template"]  # the distilled model answers in the same format
            tokenizer.save_pretrained(export)
            (export / TRAIN_STATE).write_text(json.dumps(final))
        report(final, with_checkpoint=rank == 0)

