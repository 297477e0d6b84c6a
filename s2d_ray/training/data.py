"""The trainer's input: (prompt, target) rows tokenized once in Ray Data, the prompt
masked out of the labels, and each rank's shard cut into length-bucketed micro-batches."""

from __future__ import annotations

import math
from pathlib import Path

from s2d_ray.chat import chat_prompt
from s2d_ray.config import TrainConfig


IGNORE = -100


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
    """Right-padded CPU tensors (input ids, labels, attention mask) of one micro-batch."""
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


_TOKENIZERS: dict[str, object] = {}


def tokenize_rows(batch, model_path: str, max_len: int):
    """Ray Data stage before the trainer: (prompt, target) rows -> token ids and labels,
    tokenized once here instead of inside every training step."""
    import pandas as pd
    from transformers import AutoTokenizer

    if model_path not in _TOKENIZERS:
        _TOKENIZERS[model_path] = AutoTokenizer.from_pretrained(model_path)
    tokenizer = _TOKENIZERS[model_path]
    encoded = [encode(tokenizer, p, t, max_len) for p, t in zip(batch["prompt"], batch["target"])]
    return pd.DataFrame({"input_ids": [e[0] for e in encoded], "labels": [e[1] for e in encoded]})


def tokenized(ds, model_path: Path, cfg: TrainConfig):
    """The distillation set (or stream) with token ids, for the trainer workers."""
    return ds.map_batches(
        tokenize_rows, fn_kwargs={"model_path": str(model_path), "max_len": cfg.max_seq_len},
        batch_format="pandas", num_cpus=0,  # light, and the trainer ranks may hold every CPU
    )  # fmt: skip


def bucketed(rows: list[tuple[list[int], list[int]]], size: int, max_tokens: int | None, seed: int):
    """One window of rows cut into micro-batches of similar lengths: sorted by length, cut
    every `size` rows (sooner where rows x longest would pass `max_tokens`), then put in a
    seeded random order so that a step does not always see the longest rows."""
    import random

    rows = sorted(rows, key=lambda r: len(r[0]))
    out, current = [], []
    for row in rows:
        if current and (len(current) == size or (max_tokens and (len(current) + 1) * len(row[0]) > max_tokens)):
            out.append(current)
            current = []
        current.append(row)
    if current:
        out.append(current)
    random.Random(seed).shuffle(out)
    return out


def micro_batches(shard, cfg: TrainConfig, cycle: bool, prefetch: int = 2):
    """The worker's micro-batches, as lists of (ids, labels), from its shard of tokenized
    rows: bucketed by length within windows of cfg.bucket_window micro-batches.

    `cycle`: forever, window after window, pass after pass (every worker must take the
    same number of steps, or the ZeRO-3 collectives of the worker with more data would
    wait for ever); else one pass (a stream). The sequence is the same on every run over
    the same shard, which is what resuming at a micro-batch count relies on."""
    window = cfg.micro_batch_size * cfg.bucket_window
    k = 0
    while True:
        empty = True
        for batch in shard.iter_batches(batch_size=window, batch_format="pandas", prefetch_batches=prefetch):
            empty = False
            rows = [(list(i), list(lab)) for i, lab in zip(batch["input_ids"], batch["labels"])]
            yield from bucketed(rows, cfg.micro_batch_size, cfg.micro_batch_tokens, cfg.seed + k)
            k += 1
        if not cycle:
            return
        if empty:
            raise RuntimeError("this worker's shard of the distillation set is empty")

