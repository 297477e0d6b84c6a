"""Full fine-tuning with DeepSpeed ZeRO-3 in a Ray Train worker group.

The only module that imports DeepSpeed. Each worker reads its Ray Data shard of
the distillation set, trains on (prompt -> final answer) with the prompt masked out
of the loss, and rank 0 exports a Hugging Face safetensors checkpoint that is
handed back through Ray Train's checkpointing.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

from s2d_ray.chat import chat_prompt
from s2d_ray.config import TrainConfig
from s2d_ray.errors import S2DError
from s2d_ray.placement import FAKE_GPUS_ENV, fake_gpus, trainer_scaling, wait_for_free_gpu

IGNORE = -100
TRAINER_FREE_GPU = 0.8  # share of a GPU's memory a rank waits for before it loads the model


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


def train_micro_batch(engine, examples: list[tuple[list[int], list[int]]], pad_id: int):
    """Forward, backward and step of one micro-batch; returns (detached loss, non-padding
    tokens). The loss stays on the device: reading it is one sync per step, by the caller.

    DeepSpeed's `engine.forward` does not move inputs: the batch goes to the engine's
    device here (a CUDA rank would otherwise get CPU tensors and fail on its first step).
    """
    batch = collate(examples, pad_id)
    tokens = int(batch[2].sum())  # on the host, before the copy: no device sync
    input_ids, labels, mask = (t.to(engine.device, non_blocking=True) for t in batch)
    loss = engine(input_ids=input_ids, attention_mask=mask, labels=labels).loss
    engine.backward(loss)
    engine.step()
    return loss.detach(), tokens


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


def train_loop(config: dict) -> None:
    """Runs in every Ray Train worker."""
    os.environ.update(config["env"])  # before DeepSpeed picks its accelerator on import
    import deepspeed
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
    deepspeed.init_distributed(dist_backend=config["backend"])
    # DeepSpeed clones the world group for data parallelism without a timeout (torch's
    # default, 10 minutes, would apply to ZeRO-3's reduce-scatters): give it ours.
    set_data_parallel_timeout(world, cfg.collective_timeout_s)
    ds_config = build_zero3_config(cfg, world, steps, on_cpu=config["on_cpu"])
    model, tokenizer, hf_ds = load_zero3_model(config["model_path"], cfg, ds_config)  # noqa: F841 (hf_ds kept alive)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=ds_config, lr_scheduler=lr_schedule(cfg, steps)
    )

    shard = ray.train.get_dataset_shard("train")
    # A stream is one pass as generation produces it; the split is equal across ranks and
    # micro-batches have fixed row counts there, so every rank runs out at the same step.
    batches = micro_batches(shard, cfg, cycle=not config["stream"])
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
    every = checkpoint_interval(cfg, steps) if not config["stream"] else 0
    metrics = {"step": first - 1, "loss": None, "tokens": tokens_seen, "seconds": 0.0}
    for step in range(first, steps + 1):
        losses = []
        for _ in range(cfg.grad_accum):
            batch = next(batches, None)
            if batch is None:
                break
            consumed += 1
            loss, tokens = train_micro_batch(engine, batch, pad)
            tokens_seen += tokens
            padded += len(batch) * max(len(ids) for ids, _ in batch)
            losses.append(loss)
        if not losses:
            if rank == 0:
                print(f"train: the stream ended after {step - 1} of {steps} steps", flush=True)
            break
        elapsed = time.perf_counter() - started
        loss = sum(float(x) for x in losses) / len(losses)
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
            save_checkpoint(engine, rank, state, metrics)

    if metrics["step"] == 0:  # nothing came down the stream: no model, not the base one renamed
        ray.train.report(metrics)
        return
    # Staged on the node's local disk (TMPDIR), then uploaded by Ray Train to its storage.
    export = Path(tempfile.mkdtemp(prefix="s2d-export-"))
    try:
        # Collective: every rank takes part in gathering the ZeRO-3 shards; rank 0 writes.
        export_hf(engine, export if rank == 0 else None, shard_bytes=int(cfg.export_shard_gib * 2**30))
        checkpoint = None
        if rank == 0:
            tokenizer.save_pretrained(export)
            (export / TRAIN_STATE).write_text(json.dumps({**metrics, "final": True, "tokens_total": tokens_seen * world}))
            checkpoint = ray.train.Checkpoint.from_directory(str(export))
        ray.train.report({**metrics, "tokens_total": tokens_seen * world, "final": True}, checkpoint=checkpoint)
    finally:
        shutil.rmtree(export, ignore_errors=True)


def note_step(path: str, record: dict) -> None:
    """Rank 0: one line per step (or resume) in the attempt's progress file, read by the
    driver for its live progress and kept as the run's loss curve."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as err:  # progress only: never worth a failed step (the loss is printed in the log too)
        print(f"train: could not write the progress file {path}: {err}", flush=True)


