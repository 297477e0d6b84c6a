"""The trained model as a Hugging Face safetensors checkpoint, streamed module by module
out of the ZeRO-3 shards (never the whole model in one process)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from s2d_ray.training import zero3


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


class ShardWriter:
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
    import torch
    from transformers.core_model_loading import revert_weight_conversion

    model = engine.module
    optimizer = getattr(engine, "optimizer", None)
    if hasattr(optimizer, "checkpoint_event_prologue"):
        optimizer.checkpoint_event_prologue()  # every parameter partitioned: a clean start
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out_dir, shard_bytes) if out_dir is not None else None
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
        with zero3.gathered([p for _, p in params]):
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

