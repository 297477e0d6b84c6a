"""Generation throughput: s2d's generation path against a plain `vllm.LLM`, same run.

Three cases, each run by both sides on the same inputs, sampling and engine settings:
  1step     the first step of the job's System 2 method, N samples per input;
  2step     the job's method (RaR: rephrase, respond) against a naive raw run: per batch
            of the job's batch size, step 1 for every input, then step 2 for every sample;
  bsm_swap  Branch-Solve-Merge with the swapped pass, on the pairwise fixtures
            (jobs/local/oasst2-bsm-swap.yaml), against its naive raw run (per batch: the
            main pass step by step, then the swapped pass).

The s2d side is the whole product path: `run_passes` (Ray Data, the GeneratorActor
pool, the per-sample dataflow, the Parquet writes). The raw side is a plain `vllm.LLM`
in a Ray actor with the same resources, environment and `vllm.LLM` arguments, driven
with `LLM.generate` and lock-step barriers. Both sides include starting their engine.
Ray is started before either side; sides alternate in order over --reps repetitions;
each case prints the median and the spread of tokens/s and the ratio of medians.
Step-1 prompts are checked equal on both sides; generated-token totals are printed side
by side (sampled lengths differ by draw at temperature > 0; tokens/s is the measure).

    python bench/generation.py [JOB.yaml] [--inputs 32] [--reps 3] [--set key=value ...]

Ends with one line: RESULT ratio_1step=... ratio_2step=... ratio_bsm_swap=... (goals:
ratio_1step >= 0.95, ratio_2step >= 1.2 on 2 cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAIRWISE_JOB = ROOT / "jobs" / "local" / "oasst2-bsm-swap.yaml"


class RawEngine:
    """A plain vllm.LLM (not s2d's Engine): lock-step, one `generate` call per step."""

    def __init__(self, model: str, engine, dtype: str, seed: int):
        from vllm import LLM

        from s2d_ray.engine import engine_kwargs

        self.llm = LLM(**engine_kwargs(model, engine, dtype, seed))
        self.tokenizer = self.llm.get_tokenizer()

    def run(self, program, passes: list[list[dict]], n: int, sampling: dict, batch_size: int) -> tuple[int, list[str]]:
        """Per batch, per pass, per step: one call for all of the batch's prompts. Returns
        generated tokens and the step-1 prompts (user texts)."""
        from vllm import SamplingParams

        from s2d_ray.chat import prompt_ids
        from s2d_ray.methods import render, split_items

        def generate(texts: list[str], k: int) -> list[list]:
            # Token ids as s2d hands them (text through vLLM would add a second BOS for Llama-2).
            params = SamplingParams(n=k, **sampling)
            prompts = [{"prompt_token_ids": prompt_ids(self.tokenizer, t)} for t in texts]
            outs = self.llm.generate(prompts, params, use_tqdm=False)
            return [o.outputs for o in outs]

        tokens, first_prompts = 0, []
        size = len(passes[0])
        for start in range(0, size, batch_size):
            for inputs in passes:
                batch = inputs[start : start + batch_size]
                first, *rest = program.steps
                texts = [render(first.template, v) for v in batch]
                first_prompts += texts
                samples = []
                for v, outs in zip(batch, generate(texts, n)):
                    tokens += sum(len(c.token_ids) for c in outs)
                    samples += [{**v, first.name: c.text} for c in outs]
                for step in rest:
                    jobs = [(s, None) for s in samples] if step.over is None else [
                        (s, item) for s in samples for item in split_items(s[step.over], step.max_items)
                    ]  # fmt: skip
                    prompts = [render(step.template, s if item is None else {**s, "item": item}) for s, item in jobs]
                    pieces: dict[int, list[str]] = {}
                    for (s, item), (c,) in zip(jobs, generate(prompts, 1)):
                        tokens += len(c.token_ids)
                        pieces.setdefault(id(s), []).append(c.text if item is None else f"{item}\n{c.text.strip()}")
                    for s in samples:
                        mine = pieces[id(s)]
                        s[step.name] = mine[0] if step.over is None else "\n\n".join(f"{k}. {p}" for k, p in enumerate(mine, 1))
        return tokens, first_prompts


def s2d_side(cfg, examples, passes, model: str) -> int:
    from s2d_ray.generation import load_results, run_passes
    from s2d_ray.pipeline import engine_stage

    with tempfile.TemporaryDirectory() as tmp:
        run_passes(examples, engine_stage(cfg, model, passes), Path(tmp) / "out", log=lambda m: None)
        table = load_results(Path(tmp) / "out")
        return sum(sum(table.column(f"{p.label}_tokens").to_pylist()) for p in passes)


def raw_side(cfg, examples, passes, model: str) -> tuple[int, list[str]]:
    import ray

    from s2d_ray.generation import engine_env
    from s2d_ray.placement import engine_remote_args

    args = engine_remote_args(cfg.engine, engine_env(cfg.engine), "bench")
    actor = ray.remote(RawEngine).options(**args).remote(model, cfg.engine, cfg.model.dtype, cfg.sampling.seed)
    task = cfg.task
    originals = [{"format": task.answer_format, **e.fields, "question": e.question} for e in examples]
    inputs = [[task.perturb(v) for v in originals] if p.perturbed else originals for p in passes]
    s = cfg.sampling
    sampling = dict(temperature=s.temperature, top_p=s.top_p if s.temperature > 0 else 1.0, max_tokens=s.max_tokens)
    try:
        return ray.get(actor.run.remote(passes[0].program, inputs, passes[0].samples, sampling, cfg.engine.batch_size))
    finally:
        ray.kill(actor)


def expected_first_prompts(cfg, examples, passes) -> list[str]:
    """Step-1 user texts in the raw side's order (batch by batch, pass by pass)."""
    from s2d_ray.methods import render

    task, size = cfg.task, cfg.engine.batch_size
    originals = [{"format": task.answer_format, **e.fields, "question": e.question} for e in examples]
    out = []
    for start in range(0, len(originals), size):
        for p in passes:
            batch = originals[start : start + size]
            out += [render(p.program.steps[0].template, task.perturb(v) if p.perturbed else v) for v in batch]
    return out


def measure(name: str, cfg, examples, passes, model: str, reps: int) -> float:
    rates: dict[str, list[float]] = {"raw": [], "s2d": []}
    totals: dict[str, list[int]] = {"raw": [], "s2d": []}
    for rep in range(reps):
        for side in ("raw", "s2d") if rep % 2 == 0 else ("s2d", "raw"):
            started = time.perf_counter()
            if side == "raw":
                tokens, prompts = raw_side(cfg, examples, passes, model)
                assert prompts == expected_first_prompts(cfg, examples, passes), "the sides' step-1 prompts differ"
            else:
                tokens = s2d_side(cfg, examples, passes, model)
            seconds = time.perf_counter() - started
            rates[side].append(tokens / seconds)
            totals[side].append(tokens)
            print(f"  {name} rep {rep + 1} {side:>3}: {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.1f} tok/s", flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    for side in ("raw", "s2d"):
        v = rates[side]
        print(f"{name} {side:>3}: median {med[side]:.1f} tok/s (spread {min(v):.1f}-{max(v):.1f}); "
              f"tokens per rep {', '.join(map(str, totals[side]))}")  # fmt: skip
    ratio = med["s2d"] / med["raw"]
    print(f"{name}: ratio s2d/raw {ratio:.2f}\n", flush=True)
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", nargs="?", default=str(ROOT / "jobs" / "local" / "last-letter-rar2.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--inputs", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--cases", default="1step,2step,bsm_swap")
    args = parser.parse_args()

    from s2d_ray.cluster import ray_session
    from s2d_ray.config import load_config
    from s2d_ray.methods import METHODS
    from s2d_ray.models import resolve_model
    from s2d_ray.pipeline import generation_passes

    cfg = load_config(args.job, [f"task.train={args.inputs}", *args.overrides])
    pair_cfg = load_config(PAIRWISE_JOB, args.overrides)
    model = str(resolve_model(cfg.model.name, cfg.model.path))
    program = cfg.program(cfg.method.name)
    one_step = dataclasses.replace(METHODS["system1"], steps=program.steps[:1])
    cases = {
        "1step": (cfg, [dataclasses.replace(generation_passes(cfg, program)[0], program=one_step)]),
        "2step": (cfg, generation_passes(cfg, program)),
        "bsm_swap": (pair_cfg, generation_passes(pair_cfg, pair_cfg.program(pair_cfg.method.name))),
    }
    s, e = cfg.sampling, cfg.engine
    print(f"model {cfg.model.name} ({cfg.model.dtype}), batch {e.batch_size}, {e.cpus_per_engine} CPUs per engine, "
          f"N={cfg.filter.samples}, max_tokens {s.max_tokens}, temperature {s.temperature}, {args.reps} reps\n")  # fmt: skip
    results = {}
    with ray_session(cfg):  # one Ray for every case and both sides, started before either
        for name in args.cases.split(","):
            case_cfg, passes = cases[name]
            examples = case_cfg.task.examples("train")[: args.inputs]
            print(f"{name}: {len(examples)} inputs, passes {', '.join(p.label for p in passes)}, "
                  f"method {passes[0].program.name}", flush=True)  # fmt: skip
            results[name] = measure(name, case_cfg, examples, passes, model, args.reps)
    print("RESULT " + " ".join(f"ratio_{k}={v:.2f}" for k, v in results.items()))


if __name__ == "__main__":
    main()
