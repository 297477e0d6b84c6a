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
        parse_failures=sum(a is None for a in answers),
        n=n,
        seconds=float(sum(table.column(f"{label}_seconds").to_pylist())),
    )
    if swapped:
        out["seconds"] += float(sum(table.column(f"{label}_swapped_seconds").to_pylist()))
    return out


def distillability(results: dict[str, dict], metric: str = "accuracy", no_model_reason: str | None = None) -> dict:
    """A plain verdict: did the distilled System 1 close the System 1 -> System 2 gap?"""
    s1 = results.get("system1", {}).get(metric)
    s2 = results.get("system2", {}).get(metric)
    d = results.get("distilled", {}).get(metric)
    if s1 is None or d is None:
        why = f": {no_model_reason}" if no_model_reason else ""
        return {"verdict": "no distilled model", "text": f"There is no distilled model to evaluate{why}."}
    n = results["distilled"]["n"]
    noise = 2 * math.sqrt(0.25 / n) if n else 1.0  # ~2 standard errors at worst
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    if d <= s1:
        verdict = "did not help"
        text = f"Distillation did not help here: distilled {metric} {pct(d)} vs System 1 {pct(s1)}"
        if s2 is not None:
            text += f" (System 2: {pct(s2)})"
    elif s2 is not None and s2 > s1 and d >= s2:
        verdict = "closed the gap"
        text = f"Distillation closed the gap: distilled {metric} {pct(d)} >= System 2 {pct(s2)} > System 1 {pct(s1)}"
    elif s2 is not None and s2 > s1:
        share = (d - s1) / (s2 - s1)
        verdict = "partly closed the gap"
        text = f"Distillation closed {100 * share:.0f}% of the gap: {metric} System 1 {pct(s1)}, distilled {pct(d)}, System 2 {pct(s2)}"
    else:
        verdict = "beat system 1"
        text = f"Distilled {metric} {pct(d)} beats System 1 {pct(s1)}" + (
            f" (System 2: {pct(s2)})" if s2 is not None else ""
        )
    if abs(d - s1) < noise:
        text += f"; with n={n} a difference under {pct(noise)} is within noise"
    incons = {k: results[k].get("inconsistent") for k in ("system1", "system2", "distilled") if k in results}
    if all(v is not None for v in incons.values()) and incons:
        text += "; inconsistent under swap: " + ", ".join(f"{k} {pct(v)}" for k, v in incons.items())
    return {"verdict": verdict, "text": text + "."}


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


def _first(table: pa.Table, column: str) -> dict:
    """id -> the first sample's value of a per-sample list column (None where absent)."""
    if column not in table.column_names:
        return {}
    return {i: (v[0] if v else None) for i, v in zip(table.column("id").to_pylist(), table.column(column).to_pylist())}


def fidelity(base: pa.Table, distilled: pa.Table | None) -> dict | None:
    """How far a system took on System 2's behaviour: on the inputs where System 2 gave an
    answer, the share where the distilled model's direct answer is the same one, beside the
    base model's System 1 agreement with System 2. Needs no labels, and moves where a small
    model's task metric cannot."""
    s2 = {i: a for i, a in _first(base, "system2_answers").items() if a is not None}
    if not s2:
        return None
    out = {"n": len(s2)}
    for name, table in (("system1", base), ("distilled", distilled)):
        if table is not None:
            answers = _first(table, f"{name}_answers")
            out[name] = sum(answers.get(i) == a for i, a in s2.items()) / len(s2)
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
