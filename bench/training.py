"""ZeRO-3 training throughput: s2d's trainer step against a plain torch loop (CPU), and
tokens/s per GPU with model FLOPs utilisation for Llama shapes (CUDA).

Every measurement runs in a fresh process (DeepSpeed and torch.distributed keep global
state), on randomly initialised Llama-shaped models built from a config: no weights are
needed. Steps are s2d's own (`load_zero3_model`, `build_zero3_config`,
`train_micro_batch`): bf16 or fp32, gradient checkpointing, ZeRO-3, optimizer offload.

    python bench/training.py                                   # CPU: ZeRO-3 vs plain loop, SmolLM2 shape
    python bench/training.py --device cuda --shapes 1b,7b      # one GPU: offload off and on, MFU
    python bench/training.py --device cuda --peak-tflops 989   # a GPU the table below does not know

CUDA: a shape whose ZeRO-3 state does not fit one GPU (or, offloaded, the host) is cut
to fewer layers, and the output says so. MFU counts model FLOPs (6 x parameters per
token plus attention), not the recomputation of gradient checkpointing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    # name: hidden, intermediate, layers, heads, kv heads, vocab
    "smollm2": (576, 1536, 30, 9, 3, 49152),  # the embedded model's shape (135M)
    "1b": (2048, 5632, 22, 32, 4, 32000),  # TinyLlama-1.1B
    "7b": (4096, 11008, 32, 32, 32, 32000),  # Llama-2-7B
}
# Dense bf16 peak of one GPU, FLOP/s (vendor figures, no sparsity).
PEAK_BF16 = {"H200": 989e12, "H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H100": 989e12,
             "A100": 312e12, "L40S": 362e12, "A10G": 125e12}  # fmt: skip
# ZeRO-3 bytes per parameter on one GPU: bf16 weights + bf16 gradients, and unless the
# optimizer is offloaded fp32 master weights, two Adam moments and fp32 gradients.
GPU_BYTES, GPU_BYTES_OFFLOAD, HOST_BYTES_OFFLOAD = 20, 4, 16


def llama_config(shape: str, layers: int | None = None):
    from transformers import LlamaConfig

    h, inter, n_layers, heads, kv, vocab = SHAPES[shape]
    return LlamaConfig(
        hidden_size=h, intermediate_size=inter, num_hidden_layers=layers or n_layers, num_attention_heads=heads,
        num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=False,
    )  # fmt: skip


def params_of(config) -> tuple[int, int]:
    """(all parameters, parameters of one decoder layer)."""
    h, inter, heads, kv = config.hidden_size, config.intermediate_size, config.num_attention_heads, config.num_key_value_heads
    head = h // heads
    layer = h * heads * head * 2 + h * kv * head * 2 + 3 * h * inter + 2 * h
    return config.num_hidden_layers * layer + 2 * config.vocab_size * h + h, layer


def fit_layers(shape: str, offload: bool, gpu_bytes: float, host_bytes: float) -> int:
    """The most layers of `shape` whose ZeRO-3 state fits one GPU (70% of it: the rest is
    activations and workspace) and, offloaded, half the host's memory (pinned)."""
    config = llama_config(shape)
    total, layer = params_of(config)
    fixed = total - config.num_hidden_layers * layer
    per_gpu = GPU_BYTES_OFFLOAD if offload else GPU_BYTES
    budget = (0.7 * gpu_bytes) / per_gpu
    if offload:
        budget = min(budget, 0.5 * host_bytes / HOST_BYTES_OFFLOAD)
    return max(1, min(config.num_hidden_layers, int((budget - fixed) // layer)))


def model_flops_per_token(config, seq: int) -> float:
    total, _ = params_of(config)
    embedding = config.vocab_size * config.hidden_size  # a lookup, not a matmul
    return 6 * (total - embedding) + 12 * config.num_hidden_layers * config.hidden_size * seq


def batches(vocab: int, seq: int, micro: int, count: int, seed: int, varied: bool = False, bucket: bool = False):
    """`count` micro-batches of `micro` rows; `varied`: lengths drawn from seq/8..seq (as
    prompts and answers vary), padded to each micro-batch's longest; `bucket`: the same rows
    cut by s2d's length bucketing (`train.bucket_window` 16 micro-batches a window)."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(count * micro):
        n = rng.randint(max(8, seq // 8), seq) if varied else seq
        ids = [rng.randrange(3, vocab) for _ in range(n)]
        rows.append((ids, [-100] * (n // 4) + ids[n // 4 :]))  # prompt masked, as in s2d
    if not bucket:
        return [rows[i : i + micro] for i in range(0, len(rows), micro)]
    from s2d_ray.training import bucketed

    window = micro * 16
    return [b for i in range(0, len(rows), window) for b in bucketed(rows[i : i + window], micro, None, seed)]


def child(args) -> dict:
    """One measurement in this process: `zero3` (s2d's trainer step) or `plain` (torch)."""
    os.environ["DS_ACCELERATOR"] = args.device
    import torch

    gpu = args.device == "cuda"
    rank, world = int(os.environ.get("BENCH_RANK", "0")), int(os.environ.get("BENCH_WORLD", "1"))
    if not gpu:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    config = llama_config(args.shape, args.layers)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    # The same rows on every side: `--world` x (warm-up + steps) micro-batches, which the
    # ranks take in turns, so together they see what the single-process loop sees.
    share = args.world // world
    data = batches(config.vocab_size, args.seq, args.micro_batch, (args.warmup + args.steps) * args.world, seed=0,
                   varied=args.varied, bucket=args.side == "zero3_bucketed")[rank::world]  # fmt: skip
    warmup = args.warmup * share
    torch.manual_seed(0)
    if args.side.startswith("zero3"):
        import deepspeed

        from s2d_ray.config import TrainConfig
        from s2d_ray.training import build_zero3_config, load_zero3_model, local_process_group, train_micro_batch

        if gpu:
            torch.cuda.set_device(0)
        local_process_group("nccl" if gpu else "gloo", rank, world, int(os.environ.get("BENCH_PORT", "0")) or None)
        cfg = TrainConfig(
            workers=world, use_gpu=gpu, backend="nccl" if gpu else "gloo", bf16=args.bf16, gradient_checkpointing=gpu,
            offload_optimizer=args.offload, micro_batch_size=args.micro_batch, max_seq_len=args.seq, lr=1e-5,
            steps=len(data), dropout=0.0,
        )  # fmt: skip
        ds_config = build_zero3_config(cfg, world, len(data), on_cpu=not gpu)
        model, _, hf_ds = load_zero3_model(config, cfg, ds_config)  # noqa: F841 (kept alive)
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)

        def step(rows):
            return train_micro_batch(engine, rows, pad_id=0)
    else:
        from s2d_ray.training import collate

        device = "cuda" if gpu else "cpu"
        model = __import__("transformers").AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
        if gpu:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)

        def step(rows):
            ids, labels, mask = (t.to(device) for t in collate(rows, 0))
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach(), int(mask.sum())

    sync = torch.cuda.synchronize if gpu else (lambda: None)
    for rows in data[:warmup]:
        step(rows)
    sync()
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # every rank starts the clock together
    tokens, padded, started = 0, 0, time.perf_counter()
    for rows in data[warmup:]:
        loss, n = step(rows)
        tokens += n
        padded += len(rows) * max(len(ids) for ids, _ in rows)
    float(loss)
    sync()
    seconds = time.perf_counter() - started
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if gpu else None
    return {"tokens": tokens, "padded": padded, "seconds": seconds, "tps": tokens / seconds, "loss": float(loss), "peak_gpu_gib": peak_gib,
            "layers": config.num_hidden_layers, "flops_per_token": model_flops_per_token(config, args.seq)}  # fmt: skip


def run_child(args, side: str, world: int = 1, **over) -> dict:
    """One measurement in fresh processes: `world` ranks (ZeRO-3 data parallel) together;
    tokens summed over the ranks, seconds of the slowest."""
    from s2d_ray.training import free_port

    argv = [sys.executable, __file__, "--child", side, "--device", args.device, "--shape", over.get("shape", args.shape),
            "--seq", str(args.seq), "--micro-batch", str(args.micro_batch), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--world", str(args.world)]  # fmt: skip
    if over.get("layers"):
        argv += ["--layers", str(over["layers"])]
    if over.get("offload"):
        argv.append("--offload")
    if args.bf16:
        argv.append("--bf16")
    if args.varied:
        argv.append("--varied")
    port = str(free_port())
    logs = [tempfile.TemporaryFile(mode="w+") for _ in range(world)]  # files, not pipes: no rank blocks on output
    procs = [subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                              env={**os.environ, "BENCH_RANK": str(r), "BENCH_WORLD": str(world), "BENCH_PORT": port})
             for r, log in enumerate(logs)]  # fmt: skip
    deadline = time.time() + 1800
    while any(p.poll() is None for p in procs):
        failed = any(p.poll() not in (None, 0) for p in procs)
        if failed or time.time() > deadline:  # one rank died: the others would wait in a collective
            for p in procs:
                p.kill()
            break
        time.sleep(0.5)
    results = []
    for proc, log in zip(procs, logs):
        proc.wait()
        log.seek(0)
        out = log.read()
        line = next((x for x in out.splitlines() if x.startswith("RESULT-JSON ")), None)
        if proc.returncode != 0 or line is None:
            sys.exit(f"training bench: the {side} run failed:\n{out[-4000:]}")
        results.append(json.loads(line.removeprefix("RESULT-JSON ")))
    first = results[0]
    tokens, seconds = sum(r["tokens"] for r in results), max(r["seconds"] for r in results)
    return {**first, "tokens": tokens, "padded": sum(r["padded"] for r in results), "seconds": seconds,
            "tps": tokens / seconds}  # fmt: skip


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.1f} (min {min(values):.1f}, max {max(values):.1f})"


def padding_figures() -> dict[str, tuple[float, float]]:
    """Padding share of micro-batches taken in order against length-bucketed ones, on each
    local job's training inputs with their gold targets (the embedded model's tokenizer)."""
    from transformers import AutoTokenizer

    from s2d_ray.config import load_config
    from s2d_ray.models import resolve_model
    from s2d_ray.training import bucketed, encode

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model("smollm2", None)))
    out = {}
    for job in sorted((ROOT / "jobs" / "local").glob("*.yaml")):
        cfg = load_config(job, [])
        t = cfg.train
        rows = [encode(tokenizer, e.question, cfg.task.target(e.answer), t.max_seq_len)
                for e in cfg.task.examples("train") if e.answer is not None]  # fmt: skip
        size, window = t.micro_batch_size, t.micro_batch_size * t.bucket_window
        in_order = [rows[i : i + size] for i in range(0, len(rows), size)]
        buckets = [b for i in range(0, len(rows), window) for b in bucketed(rows[i : i + window], size, None, 0)]

        def share(batches) -> float:
            real = sum(len(ids) for b in batches for ids, _ in b)
            return 1 - real / sum(len(b) * max(len(ids) for ids, _ in b) for b in batches)

        out[job.stem] = (share(in_order), share(buckets))
    return out


