"""Scores of System 1, System 2 and the distilled model, and whether distillation worked."""

from __future__ import annotations

import json
import math
from collections import Counter

import pyarrow as pa

from s2d_ray.tasks import Task


def score_pass(table: pa.Table, label: str, task: Task, swapped: bool = False) -> dict:
    """Metrics of one evaluated system from its rows (first sample of each input);
    with `swapped`, also from its answers on the perturbed inputs (`label`_swapped_*)."""
    first = lambda col: [a[0] if a else None for a in table.column(col).to_pylist()]  # noqa: E731
    answers = first(f"{label}_answers")
    golds = table.column("answer").to_pylist()
    groups = table.column("group").to_pylist() if "group" in table.column_names else [None] * len(golds)
    perturbed = first(f"{label}_swapped_answers") if swapped else None
    n = len(answers)
    steps = sorted(c.removeprefix(f"{label}_tokens_") for c in table.column_names if c.startswith(f"{label}_tokens_"))
    out = task.metrics(answers, golds, groups, perturbed)
    out.update(
        mean_generated_tokens=sum(table.column(f"{label}_tokens").to_pylist()) / n if n else 0.0,
        tokens_per_step={s: sum(table.column(f"{label}_tokens_{s}").to_pylist()) / n for s in steps} if n else {},
        parse_failures=sum(a is None for a in answers),  # no well-formed answer (malformed ones included)
        malformed=sum(isinstance(w, str) and w.startswith("malformed") for w in first(f"{label}_dropped"))
        if f"{label}_dropped" in table.column_names else 0,
        n=n,
        seconds=float(sum(table.column(f"{label}_seconds").to_pylist())),
    )
    if swapped:
        out["seconds"] += float(sum(table.column(f"{label}_swapped_seconds").to_pylist()))
    return out


ALPHA = 0.05  # the significance of every paired test a verdict rests on
PAIRED = "McNemar's exact test, two-sided"


def mcnemar(a: list[bool], b: list[bool]) -> dict:
    """McNemar's exact test of two systems scored on the same inputs: only the inputs
    where they disagree count. `p` is two-sided: the chance of a split at least this
    uneven between "only a right" and "only b right" if neither system were better."""
    if len(a) != len(b):
        raise ValueError(f"paired scores of different lengths ({len(a)} and {len(b)})")
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    n = only_a + only_b
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2**n if n else 1.0
    return {"n": len(a), "a": sum(a) / len(a) if a else 0.0, "b": sum(b) / len(b) if b else 0.0,
            "only_a": only_a, "only_b": only_b, "p": min(1.0, 2 * tail)}  # fmt: skip


def better(t: dict, alpha: float = ALPHA) -> bool:
    return t["a"] > t["b"] and t["p"] < alpha


def worse(t: dict, alpha: float = ALPHA) -> bool:
    return t["a"] < t["b"] and t["p"] < alpha


def paired_tests(correct: dict[str, list[bool]]) -> dict:
    """Every comparison of the evaluated systems on the same inputs (per-input correctness
    of `system1` and, where evaluated, `system2` and `distilled`), by McNemar's test."""
    tests: dict = {"test": PAIRED, "alpha": ALPHA}
    for a, b in (("distilled", "system1"), ("distilled", "system2"), ("system2", "system1")):
        if a in correct and b in correct:
            tests[f"{a}_vs_{b}"] = mcnemar(correct[a], correct[b])
    return tests


def correctness(table: pa.Table, label: str, task: Task) -> dict[str, bool]:
    """id -> whether the system's first answer scores (an unlabeled input never does)."""
    golds = table.column("answer").to_pylist()
    return {i: gold is not None and bool(task.score(a, gold))
            for (i, a), gold in zip(_first(table, f"{label}_answers").items(), golds)}  # fmt: skip


def aligned(scores: dict[str, dict[str, bool]]) -> dict[str, list[bool]]:
    """The systems scored on the same inputs as System 1, in one order (no paired test
    with a system evaluated on other inputs)."""
    ids = sorted(scores.get("system1", {}))
    return {name: [s[i] for i in ids] for name, s in scores.items() if set(s) == set(ids)}