def _records(lines: list[str]):
    """The progress file's records; a line cut short by a kill is skipped."""
    for line in lines:
        try:
            yield json.loads(line)
        except ValueError:
            continue


def read_steps(path: Path) -> tuple[list[dict], list[int]]:
    """(one record per step, the latest of repeats after a resume; the steps resumed from)."""
    steps: dict[int, dict] = {}
    resumed = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return [], []
    for rec in _records(lines):
        if "resumed" in rec:
            resumed.append(int(rec["resumed"]))
        elif "step" in rec:
            steps[int(rec["step"])] = rec
    return [steps[k] for k in sorted(steps)], resumed


class StepWatch:
    """The driver's view of a training while Ray Train runs it: rank 0's progress file,
    read every second, shown as the training's progress (one line per step on a terminal)."""

    def __init__(self, path: Path, steps: int, log):
        from s2d_ray.console import Console, progress

        self.path, self.steps, self.log = path, steps, log
        self.per_step = isinstance(log, Console) and log.tty
        self.tracker = progress(log, "train", steps, "steps")
        # Only what this command's training writes (an earlier, interrupted one wrote the rest).
        self._offset = path.stat().st_size if path.exists() else 0
        self._stop = None

    def __enter__(self) -> "StepWatch":
        import threading

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()
        self.tracker.close()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.poll()

    def poll(self) -> None:
        try:
            with open(self.path, encoding="utf-8") as f:
                f.seek(self._offset)
                chunk = f.read()
        except OSError:
            return
        whole = chunk[: chunk.rfind("\n") + 1]
        self._offset += len(whole.encode("utf-8"))
        for rec in _records(whole.splitlines()):
            if "resumed" in rec:
                self.log(f"train: resumed from the checkpoint of step {rec['resumed']} of {rec['steps']}")
                self.tracker.base = int(rec["resumed"])  # the ETA counts only this command's steps
                continue
            rate = rec["tokens"] / max(rec["seconds"], 1e-9)
            status = f"loss {rec['loss']:.4f}, {rate:,.0f} tok/s/worker (padding {rec['padding']:.0%})"
            if self.per_step:
                self.log(f"train step {rec['step']}/{self.steps}: {status}")
            self.tracker.update(rec["step"], status)


