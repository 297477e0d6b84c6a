"""`s2d serve` against vLLM's own OpenAI server, and the distilled route against System 2.

(1) The `distilled` route of `s2d serve RUN` and `python -m vllm.entrypoints.openai.api_server`
    of the same exported model (RUN/model) with the same engine arguments, both up at once
    on this machine, each asked the same requests (the job's test inputs, cycled) by the
    `openai` client from 64 concurrent tasks, in alternating rounds: throughput and p50/p99
    latency per side, medians and spreads over the rounds. Goals: throughput >= 0.9x,
    p99 <= 1.2x.
(2) The `distilled` and `system2` routes on the same inputs: tokens per answer, latency,
    requests/s and money per 1,000 requests at the job's price (`--price` overrides).

    .venv/bin/python bench/serve.py [--run runs/local-triviaqa] [--requests 256] [--rounds 3]

The run directory must hold a trained model/ (`make run` writes runs/local-triviaqa).
Last line: RESULT throughput_ratio=... p99_ratio=... tokens_distilled=... tokens_system2=... ...
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
S2D_PORT, VLLM_PORT = 8741, 8742


def wait_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            sys.exit(f"bench: the server behind {url} did not come up; see {log}")
        time.sleep(1)


def vllm_server(model: Path, cfg, log: Path) -> subprocess.Popen:
    """vLLM's own server with the engine arguments s2d's engine gets (engine_kwargs)."""
    from s2d_ray.engine import CPU_ENGINE_ENV, engine_kwargs

    kwargs = engine_kwargs(str(model), cfg.engine, cfg.model.dtype, cfg.sampling.seed)
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--port", str(VLLM_PORT),
            "--served-model-name", "distilled"]  # fmt: skip
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not False:
            args += [flag, str(value)]
    # The server's own process layout (front end + engine core); the rest of s2d's CPU settings.
    env = {**os.environ, **{k: v for k, v in CPU_ENGINE_ENV.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}}
    return subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def s2d_server(run: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "s2d_ray.cli", "serve", str(run), "--port", str(S2D_PORT)], cwd=ROOT,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


async def load(base: str, model: str, questions: list[str], clients: int, max_tokens: int | None) -> dict:
    """Every question once, `clients` at a time: wall time, latencies, tokens."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base, api_key="bench", max_retries=0, timeout=1800)
    gate = asyncio.Semaphore(clients)
    latencies, tokens, failed = [], [], 0

    async def one(q: str) -> None:
        nonlocal failed
        async with gate:
            started = time.perf_counter()
            # Greedy with the evaluation's max_tokens, said outright for vLLM's server (a
            # system2 route samples as its job does: nothing to set).
            extra = {"max_tokens": max_tokens, "temperature": 0.0} if max_tokens else {}
            try:
                reply = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}], **extra)
            except Exception:  # noqa: BLE001 (counted: a bench must finish)
                failed += 1
                return
            latencies.append(time.perf_counter() - started)
            tokens.append(reply.usage.completion_tokens)

    started = time.perf_counter()
    await asyncio.gather(*(one(q) for q in questions))
    wall = time.perf_counter() - started
    await client.close()
    lat = sorted(latencies)
    pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")  # noqa: E731
    return {"wall": wall, "rps": len(lat) / wall, "p50": pick(0.5), "p99": pick(0.99), "failed": failed,
            "tokens": statistics.mean(tokens) if tokens else 0.0}  # fmt: skip


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3g} ({min(values):.3g}-{max(values):.3g})"


