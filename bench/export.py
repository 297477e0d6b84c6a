"""Peak host memory of exporting a ZeRO-3 model: DeepSpeed's consolidated state dict vs
s2d's streamed export (`training.export_hf`), same model, same run.

Each way runs in a fresh process (so one way's freed memory cannot hide the other's):
load the model into ZeRO-3 (one CPU rank, with its optimizer), reset the kernel's peak-RSS
mark, export, and read the peak again. The difference is what the export itself held.
Then the 70B extrapolation: the consolidated way holds the whole model in rank 0's
memory; the streamed way holds one shard plus one module.

    python bench/export.py [--dtype bfloat16|float32] [--shard-mib 4096 --shard-mib 32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MIB = 2**20
# Both ways under one allocator setting: large blocks are mmap'd and go back to the
# kernel when freed, so the peak RSS is memory really held, not glibc's free lists.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
LLAMA2_70B = {"hidden_size": 8192, "num_hidden_layers": 80, "vocab_size": 32000, "intermediate_size": 28672,
              "num_attention_heads": 64, "num_key_value_heads": 8}  # fmt: skip


def rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(mode: str, dtype: str, shard_mib: int) -> dict:
    """One export in this process; prints its figures as JSON."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed
    import torch

    from s2d_ray.config import TrainConfig
    from s2d_ray.models import resolve_model
    from s2d_ray.training import build_zero3_config, consolidated_export, export_hf, load_zero3_model, local_process_group

    torch.set_num_threads(1)
    local_process_group("gloo")
    cfg = TrainConfig(workers=1, bf16=dtype == "bfloat16", gradient_checkpointing=False, steps=1)
    ds_config = build_zero3_config(cfg, 1, 1, on_cpu=True)
    model, _, hf_ds = load_zero3_model(str(resolve_model("smollm2", None)), cfg, ds_config)  # noqa: F841
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    model_bytes = sum(p.ds_numel * p.element_size() for p in model.parameters())
    out = Path(tempfile.mkdtemp(prefix="s2d-bench-export-"))
    try:
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
        before = rss_bytes("VmRSS")
        started = time.perf_counter()
        if mode == "consolidated":
            consolidated_export(engine, out)
        else:
            export_hf(engine, out, shard_bytes=shard_mib * MIB)
        seconds = time.perf_counter() - started
        peak = rss_bytes("VmHWM")
        written = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        files = len(list(out.glob("*.safetensors")))
    finally:
        import shutil

        shutil.rmtree(out, ignore_errors=True)
    return {"mode": mode, "shard_mib": shard_mib if mode == "streamed" else None, "peak_extra": peak - before,
            "model_bytes": model_bytes, "written": written, "files": files, "seconds": seconds}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--shard-mib", type=int, action="append", help="streamed shard sizes (default: 4096 and 32)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "SHARD_MIB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT-JSON " + json.dumps(child(args.child[0], args.dtype, int(args.child[1]))), flush=True)
        return

    shards = args.shard_mib or [4096, 32]
    ways = [("consolidated", 0)] + [("streamed", s) for s in shards]
    runs: dict[tuple, list[dict]] = {}
    for rep in range(args.repeat):
        for mode, shard in ways if rep % 2 == 0 else ways[::-1]:  # alternate the order
            proc = subprocess.run(
                [sys.executable, __file__, "--dtype", args.dtype, "--child", mode, str(shard)],
                capture_output=True, text=True, cwd=ROOT, env={**os.environ, **ALLOCATOR_ENV},
            )  # fmt: skip
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT-JSON ")), None)
            if proc.returncode != 0 or line is None:
                sys.exit(f"export bench: the {mode} run failed:\n{proc.stderr[-3000:]}")
            runs.setdefault((mode, shard), []).append(json.loads(line.removeprefix("RESULT-JSON ")))

    from s2d_ray.estimate import params_from_config

    model_bytes = runs[ways[0]][0]["model_bytes"]
    print(f"SmolLM2-135M in {args.dtype}: {model_bytes / MIB:.0f} MiB of weights; one CPU rank; "
          f"peak host memory added by the export (max of {args.repeat} runs each):")  # fmt: skip
    peaks = {}
    for mode, shard in ways:
        r = runs[(mode, shard)]
        peaks[(mode, shard)] = max(x["peak_extra"] for x in r)
        label = mode if mode == "consolidated" else f"streamed, {shard} MiB shards"
        print(f"  {label:<28} {peaks[(mode, shard)] / MIB:7.0f} MiB  ({peaks[(mode, shard)] / model_bytes:.2f} x the "
              f"weights; {r[0]['files']} file(s), {min(x['seconds'] for x in r):.1f} s)")  # fmt: skip
    consolidated = peaks[ways[0]]
    small = ways[-1]
    ratio = peaks[small] / consolidated
    # 70B: the consolidated way's measured overhead factor times the model; the streamed
    # way holds one shard plus the largest module (the embedding matrix) at most.
    b70 = params_from_config(LLAMA2_70B) * 2
    largest = LLAMA2_70B["vocab_size"] * LLAMA2_70B["hidden_size"] * 2
    factor = consolidated / model_bytes
    print(f"Llama-2-70B in bf16 ({b70 / 2**30:.0f} GiB of weights), on rank 0: consolidated ~{factor * b70 / 2**30:.0f} GiB "
          f"(measured factor {factor:.2f} x the weights); streamed at most {(4096 * MIB + largest) / 2**30:.1f} GiB "
          f"(a 4 GiB shard + the {largest / 2**30:.2f} GiB embedding)")  # fmt: skip
    print(f"RESULT consolidated_mib={consolidated / MIB:.0f} "
          + " ".join(f"streamed_{s}mib_mib={peaks[('streamed', s)] / MIB:.0f}" for _, s in ways[1:])
          + f" ratio_streamed_consolidated={ratio:.3f} est_70b_consolidated_gib={factor * b70 / 2**30:.0f}"
          f" est_70b_streamed_gib={(4096 * MIB + largest) / 2**30:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
