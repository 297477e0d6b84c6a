"""Train a tiny random Llama with DeepSpeed ZeRO-3 (no Ray), export it, keep its logits.

Run as a script by tests on CPU (gloo) and on CUDA (nccl, one rank per GPU): it drives
the trainer's own pieces (`load_zero3_model`, `train_micro_batch`, `export_hf`), writes
the exported checkpoint to OUT/model and the trainer's logits on a fixed batch to
OUT/check.pt. The calling test reloads OUT/model with plain transformers, without
DeepSpeed in its process, and compares.

    python -m tests.zero3_run OUT --device cpu|cuda [--world 2] [--bf16] [--offload] [--checkpointing]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCAB, SEQ, STEPS = 256, 24, 3


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )  # fmt: skip


def examples(seed: int, n: int) -> list[tuple[list[int], list[int]]]:
    """Rows of different lengths (padding is exercised); the first half of each is masked."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = rng.randint(SEQ // 2, SEQ)
        ids = [rng.randrange(2, VOCAB) for _ in range(length)]
        rows.append((ids, [-100] * (length // 2) + ids[length // 2 :]))
    return rows


def run_rank(rank: int, args) -> None:
    os.environ["DS_ACCELERATOR"] = args.device
    sys.path.insert(0, str(ROOT))
    import torch

    from s2d_ray.config import TrainConfig
    from s2d_ray.training import (
        build_zero3_config, export_hf, load_zero3_model, local_process_group, lr_schedule, train_micro_batch,
    )  # fmt: skip

    gpu = args.device == "cuda"
    if gpu:
        torch.cuda.set_device(rank)
    local_process_group("nccl" if gpu else "gloo", rank, args.world, port=args.port)
    import deepspeed

    cfg = TrainConfig(
        workers=args.world, use_gpu=gpu, backend="nccl" if gpu else "gloo", bf16=args.bf16,
        gradient_checkpointing=args.checkpointing, offload_optimizer=args.offload,
        micro_batch_size=2, lr=1e-3, steps=STEPS, dropout=0.0,
    )  # fmt: skip
    ds_config = build_zero3_config(cfg, args.world, STEPS, on_cpu=not gpu)
    torch.manual_seed(0)
    model, _, hf_ds = load_zero3_model(tiny_llama_config(), cfg, ds_config)  # noqa: F841 (kept alive)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=ds_config, lr_scheduler=lr_schedule(cfg, STEPS)
    )
    losses = []
    for step in range(STEPS):
        loss, _ = train_micro_batch(engine, examples(1000 * step + rank, 2), pad_id=0)
        losses.append(float(loss))
    probe = torch.tensor([ids for ids, _ in examples(7, 2)][0][:SEQ // 2]).unsqueeze(0)
    engine.eval()
    with torch.no_grad():
        logits = engine(input_ids=probe.to(engine.device)).logits.float().cpu()
    out = Path(args.out)
    export_hf(engine, out / "model" if rank == 0 else None, shard_bytes=args.shard_bytes)
    if rank == 0:
        (out / "model").mkdir(exist_ok=True)
        torch.save({"probe": probe, "logits": logits}, out / "check.pt")
        info = {"losses": losses, "device": str(engine.device), "world": args.world}
        (out / "train.json").write_text(json.dumps(info))
    deepspeed.comm.barrier()
    # Without it a rank may abort at exit ("terminate called without an active exception"):
    # gloo's threads outlive the interpreter's teardown.
    torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--offload", action="store_true")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--shard-bytes", type=int, default=64 * 1024)  # several shards: the index is exercised
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args()
    (Path(args.out) / "model").mkdir(parents=True, exist_ok=True)
    if args.world == 1:
        run_rank(0, args)
        return
    import torch.multiprocessing as mp

    from s2d_ray.training import free_port

    args.port = free_port()
    mp.spawn(run_rank, args=(args,), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()


def reload_and_compare(out: Path, device: str = "cpu") -> dict:
    """Reload OUT/model with plain transformers (no DeepSpeed in this process) and compare
    its logits on the probe batch with the trainer's. Returns the figures."""
    import torch
    from transformers import AutoModelForCausalLM

    check = torch.load(out / "check.pt")
    model, info = AutoModelForCausalLM.from_pretrained(out / "model", output_loading_info=True)
    model = model.to(device).eval()
    with torch.no_grad():
        logits = model(input_ids=check["probe"].to(device)).logits.float().cpu()
    diff = (logits - check["logits"]).abs().max().item()
    scale = check["logits"].abs().max().item()
    missing = [k for k in info["missing_keys"] if k != "lm_head.weight" or not model.config.tie_word_embeddings]
    return {
        "max_abs_diff": diff, "logit_scale": scale, "dtype": str(model.dtype), "model": model,
        "missing": missing, "unexpected": list(info["unexpected_keys"]),
    }  # fmt: skip
