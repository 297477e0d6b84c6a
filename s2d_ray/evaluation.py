"""Scores of System 1, System 2 and the distilled model, and whether distillation worked."""

from __future__ import annotations

import math

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