SAFETENSORS_DTYPES = {
    "float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}  # fmt: skip


def write_safetensors(path: Path, tensors: dict) -> None:
    """One safetensors file, written straight from the tensors' memory: no serialized copy
    of the shard next to the shard (safetensors' save_file makes one). Format: 8-byte
    little-endian header length, JSON header (padded to 8 bytes), raw little-endian data."""
    import torch

    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[str(t.dtype).removeprefix("torch.")], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}  # fmt: skip
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for t in tensors.values():
            if t.numel():
                f.write(memoryview(t.contiguous().view(-1).view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, 0o644)


ZERO_TAG = "zero"  # DeepSpeed's checkpoint tag: <checkpoint>/zero/<one file per rank and kind>
TRAIN_STATE = "s2d_train_state.json"  # step, tokens, micro-batches consumed; "final" on the export


def checkpoint_interval(cfg: TrainConfig, steps: int) -> int:
    """Steps between checkpoints: `train.checkpoint_every`, or about ten a run; 0: none.
    Unset and under ten steps: none (redoing a few steps costs less than saving them)."""
    if cfg.checkpoint_every is not None:
        return cfg.checkpoint_every
    return steps // 10 if steps >= 10 else 0


def save_checkpoint(engine, rank: int, state: dict, metrics: dict) -> None:
    """Every rank writes its own ZeRO-3 shard (model, optimizer, scheduler) to local disk
    and reports it; Ray Train merges the ranks' files into one checkpoint folder, which
    counts only once every rank's upload has finished (a cut-short save never becomes the
    latest checkpoint). Collective."""
    import ray.train

    folder = Path(tempfile.mkdtemp(prefix="s2d-ckpt-"))
    try:
        engine.save_checkpoint(str(folder), tag=ZERO_TAG)
        if rank == 0:
            (folder / TRAIN_STATE).write_text(json.dumps(state))
        ray.train.report(dict(metrics), checkpoint=ray.train.Checkpoint.from_directory(str(folder)))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class _ShardWriter:
    """Safetensors shards written as they fill, named and indexed as transformers does."""

    def __init__(self, out_dir: Path, shard_bytes: int):
        self.out_dir, self.shard_bytes = out_dir, max(1, shard_bytes)
        self.pending: dict = {}
        self.pending_bytes = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total = 0
        self.dtypes: set = set()

    def add_module(self, tensors: dict) -> None:
        """One module's tensors, kept in one shard (a conversion on save may need them together)."""
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.pending and self.pending_bytes + size > self.shard_bytes:
            self.flush()
        self.pending.update(tensors)
        self.pending_bytes += size
        self.total += size
        self.dtypes.update(t.dtype for t in tensors.values() if t.is_floating_point())

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.out_dir / f".shard-{len(self.files):05d}.safetensors"
        write_safetensors(path, self.pending)
        self.files.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[Path]:
        self.flush()
        count = len(self.files)
        names = ["model.safetensors"] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
        weight_map = {}
        for (path, keys), name in zip(self.files, names):
            os.replace(path, self.out_dir / name)
            weight_map.update({key: name for key in keys})
        if count > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return [self.out_dir / n for n in names]


def export_hf(engine, out_dir: Path | None, shard_bytes: int = 4 * 2**30) -> dict | None:
    """Write the ZeRO-3 model as a Hugging Face safetensors checkpoint without ever holding
    the whole model in one process: parameters are gathered one module at a time (on every
    rank: it is a collective) and rank 0 (`out_dir` given) copies them to host memory and
    writes a shard as soon as it holds `shard_bytes`. Peak host memory on rank 0 is one
    shard plus one module, not the model (a 70B model in bf16 is ~140 GB).

    Tied parameters (lm_head sharing the input embeddings) are written once, under the
    name transformers keeps (`all_tied_weights_keys`: target -> source, targets dropped);
    non-persistent buffers are left out; transformers' load-time renames are reverted
    per module, as its own save_pretrained does.
    """
    import deepspeed
    import torch
    from transformers.core_model_loading import revert_weight_conversion

    model = engine.module
    optimizer = getattr(engine, "optimizer", None)
    if hasattr(optimizer, "checkpoint_event_prologue"):
        optimizer.checkpoint_event_prologue()  # every parameter partitioned: a clean start
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out_dir, shard_bytes) if out_dir is not None else None
    tied_targets = set(getattr(model, "all_tied_weights_keys", None) or {})
    seen: set[int] = set()  # on every rank, so that a tied parameter is not gathered twice
    for prefix, module in model.named_modules():
        params = []
        for n, p in module.named_parameters(recurse=False):
            name, key = f"{prefix}.{n}" if prefix else n, getattr(p, "ds_id", id(p))
            if p is not None and key not in seen and name not in tied_targets:
                seen.add(key)
                params.append((name, p))
        buffers = [
            (f"{prefix}.{n}" if prefix else n, b) for n, b in module.named_buffers(recurse=False)
            if b is not None and n not in module._non_persistent_buffers_set
        ]  # fmt: skip
        if not params and not buffers:
            continue
        # modifier_rank=None: nothing is modified, so no broadcast on exit (modifier_rank=0
        # would send every parameter again, and refuses parameters offloaded to the CPU).
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            if writer is not None:
                # copy=True: on a CPU rank .to("cpu") would alias the gathered buffer.
                tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in params + buffers}
                writer.add_module(revert_weight_conversion(model, tensors))
    if hasattr(optimizer, "checkpoint_event_epilogue"):
        optimizer.checkpoint_event_epilogue()
    if writer is None:
        return None
    files = writer.close()
    config = model.config
    config.use_cache = True
    config.architectures = [type(model).__name__]
    if writer.dtypes:
        config.dtype = next(iter(writer.dtypes)) if len(writer.dtypes) == 1 else torch.float32
    config.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    return {"files": len(files), "bytes": writer.total}


