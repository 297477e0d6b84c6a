"""Adaptive vs. fixed-N voting on the same inputs, in one run, on the real engine.

Four ways to vote over the job's System 2 method, run in a random (seeded) order on one
engine, through the product's per-sample dataflow:
  fixed     N samples per input, strict-majority vote (what `filter.name: majority` does);
  adaptive  rounds of samples, stop once the N-vote can no longer change (exact rule);
  confident rounds, stop once P(leader holds the majority) >= --confidence;
  window    early-stopping self-consistency: stop once the last --window samples agree.
Prints samples, tokens and wall seconds of each, the saving against fixed-N, the kept
counts, and the labels kept by both that differ from fixed-N. The adaptive rules are
also replayed on the fixed-N samples themselves, round by round (same draws, so any
difference is the rule's, not sampling noise).

    python bench/voting.py [JOB.yaml] [--inputs 24] [--samples 8] [--window 3] [--set key=value ...]

Ends with one line: RESULT ratio_samples=... ratio_seconds=... replay_identical=... (the
window rule against fixed-N; goals: ratio_samples <= 0.4, replay_identical >= 0.98).
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _differ(a: list, b: list) -> tuple[int, int]:
    """(labels kept by both that differ, labels kept by both)."""
    both = [(x, y) for x, y in zip(a, b) if x.kept and y.kept]
    return sum(x.answer != y.answer for x, y in both), len(both)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", nargs="?", default=str(ROOT / "jobs" / "local" / "last-letter-rar2.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--inputs", type=int, default=24)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--confidence", type=float, default=0.9)
    parser.add_argument("--temperature", type=float, default=0.5)
    parser.add_argument("--window", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="order of the four runs")
    args = parser.parse_args()

    from s2d_ray.config import load_config
    from s2d_ray.engine import CPU_ENGINE_ENV, Engine
    from s2d_ray.filters import adaptive_vote, first_round, majority_vote
    from s2d_ray.methods.dataflow import PassRun, run_pass
    from s2d_ray.models import resolve_model

    sets = [f"filter.samples={args.samples}", f"sampling.temperature={args.temperature}", *args.overrides]
    cfg = load_config(args.job, sets)
    if hasattr(cfg.task, "train") and isinstance(cfg.task.train, int):
        cfg = cfg.model_copy(update={"task": cfg.task.model_copy(update={"train": args.inputs})})
    examples = cfg.task.examples("train")[: args.inputs]
    program, n, s, task = cfg.program(cfg.method.name), cfg.filter.samples, cfg.sampling, cfg.task
    inputs = [{"format": task.answer_format, **e.fields, "question": e.question} for e in examples]
    sampling = dict(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens)
    print(f"{len(inputs)} inputs of {task.name}, method {program.name}, N={n}, temperature={s.temperature}, "
          f"confidence={args.confidence}, model={cfg.model.name}")

    for k, v in CPU_ENGINE_ENV.items():
        os.environ.setdefault(k, v)
    engine = Engine(str(resolve_model(cfg.model.name, cfg.model.path)), cfg.engine, dtype=cfg.model.dtype, seed=s.seed)
    answers = lambda samples: [task.extract(x.final) for x in samples]  # noqa: E731
    tokens = lambda results: sum(sum(x.tokens.values()) for r in results for x in r)  # noqa: E731
    rows = {}

    rules = {"fixed": None, "adaptive": (None, None), "confident": (args.confidence, None), "window": (None, args.window)}
    order = list(rules)
    random.Random(args.seed).shuffle(order)
    print(f"order: {', '.join(order)}")
    fixed_votes = fixed = None
    for name in order:
        t = time.perf_counter()
        if rules[name] is None:
            results, _ = run_pass(engine, PassRun(program, n, sampling, n, 1, None, None), inputs)
            votes = [majority_vote(answers(r), cfg.filter.min_agreement) for r in results]
            fixed, fixed_votes = results, votes
        else:
            confidence, window = rules[name]

            def decided(samples, c=confidence, w=window) -> bool:
                return adaptive_vote(answers(samples), n, cfg.filter.min_agreement, c, w) is not None

            rounds = PassRun(program, n, sampling, first_round(n, confidence, window), cfg.filter.round_size, decided, None)
            results, _ = run_pass(engine, rounds, inputs)
            assert all(len(r) <= n for r in results), "adaptive voting drew more than N"
            votes = [adaptive_vote(answers(r), n, cfg.filter.min_agreement, confidence, window) or
                     majority_vote(answers(r), cfg.filter.min_agreement) for r in results]  # fmt: skip
        rows[name] = (votes, sum(len(r) for r in results), tokens(results), time.perf_counter() - t)
    engine.close()

    base_samples, base_tokens, base_seconds = rows["fixed"][1], rows["fixed"][2], rows["fixed"][3]
    print(f"\n{'voting':<10} {'samples':>8} {'saved':>7} {'tokens':>8} {'saved':>7} {'kept':>6} {'differ':>12} {'seconds':>8}")
    for name in rules:
        votes, drawn, tok, sec = rows[name]
        diff, both = _differ(votes, fixed_votes)
        print(f"{name:<10} {drawn:>8} {1 - drawn / base_samples:>7.0%} {tok:>8} {1 - tok / max(base_tokens, 1):>7.0%} "
              f"{sum(v.kept for v in votes):>6} {f'{diff}/{both}' if name != 'fixed' else '-':>12} {sec:>8.1f}")

    # The same rules replayed on the fixed-N draws, round by round: what the rule changes,
    # without sampling noise.
    print("\nreplayed on the fixed-N samples (same draws):")
    replay = {}
    for name, rule in rules.items():
        if rule is None:
            continue
        confidence, window = rule
        votes, used = [], 0
        for r in fixed:
            a = answers(r)
            k = first_round(n, confidence, window)
            while (v := adaptive_vote(a[:k], n, cfg.filter.min_agreement, confidence, window)) is None:
                k = min(n, k + cfg.filter.round_size)
            votes.append(v)
            used += k
        diff, both = _differ(votes, fixed_votes)
        changed = sum(v.kept != f.kept for v, f in zip(votes, fixed_votes))
        replay[name] = (used, 1 - diff / both if both else 1.0)
        print(f"  {name:<10} samples {used}/{base_samples} (saved {1 - used / base_samples:.0%}); "
              f"kept labels differing from fixed-N: {diff}/{both}; keep/drop decisions changed: {changed}/{len(votes)}")
    w = rows["window"]
    print(f"RESULT ratio_samples={w[1] / base_samples:.2f} ratio_seconds={w[3] / base_seconds:.2f} "
          f"replay_identical={replay['window'][1]:.2f} ratio_samples_exact={rows['adaptive'][1] / base_samples:.2f} "
          f"ratio_samples_confident={rows['confident'][1] / base_samples:.2f}")


if __name__ == "__main__":
    main()