def cpu_mode(args) -> None:
    """s2d's ZeRO-3 step on `--world` CPU ranks (default 2, the local jobs' workers), in
    micro-batches as they come and length-bucketed, against a plain single-process torch
    loop with every core: same model, rows, tokens and dtype, alternating, repeated."""
    sides = {"plain": 1, "zero3": args.world, "zero3_bucketed": args.world}
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for rep in range(args.repeat):
        order = list(sides) if rep % 2 == 0 else list(sides)[::-1]
        for side in order:
            runs[side].append(run_child(args, side, world=sides[side]))
    tps = {side: [r["tps"] for r in rs] for side, rs in runs.items()}
    tokens = {side: {r["tokens"] for r in rs} for side, rs in runs.items()}
    # Bucketing re-cuts the same rows, so its warm-up micro-batches (not measured) differ.
    assert len(tokens["plain"] | tokens["zero3"]) == 1, f"the sides trained on different tokens: {tokens}"
    ratio = statistics.median(tps["zero3"]) / statistics.median(tps["plain"])
    bucketing = statistics.median(tps["zero3_bucketed"]) / statistics.median(tps["zero3"])
    pad = {side: 1 - rs[0]["tokens"] / rs[0]["padded"] for side, rs in runs.items()}
    print(f"CPU, {args.shape} shape ({runs['zero3'][0]['layers']} layers), {'bf16' if args.bf16 else 'fp32'}, "
          f"micro-batches of {args.micro_batch} rows of {'seq/8 to ' if args.varied else ''}{args.seq} tokens, "
          f"{args.steps * args.world} micro-batches after {args.warmup * args.world} warm-up "
          f"({next(iter(tokens['plain']))} non-padding tokens), {args.repeat} alternating runs each "
          f"(non-padding tokens/s; padding share):")  # fmt: skip
    for side, label in (("plain", "plain torch loop, 1 process"), ("zero3", f"s2d ZeRO-3, {args.world} ranks"),
                        ("zero3_bucketed", f"s2d ZeRO-3, {args.world} ranks, length-bucketed")):  # fmt: skip
        print(f"  {label:<38} {spread(tps[side])}; padding {pad[side]:.0%}")
    padding = padding_figures()
    print("padding share of micro-batches, in order -> length-bucketed (local jobs' train inputs, gold targets):")
    for job, (before, after) in padding.items():
        print(f"  {job:<20} {before:6.1%} -> {after:6.1%}")
    worst = max(padding, key=lambda j: padding[j][0])
    print(f"RESULT device=cpu shape={args.shape} world={args.world} plain_tps={statistics.median(tps['plain']):.1f} "
          f"zero3_tps={statistics.median(tps['zero3']):.1f} ratio_zero3_plain={ratio:.3f} "
          f"ratio_bucketed={bucketing:.3f} "
          f"padding_in_order_{worst}={padding[worst][0]:.3f} padding_bucketed_{worst}={padding[worst][1]:.3f}")  # fmt: skip