def said(tests: dict, key: str) -> str:
    """One paired test in words: 'distilled 62.5% vs system1 40.6% (p=0.0039, n=32)'."""
    t, pct = tests[key], lambda x: f"{100 * x:.1f}%"  # noqa: E731
    a, b = key.split("_vs_")
    return f"{a} {pct(t['a'])} vs {b} {pct(t['b'])} (p={t['p']:.2g}, n={t['n']})"


def distillability(results: dict[str, dict], tests: dict, metric: str = "accuracy", no_model_reason: str | None = None) -> dict:
    """The verdict, from paired tests on the same inputs (`paired_tests`): distillation
    helped only when the distilled model beat System 1 significantly; it closed the gap
    when System 2 also beat System 1 and the distilled model was not significantly worse."""
    if "distilled" not in results or "distilled_vs_system1" not in tests:
        why = f": {no_model_reason}" if no_model_reason else ""
        return {"verdict": "no distilled model", "text": f"There is no distilled model to evaluate{why}."}
    d1, d2, s21 = (tests.get(k) for k in ("distilled_vs_system1", "distilled_vs_system2", "system2_vs_system1"))
    conf = f"{100 * (1 - ALPHA):.0f}%"
    if worse(d1):
        verdict, text = "hurt", "Distillation hurt: the distilled model is significantly worse than System 1"
    elif not better(d1):
        verdict, text = "did not help", "Distillation did not help here: the distilled model is not significantly better than System 1"
    elif d2 is not None and s21 is not None and better(s21) and not worse(d2):
        verdict, text = "closed the gap", "Distillation closed the gap: the distilled model beat System 1 and is not significantly worse than System 2"
    elif d2 is not None and worse(d2):
        share = (d1["a"] - d1["b"]) / (d2["b"] - d1["b"]) if d2["b"] > d1["b"] else 1.0
        verdict = "partly closed the gap"
        text = f"Distillation closed {100 * share:.0f}% of the gap: the distilled model beat System 1 but is significantly worse than System 2"
    else:
        verdict, text = "beat system 1", "The distilled model beat System 1"
    figures = [said(tests, k) for k in ("distilled_vs_system1", "distilled_vs_system2", "system2_vs_system1") if k in tests]
    text += f" ({metric}: {'; '.join(figures)}; {PAIRED} on the same inputs, at {conf} confidence)"
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    incons = {k: results[k].get("inconsistent") for k in ("system1", "system2", "distilled") if k in results}
    if all(v is not None for v in incons.values()) and incons:
        text += "; inconsistent under swap: " + ", ".join(f"{k} {pct(v)}" for k, v in incons.items())
    return {"verdict": verdict, "text": text + ".", "test": PAIRED, "alpha": ALPHA}


def no_harm(task: Task, method: str | None, base: pa.Table, distilled: pa.Table | None) -> dict:
    """A task not distilled on, scored on the base and the distilled model (System 1, and
    System 2 with `method`): each distilled system against the same system of the base
    model on the same inputs; regressed when any is significantly worse."""
    swap = task.has_perturbation
    systems = ["system1"] + (["system2"] if method else [])
    out: dict = {"task": task.name, "method": method, "metric": task.metric,
                 "base": {k: score_pass(base, k, task, swapped=swap) for k in systems}}  # fmt: skip
    if distilled is None:
        return {**out, "regressed": None, "text": "no distilled model to check"}
    out["distilled"] = {k: score_pass(distilled, k, task, swapped=swap) for k in systems}
    tests = {}
    for k in systems:
        paired = aligned({"system1": correctness(base, k, task), "distilled": correctness(distilled, k, task)})
        if "distilled" in paired:
            tests[k] = mcnemar(paired["distilled"], paired["system1"])
    out.update(tests=tests, test=PAIRED, alpha=ALPHA, regressed=any(worse(t) for t in tests.values()))
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    said = "; ".join(f"{'System 1' if k == 'system1' else 'System 2 (' + method + ')'} distilled {pct(t['a'])} vs base "
                     f"{pct(t['b'])} (p={t['p']:.2g}, n={t['n']})" for k, t in tests.items())  # fmt: skip
    lower = [k for k, t in tests.items() if t["a"] < t["b"] and not worse(t)]
    out["text"] = ("regressed: the distilled model is significantly worse" if out["regressed"] else
                   "no significant harm" + (", though lower: too few inputs to tell" if lower else "")) + f" ({task.metric}: {said})"  # fmt: skip
    if "system2" in tests and not worse(tests["system2"]):
        out["text"] += "; System 2 on the distilled model holds up here: one model could serve both modes"
    return out