def consolidated_export(engine, out_dir: Path | None) -> None:
    """DeepSpeed's own way (whole model gathered into rank 0's memory, then saved): kept
    only as the baseline of bench/export.py."""
    state = engine._zero3_consolidated_16bit_state_dict()
    if out_dir is not None:
        engine.module.config.use_cache = True
        engine.module.save_pretrained(out_dir, state_dict=state, safe_serialization=True)


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
    import deepspeed

    if port is None and "MASTER_PORT" not in os.environ:
        port = free_port()
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port) if port else os.environ["MASTER_PORT"],
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
    )  # fmt: skip
    deepspeed.init_distributed(dist_backend=backend)


def train(
    distill_dir: Path, model_path: Path, out_dir: Path, storage: Path, cfg: TrainConfig, log=print,
    attempt: str | None = None, trained_from: dict | None = None,
) -> dict:
    """Fine-tune on the distillation set; writes a Hugging Face checkpoint to `out_dir`.

    `attempt` names this training's storage under `storage` (a fingerprint of its inputs):
    a rerun with the same inputs resumes from its latest checkpoint; other attempts'
    storage is removed, so a stale checkpoint never becomes this run's result."""
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
    ds = tokenized(ds, model_path, cfg).materialize()  # once, here: the workers only batch and pad
    steps = total_steps(cfg, rows)
    every = checkpoint_interval(cfg, steps)
    log(f"training: {rows} rows, {steps} steps, {cfg.workers} workers, ZeRO-3"
        + (f", a checkpoint every {every} steps" if every else ""))  # fmt: skip
    return fit(ds, rows, steps, model_path, out_dir, storage, cfg, stream=False, attempt=attempt, log=log,
               trained_from=trained_from)  # fmt: skip


def train_stream(ds, model_path: Path, out_dir: Path, storage: Path, cfg: TrainConfig, log=print) -> dict:
    """Fine-tune on a distillation stream while it is generated (one pass, `cfg.steps` at most).

    A stream cannot be replayed: no checkpoints, no restarts; a failure fails the stage
    (the rows are in generate/ and distill/, so `s2d train` can then train on them)."""
    log(f"training: streaming, up to {cfg.steps} steps, {cfg.workers} workers, ZeRO-3")
    return fit(tokenized(ds, model_path, cfg), None, cfg.steps, model_path, out_dir, storage, cfg, stream=True, attempt=None, log=log)


TRAINED_FROM = ".s2d-trained-from.json"  # in model/: the inputs it was trained from (pipeline.py)
READY = "export-ready"  # in an attempt's storage: the export, moved out of Ray Train's records


def complete_export(folder: Path) -> bool:
    """An exported model whose every file is whole: config.json, and each safetensors file
    (all those the index names) as long as its own header says (an upload cut short is not)."""
    if not (folder / "config.json").is_file():
        return False
    index = folder / "model.safetensors.index.json"
    try:
        names = set(json.loads(index.read_text())["weight_map"].values()) if index.exists() else {"model.safetensors"}
        for name in names:
            path = folder / name
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if path.stat().st_size != 8 + size + end:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def finished_export(attempt_dir: Path) -> Path | None:
    """The exported model of an attempt whose training ended but whose driver did not get
    to move it into place (killed in between), if there is a whole one."""
    if complete_export(attempt_dir / READY):
        return attempt_dir / READY
    done = []
    for state in attempt_dir.glob(f"checkpoint_*/{TRAIN_STATE}"):
        try:
            final = json.loads(state.read_text()).get("final")
        except (OSError, ValueError):
            continue
        if final and complete_export(state.parent):
            done.append(state.parent)
    return max(done, key=lambda p: p.name) if done else None


