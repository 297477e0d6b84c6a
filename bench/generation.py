"""Generation throughput: a plain `vllm.LLM` vs. the s2d generation path, same run.

Both sides get the same prompts (the first step of the job's System 2 method, chat
formatted identically), the same sampling settings and the same engine settings:
(a) one `vllm.LLM.generate` call in this process, (b) `run_passes`: Ray Data, the
GeneratorActor pool, the voting stage and the Parquet writes. Prints tokens/s of both
and their ratio. The s2d side's wall time includes its engine start inside the actor,
so it is also reported without it (time from the first output to the last is not
observable from outside; we subtract the plain engine's measured start-up).

    python bench/generation.py [JOB.yaml] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", nargs="?", default=str(ROOT / "jobs" / "local" / "last-letter-rar2.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--inputs", type=int, default=48)
    args = parser.parse_args()

    from s2d_ray.cluster import ray_session
    from s2d_ray.config import load_config
    from s2d_ray.engine import CPU_ENGINE_ENV
    from s2d_ray.generation import Pass, load_results, run_passes
    from s2d_ray.methods import METHODS
    from s2d_ray.models import resolve_model

    cfg = load_config(args.job, [f"task.train={args.inputs}", *args.overrides])
    model = str(resolve_model(cfg.model.name, cfg.model.path))
    examples = cfg.task.examples("train")
    first = cfg.program(cfg.method.name).steps[0]
    program = dataclasses.replace(METHODS["system1"], steps=(first,))  # one engine call each side
    s, n = cfg.sampling, cfg.filter.samples
    print(f"{len(examples)} prompts x n={n}, max_tokens={s.max_tokens}, temperature={s.temperature}, "
          f"model={cfg.model.name}, dtype={cfg.model.dtype}")

    # (a) the raw engine, in this process.
    for k, v in CPU_ENGINE_ENV.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, int(cfg.engine.cpus_per_engine))))
    from s2d_ray.engine import Engine

    t0 = time.perf_counter()
    engine = Engine(model, cfg.engine, dtype=cfg.model.dtype, seed=s.seed)
    t1 = time.perf_counter()
    from s2d_ray.methods import render

    outs = engine.generate(
        [render(first.template, {"format": cfg.task.answer_format, **e.fields, "question": e.question}) for e in examples],
        n=n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens,
    )  # fmt: skip
    t2 = time.perf_counter()
    raw_tokens = sum(c.tokens for o in outs for c in o)
    raw_start, raw_gen = t1 - t0, t2 - t1
    engine.close()
    del engine

    # (b) the s2d path: Ray Data -> GeneratorActor pool -> vote -> Parquet.
    cfg = cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"batch_size": len(examples)})})
    with tempfile.TemporaryDirectory() as tmp, ray_session(cfg):
        t3 = time.perf_counter()
        run_passes(
            examples, [Pass("bench", program, n, s.temperature, s.top_p, s.max_tokens)],
            task=cfg.task, model_path=model, engine=cfg.engine, dtype=cfg.model.dtype, seed=s.seed,
            out_dir=Path(tmp) / "out",
            vote={"label": "bench", "filt": cfg.filter},
        )  # fmt: skip
        t4 = time.perf_counter()
        table = load_results(Path(tmp) / "out")
        s2d_tokens = sum(table.column("bench_tokens").to_pylist())
        in_actor = sum(table.column("bench_seconds").to_pylist())

    raw_tps = raw_tokens / raw_gen
    s2d_tps = s2d_tokens / in_actor
    s2d_wall_tps = s2d_tokens / (t4 - t3)
    print(f"raw vllm.LLM   : {raw_tokens} tokens in {raw_gen:.1f} s = {raw_tps:.1f} tok/s (engine start {raw_start:.1f} s)")
    print(f"s2d generation : {s2d_tokens} tokens in {in_actor:.1f} s in the actor = {s2d_tps:.1f} tok/s")
    print(f"s2d end to end : {t4 - t3:.1f} s wall incl. Ray Data, actor + engine start, vote, Parquet = {s2d_wall_tps:.1f} tok/s")
    print(f"ratio s2d/raw (generation)       : {s2d_tps / raw_tps:.2f}")
    print(f"ratio s2d/raw (wall, incl. start): {s2d_wall_tps / (raw_tokens / (raw_gen + raw_start)):.2f}")


if __name__ == "__main__":
    main()