def main() -> None:
    from s2d_ray.serving.routes import load_route

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default=str(ROOT / "runs" / "local-triviaqa"))
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--system2-inputs", type=int, default=32)
    ap.add_argument("--price", type=float, default=None, help="price of one device-hour (default: the job's)")
    args = ap.parse_args()
    run = Path(args.run)
    if not (run / "model" / "config.json").exists():
        sys.exit(f"bench: {run} has no trained model/; run `make run` (or pass --run RUN_DIR)")
    route = load_route(run)
    cfg = route.cfg
    questions = [e.question for e in cfg.task.examples(cfg.eval.split)]
    if not questions:
        sys.exit(f"bench: the job's eval split {cfg.eval.split!r} has no inputs")
    requests = [questions[i % len(questions)] for i in range(args.requests)]
    work = Path(tempfile.mkdtemp(prefix="s2d-bench-serve-"))
    print(f"{route.name}: {len(requests)} requests ({len(questions)} distinct test inputs), {args.clients} clients, "
          f"{args.rounds} alternating rounds; max_tokens {cfg.eval.max_tokens}, greedy; logs: {work}", flush=True)  # fmt: skip
    servers = [s2d_server(run, work / "s2d-serve.log")]
    try:
        wait_up(f"http://127.0.0.1:{S2D_PORT}/health", servers[0], work / "s2d-serve.log")
        servers.append(vllm_server(run / "model", cfg, work / "vllm-server.log"))
        wait_up(f"http://127.0.0.1:{VLLM_PORT}/health", servers[1], work / "vllm-server.log")
        sides = {"s2d": (f"http://127.0.0.1:{S2D_PORT}/v1", f"{route.name}:distilled"),
                 "vllm": (f"http://127.0.0.1:{VLLM_PORT}/v1", "distilled")}  # fmt: skip
        for base, model in sides.values():  # warm both: first-request costs out of the rounds
            asyncio.run(load(base, model, questions[:4], 4, cfg.eval.max_tokens))
        results: dict[str, list[dict]] = {"s2d": [], "vllm": []}
        for r in range(args.rounds):
            for side in (("s2d", "vllm") if r % 2 == 0 else ("vllm", "s2d")):
                base, model = sides[side]
                out = asyncio.run(load(base, model, requests, args.clients, cfg.eval.max_tokens))
                results[side].append(out)
                print(f"  round {r + 1} {side:5s}: {out['rps']:.2f} req/s, p50 {out['p50']:.2f} s, p99 {out['p99']:.2f} s, "
                      f"{out['tokens']:.1f} tokens/answer, {out['failed']} failed", flush=True)  # fmt: skip
        med = {s: {k: statistics.median(o[k] for o in v) for k in ("rps", "p50", "p99")} for s, v in results.items()}
        ratio, p99_ratio = med["s2d"]["rps"] / med["vllm"]["rps"], med["s2d"]["p99"] / med["vllm"]["p99"]
        for side, v in results.items():
            print(f"{side}: {spread([o['rps'] for o in v])} req/s, p50 {spread([o['p50'] for o in v])} s, "
                  f"p99 {spread([o['p99'] for o in v])} s (median (min-max) of {args.rounds})")  # fmt: skip
        print(f"distilled route / vLLM's server: throughput {ratio:.2f}x (goal >= 0.9), p99 {p99_ratio:.2f}x (goal <= 1.2)")

        # (2) What distillation saves per request: the same inputs through both routes.
        inputs = [questions[i % len(questions)] for i in range(args.system2_inputs)]
        base = sides["s2d"][0]
        d = asyncio.run(load(base, f"{route.name}:distilled", inputs, 16, None))
        s2 = asyncio.run(load(base, f"{route.name}:system2", inputs, 16, None))
        price = cfg.cost.device_hour_price if args.price is None else args.price
        devices = cfg.engine.gpus_per_engine if cfg.engine.device == "cuda" else 1  # a CPU engine: its node
        per_1000 = {k: 1000 / v["rps"] / 3600 * devices for k, v in (("distilled", d), ("system2", s2))}
        for name, v in (("distilled", d), ("system2", s2)):
            money = f", {price * per_1000[name]:.4g} {cfg.cost.currency} per 1,000 requests" if price else ""
            print(f"{name:9s}: {v['tokens']:.1f} tokens/answer, p50 {v['p50']:.2f} s, {v['rps']:.2f} req/s, "
                  f"{per_1000[name]:.3g} device-hours per 1,000 requests{money}")  # fmt: skip
        saving = 1 - per_1000["distilled"] / per_1000["system2"]
        print(f"distilled vs System 2: {s2['tokens'] / max(d['tokens'], 1e-9):.1f}x fewer tokens per answer, "
              f"{saving:.0%} less device time per request" + ("" if price else " (no price set: cost.device_hour_price 0)"))
        print(f"RESULT throughput_ratio={ratio:.2f} p99_ratio={p99_ratio:.2f} s2d_rps={med['s2d']['rps']:.2f} "
              f"vllm_rps={med['vllm']['rps']:.2f} tokens_distilled={d['tokens']:.1f} tokens_system2={s2['tokens']:.1f} "
              f"device_time_saving={saving:.2f}")  # fmt: skip
    finally:
        for proc in servers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in servers:
            try:
                proc.wait(timeout=180)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