def fit(
    ds, rows: int | None, steps: int, model_path: Path, out_dir: Path, storage: Path, cfg: TrainConfig, stream: bool,
    attempt: str | None, log=print, trained_from: dict | None = None,
) -> dict:
    """Run the Ray Train worker group over `ds` and move its exported model into `out_dir`."""
    import uuid

    from s2d_ray.rundir import replace_dir

    name = f"train-{attempt or uuid.uuid4().hex[:16]}"
    storage.mkdir(parents=True, exist_ok=True)
    steps_file = storage / f"{name}.steps.jsonl"  # rank 0's progress: the loss curve
    for other in storage.iterdir():  # earlier attempts on other inputs: never this one's result
        if other.is_dir() and other.name != name:
            shutil.rmtree(other, ignore_errors=True)
        elif other.is_file() and other != steps_file:
            other.unlink(missing_ok=True)
    started = time.perf_counter()
    attempt_dir = storage / name
    exported = finished_export(attempt_dir)
    if exported is not None:
        log(f"training: this attempt had already finished ({storage.name}/{name}); using its exported model")
        metrics = json.loads((exported / TRAIN_STATE).read_text())
    else:
        with StepWatch(steps_file, steps, log):
            exported, metrics = _run_trainer(ds, steps, model_path, storage, cfg, stream, name, steps_file)
    ready = attempt_dir / READY
    if exported != ready:
        # Ray Train's record of this attempt lists the export: once it is moved, a rerun
        # must not reload that record (it would name a missing checkpoint), so it goes first.
        (attempt_dir / "checkpoint_manager_snapshot.json").unlink(missing_ok=True)
        shutil.move(str(exported), str(ready))  # a rename on one filesystem: stored once
    (ready / TRAIN_STATE).write_text(json.dumps(metrics))  # found again if killed below
    if trained_from is not None:
        (ready / TRAINED_FROM).write_text(json.dumps(trained_from))
    replace_dir(ready, out_dir)  # killed before it: the rerun finds `ready` again
    (out_dir / TRAIN_STATE).unlink(missing_ok=True)
    shutil.rmtree(attempt_dir, ignore_errors=True)  # its ZeRO-3 checkpoints are spent
    curve, _ = read_steps(steps_file)
    steps_file.unlink(missing_ok=True)
    return {
        "rows": rows,
        "steps": metrics.get("step", steps),
        "streaming": stream,
        "final_loss": metrics.get("loss"),
        "tokens": metrics.get("tokens_total"),
        "seconds": time.perf_counter() - started,
        "workers": cfg.workers,
        # Per step: [step, loss, non-padding tokens/s per worker] (a resumed step: its last run).
        "loss_curve": [[r["step"], r["loss"], r["tokens"] / max(r["seconds"], 1e-9)] for r in curve],
    }


def _run_trainer(ds, steps: int, model_path: Path, storage: Path, cfg: TrainConfig, stream: bool, name: str,
                 steps_file: Path):  # fmt: skip
    """Ray Train's fit; returns (the exported model's folder in storage, final metrics)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from s2d_ray.cluster import ray_logs_dir

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
            "progress": str(steps_file),
        },
        scaling_config=ScalingConfig(**trainer_scaling(cfg)),
        # Covers every collective, the export's gathers while rank 0 writes a shard included.
        torch_config=TorchConfig(backend=backend, timeout_s=int(cfg.collective_timeout_s)),
        datasets={"train": ds},
        run_config=RunConfig(
            name=name,
            storage_path=str(storage),
            # A dead rank restarts the group from the latest checkpoint (a stream cannot be replayed).
            failure_config=FailureConfig(max_failures=0 if stream else cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as err:  # Ray Train wraps the ranks' errors; one line, and where to look
        cause = str(err).strip().splitlines()
        kept = sorted((storage / name).glob("checkpoint_*"))
        resume = f"; the latest checkpoint is kept ({kept[-1].name}): rerun the same command to resume" if kept else ""
        raise S2DError(
            f"training failed after {cfg.max_failures} restart(s): {cause[-1] if cause else type(err).__name__}"
            f"{resume} (full log: {ray_logs_dir()})"
        ) from None
    metrics = result.metrics or {}
    if result.checkpoint is None or not metrics.get("final"):
        if stream and not metrics.get("step"):
            raise EmptyDistillSet("the distillation stream brought no rows: the filter kept no input")
        raise S2DError("training finished without an exported model")
    return Path(result.checkpoint.path), metrics