def cuda_mode(args) -> None:
    import torch

    if not torch.cuda.is_available():
        sys.exit("training bench: --device cuda, but torch sees no CUDA device")
    props = torch.cuda.get_device_properties(0)
    name = props.name
    peak = args.peak_tflops * 1e12 if args.peak_tflops else next((v for k, v in PEAK_BF16.items() if k in name), None)
    if peak is None:
        sys.exit(f"training bench: no bf16 peak known for {name!r}; give --peak-tflops")
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print(f"{name}: {props.total_memory / 2**30:.0f} GiB, bf16 peak {peak / 1e12:.0f} TFLOP/s; host {host / 2**30:.0f} GiB; "
          f"ZeRO-3 on 1 GPU, bf16, gradient checkpointing, {args.micro_batch} x {args.seq} tokens a step")  # fmt: skip
    results = []
    for shape in args.shapes.split(","):
        full = llama_config(shape).num_hidden_layers
        for offload in (False, True):
            layers = fit_layers(shape, offload, props.total_memory, host)
            tps = [run_child(args, "zero3", shape=shape, layers=layers, offload=offload) for _ in range(args.repeat)]
            best = max(tps, key=lambda r: r["tps"])
            mfu = best["tps"] * best["flops_per_token"] / peak
            cut = "" if layers == full else f", cut to {layers} of {full} layers to fit"
            params = params_of(llama_config(shape, layers))[0] / 1e9
            print(f"  {shape}{cut} ({params:.2f}B), offload {'on ' if offload else 'off'}: "
                  f"{spread([r['tps'] for r in tps])} tokens/s/GPU, MFU {mfu:.1%}, peak GPU {best['peak_gpu_gib']:.1f} GiB")  # fmt: skip
            results.append(f"{shape}_offload{int(offload)}_tps={best['tps']:.0f} {shape}_offload{int(offload)}_mfu={mfu:.3f}"
                           f" {shape}_offload{int(offload)}_layers={layers}")  # fmt: skip
    print("RESULT device=cuda gpu=" + name.replace(" ", "_") + " " + " ".join(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shape", default="smollm2", choices=sorted(SHAPES), help="CPU mode's model shape")
    parser.add_argument("--shapes", default="1b,7b", help="CUDA mode: comma-separated shapes")
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--micro-batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--layers", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--offload", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bf16", action="store_true", default=None, help="CPU mode: bf16 (CUDA: always)")
    parser.add_argument("--world", type=int, default=2, help="CPU mode: ZeRO-3 ranks (default 2)")
    parser.add_argument("--varied", action="store_true", default=None, help="rows of varied lengths (CPU default)")
    parser.add_argument("--child", choices=["zero3", "zero3_bucketed", "plain"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    gpu = args.device == "cuda"
    defaults = {"seq": 2048 if gpu else 128, "micro_batch": 4, "steps": 10 if gpu else 3, "warmup": 3 if gpu else 1,
                "repeat": 2 if gpu else 3, "bf16": gpu, "varied": not gpu}  # fmt: skip
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if gpu:
        args.world = 1  # one GPU: one rank (tokens/s per GPU)
    if args.child:
        args.side = args.child
        print("RESULT-JSON " + json.dumps(child(args)), flush=True)
    elif gpu:
        cuda_mode(args)
    else:
        cpu_mode(args)


if __name__ == "__main__":
    main()