def binomial_above(k: int, n: int, p0: float) -> float:
    """One-sided exact binomial p-value: the chance of k or more of n at rate p0."""
    if n == 0:
        return 1.0
    if p0 <= 0.0:
        return 0.0 if k > 0 else 1.0
    if p0 >= 1.0:
        return 1.0
    log = lambda j: (math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1)  # noqa: E731
                     + j * math.log(p0) + (n - j) * math.log1p(-p0))  # fmt: skip
    return min(1.0, sum(math.exp(log(j)) for j in range(k, n + 1)))


def break_even(results: dict[str, dict], distill_device_hours: float, devices: int, price: float, currency: str) -> dict | None:
    """When distillation pays: its measured device time (generation and training) over the
    device time each answer saves, the distilled System 1 against System 2, both measured
    by this run's evaluation (`devices` per engine). In requests, so no price is needed;
    in money per 1,000 requests when the job has one (cost.device_hour_price)."""
    if "system2" not in results or "distilled" not in results:
        return None
    per = {k: results[k]["seconds"] * devices / results[k]["n"]
           for k in ("system1", "system2", "distilled") if results.get(k, {}).get("n")}  # fmt: skip
    saving = per.get("system2", 0.0) - per.get("distilled", 0.0)
    cost = distill_device_hours * price
    out = {
        "tokens_per_answer": {k: results[k]["mean_generated_tokens"] for k in per},
        "device_seconds_per_answer": per,
        "cost_per_1000": {k: 1000 * v * price / 3600 for k, v in per.items()},
        "distillation_device_hours": distill_device_hours, "distillation_cost": cost, "currency": currency,
        "requests": math.ceil(distill_device_hours * 3600 / saving) if saving > 0 else None,
        "status": "pays" if saving > 0 else "never",
    }  # fmt: skip
    if saving <= 0:
        out["text"] = "A distilled answer took no less device time than a System 2 one here: distillation never pays for itself."
        return out
    tokens = out["tokens_per_answer"]
    out["text"] = (f"Distillation ({distill_device_hours:.4f} device-hours) pays for itself after {out['requests']:,} "
                   f"requests answered by the distilled model instead of System 2 ({per['distilled']:.3f} vs "
                   f"{per['system2']:.3f} device-seconds, {tokens['distilled']:.1f} vs {tokens['system2']:.1f} "
                   f"generated tokens per answer)")  # fmt: skip
    out["text"] += (f"; per 1,000 answers {out['cost_per_1000']['distilled']:.4f} vs {out['cost_per_1000']['system2']:.4f} "
                    f"{currency}." if price else "; no device price set (cost.device_hour_price), so no money figure.")  # fmt: skip
    return out


def _first(table: pa.Table, column: str) -> dict:
    """id -> the first sample's value of a per-sample list column (None where absent)."""
    if column not in table.column_names:
        return {}
    return {i: (v[0] if v else None) for i, v in zip(table.column("id").to_pylist(), table.column(column).to_pylist())}


