"""The trainer's input: (prompt, target) rows tokenized once in Ray Data, the prompt
masked out of the labels, and each rank's shard cut into length-bucketed micro-batches."""

from __future__ import annotations

import math
from pathlib import Path

from s2d_ray.chat import prompt_ids
from s2d_ray.config import TrainConfig


IGNORE = -100


def total_steps(cfg: TrainConfig, rows: int) -> int:
    if cfg.steps:
        return cfg.steps
    per_step = cfg.micro_batch_size * cfg.grad_accum * cfg.workers
    return max(1, math.ceil(cfg.epochs * rows / per_step))


def encode(tokenizer, prompt: str, target: str, chat_template: str | None = None) -> tuple[list[int], list[int]]:
    """Token ids and labels: the prompt (the same ids the engines are handed, `chat.prompt_ids`)
    is masked, the answer and EOS are learned."""
    prefix = prompt_ids(tokenizer, prompt, chat_template)
    answer = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prefix + answer, [IGNORE] * len(prefix) + answer


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


def tokenize_rows(batch, model_path: str, max_len: int, chat_template: str | None = None):
    """Ray Data stage before the trainer: (prompt, target) rows -> token ids and labels,
    tokenized once here instead of inside every training step. A row longer than
    `max_len` is left out, not cut: cutting from the left would drop the template's start
    (BOS, `[INST]`), from the right the answer (the driver counts what was left out)."""
    import pandas as pd
    from transformers import AutoTokenizer

    if model_path not in _TOKENIZERS:
        _TOKENIZERS[model_path] = AutoTokenizer.from_pretrained(model_path)
    tokenizer = _TOKENIZERS[model_path]
    rows = [(i, *encode(tokenizer, p, t, chat_template)) for i, p, t in zip(batch["id"], batch["prompt"], batch["target"])]
    rows = [r for r in rows if len(r[1]) <= max_len]
    return pd.DataFrame({"id": [r[0] for r in rows], "input_ids": [r[1] for r in rows], "labels": [r[2] for r in rows]})


def tokenized_distill_set(distill_dir: Path, model_path: Path, cfg: TrainConfig, chat_template: str | None = None):
    """(the distillation set's rows that fit `cfg.max_seq_len`, tokenized and sorted by id,
    as a DataFrame; how many rows the set has): (None, 0) for an empty set.

    Sorted by id: every rank reads the same order and takes its own rows from it
    (`micro_batches`), the same rows on every run. Read and tokenized here, in the
    driver, with the same `tokenize_rows` a stream goes through in Ray Data: the set is
    small text (measured on one core here: ~2,400 rows/s of ~120 tokens, so a paper job's
    ~20k rows take ~8 s), and a Ray Data read, tokenize and sort cost a cold worker start
    each, ~16 s on 2 cores before every training."""
    from s2d_ray.rundir import read_parts

    table = read_parts(Path(distill_dir), columns=["id", "prompt", "target"])  # finished parts only
    if table is None or not table.num_rows:
        return None, 0
    table = table.sort_by("id")
    return tokenize_rows(table.to_pandas(), str(model_path), cfg.max_seq_len, chat_template), table.num_rows


def tokenized(ds, model_path: Path, cfg: TrainConfig, chat_template: str | None = None):
    """The distillation set (or stream) with token ids, for the trainer workers."""
    return ds.map_batches(
        tokenize_rows, fn_kwargs={"model_path": str(model_path), "max_len": cfg.max_seq_len, "chat_template": chat_template},
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


def micro_batches(shard, cfg: TrainConfig, cycle: bool, prefetch: int = 2, rank: int = 0, world: int = 1):
    """The worker's micro-batches, as lists of (ids, labels), bucketed by length within
    windows of cfg.bucket_window micro-batches.

    `world` > 1: `shard` is the whole tokenized set in the same order on every rank (sorted
    by id, order preserved), and this rank takes every world-th row from `rank` on: the
    split is a function of the set alone, so a resumed training skips exactly the
    micro-batches it had consumed (Ray Data's own split may hand a rank other rows on
    another run once the set has several blocks). `world` 1: `shard` is this rank's.

    `cycle`: forever, window after window, pass after pass (every worker must take the
    same number of steps, or the ZeRO-3 collectives of the worker with more data would
    wait for ever); else one pass (a stream)."""
    window = cfg.micro_batch_size * cfg.bucket_window
    k = 0
    while True:
        empty = True
        for rows in _windows(shard, window, prefetch, rank, world):
            empty = False
            yield from bucketed(rows, cfg.micro_batch_size, cfg.micro_batch_tokens, cfg.seed + k)
            k += 1
        if not cycle:
            return
        if empty:
            raise RuntimeError("this worker's shard of the distillation set is empty")


def _windows(shard, window: int, prefetch: int, rank: int, world: int):
    """This rank's rows, `window` at a time."""
    rows, index = [], 0
    for batch in shard.iter_batches(batch_size=window * world, batch_format="pandas", prefetch_batches=prefetch):
        for ids, labels in zip(batch["input_ids"], batch["labels"]):
            if index % world == rank:
                rows.append((list(ids), list(labels)))
                if len(rows) == window:
                    yield rows
                    rows = []
            index += 1
    if rows:
        yield rows