def fidelity(base: pa.Table, distilled: pa.Table | None) -> dict | None:
    """How far a system took on System 2's behaviour, with no labels: on the inputs where
    System 2 gave a well-formed answer, the share where the system's direct answer is the
    same one. Beside each, its chance baseline: the larger of what the system's own answer
    distribution would agree by chance (independent of the input) and what the best
    constant answer would (System 2's most common answer); a one-sided exact binomial test
    of the agreement against it. The distilled model's agreement is also paired against
    the base model's System 1 (McNemar). "absorbed" only when it beats both significantly."""
    s2 = {i: a for i, a in _first(base, "system2_answers").items() if a is not None}
    if not s2:
        return None
    n = len(s2)
    s2_share = Counter(s2.values())
    constant = max(s2_share.values()) / n
    out: dict = {"n": n, "constant_answer": s2_share.most_common(1)[0][0], "constant_baseline": constant,
                 "test": "exact binomial, one-sided, against the chance baseline", "alpha": ALPHA}  # fmt: skip
    agree = {}
    for name, table in (("system1", base), ("distilled", distilled)):
        if table is None:
            continue
        answers = _first(table, f"{name}_answers")
        mine = [answers.get(i) for i in s2]
        agree[name] = [m == a for m, a in zip(mine, s2.values())]
        own = Counter(m for m in mine if m is not None)
        chance = sum(c / n * s2_share.get(a, 0) / n for a, c in own.items())
        baseline = max(chance, constant)
        k = sum(agree[name])
        out[name] = k / n
        out[f"{name}_chance"] = chance
        out[f"{name}_baseline"] = baseline
        out[f"{name}_p"] = binomial_above(k, n, baseline)
    if "distilled" in agree:
        vs = mcnemar(agree["distilled"], agree["system1"])
        out["distilled_vs_system1"] = vs
        above = out["distilled"] > out["distilled_baseline"] and out["distilled_p"] < ALPHA
        out["absorbed"] = above and better(vs)
        out["verdict"] = (
            "absorbed" if out["absorbed"] else
            "no more than the base model" if above else "not above chance"
        )  # fmt: skip
    return out


EXAMPLES = 20
TEXT_CHARS = 700  # of each output shown in the report


def examples(base: pa.Table, distilled: pa.Table | None, task: Task, k: int = EXAMPLES) -> dict:
    """About `k` test inputs side by side for the report (`rows`), those where distillation
    fixed or broke the answer first (System 1 wrong and distilled right, or the reverse),
    and how many inputs of all it fixed and broke."""
    cut = lambda t: t if t is None or len(t) <= TEXT_CHARS else t[:TEXT_CHARS] + " …"  # noqa: E731
    cols = {(name, kind): _first(table, f"{name}_{kind}")
            for name, table in (("system1", base), ("system2", base), ("distilled", distilled)) if table is not None
            for kind in ("answers", "outputs", "steps")}  # fmt: skip
    rows = []
    for r in base.select(["id", "input", "answer"]).to_pylist():
        row = {"id": r["id"], "input": cut(r["input"]), "gold": r["answer"]}
        for name in ("system1", "system2", "distilled"):
            if (name, "answers") not in cols or r["id"] not in cols[(name, "answers")]:
                continue
            answer = cols[(name, "answers")][r["id"]]
            steps = cols[(name, "steps")].get(r["id"])
            row[name] = {
                "answer": answer,
                "output": cut(cols[(name, "outputs")].get(r["id"])),
                "correct": r["answer"] is not None and bool(task.score(answer, r["answer"])),
                **({"steps": {k: cut(v) for k, v in json.loads(steps).items()}} if steps else {}),
            }
        if "system1" in row and "distilled" in row:
            s1, d = row["system1"]["correct"], row["distilled"]["correct"]
            row["change"] = "fixed" if d and not s1 else "broke" if s1 and not d else "same"
        rows.append(row)
    order = {r["id"]: n for n, r in enumerate(rows)}
    fixed = [r for r in rows if r.get("change") == "fixed"][: k // 3]
    broke = [r for r in rows if r.get("change") == "broke"][: k // 3]
    chosen = {r["id"] for r in fixed + broke}
    rest = [r for r in rows if r["id"] not in chosen][: k - len(chosen)]
    counts = Counter(r.get("change") for r in rows)
    return {"fixed": counts["fixed"], "broke": counts["broke"], "n": len(rows),
            "rows": sorted(fixed + broke + rest, key=lambda r: order[r["id"]])}  # fmt: skip
