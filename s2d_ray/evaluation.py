"""Scores of System 1, System 2 and the distilled model, and whether distillation worked."""

from __future__ import annotations

import math

import pyarrow as pa

from s2d_ray.tasks import Task

def score_pass(table: pa.Table, label: str, task: Task) -> dict:
    """Metrics of one evaluated system from its rows (first sample of each input)."""
    answers = [a[0] if a else None for a in table.column(f"{label}_answers").to_pylist()]
    golds = table.column("answer").to_pylist()
    tokens = table.column(f"{label}_tokens").to_pylist()
    seconds = table.column(f"{label}_seconds").to_pylist()
    n = len(answers)
    correct = sum(task.score(a, g) for a, g in zip(answers, golds))
    accuracy = correct / n if n else 0.0
    return {
        "accuracy": accuracy,
        # Standard error of the accuracy: differences smaller than ~2 of these are noise.
        "accuracy_stderr": math.sqrt(accuracy * (1 - accuracy) / n) if n else 0.0,
        "mean_generated_tokens": sum(tokens) / n if n else 0.0,
        "parse_failures": sum(a is None for a in answers),
        "n": n,
        "seconds": float(sum(seconds)),
    }


def distillability(results: dict[str, dict], no_model_reason: str | None = None) -> dict:
    """A plain verdict: did the distilled System 1 close the System 1 -> System 2 gap?"""
    s1 = results.get("system1", {}).get("accuracy")
    s2 = results.get("system2", {}).get("accuracy")
    d = results.get("distilled", {}).get("accuracy")
    if s1 is None or d is None:
        why = f": {no_model_reason}" if no_model_reason else ""
        return {"verdict": "no distilled model", "text": f"There is no distilled model to evaluate{why}."}
    n = results["distilled"]["n"]
    noise = 2 * math.sqrt(0.25 / n) if n else 1.0  # ~2 standard errors at worst
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    if d <= s1:
        verdict = "did not help"
        text = f"Distillation did not help here: distilled {pct(d)} vs System 1 {pct(s1)}"
    elif s2 is not None and s2 > s1 and d >= s2:
        verdict = "closed the gap"
        text = f"Distillation closed the gap: distilled {pct(d)} >= System 2 {pct(s2)} > System 1 {pct(s1)}"
    elif s2 is not None and s2 > s1:
        share = (d - s1) / (s2 - s1)
        verdict = "partly closed the gap"
        text = f"Distillation closed {100 * share:.0f}% of the gap: System 1 {pct(s1)}, distilled {pct(d)}, System 2 {pct(s2)}"
    else:
        verdict = "beat system 1"
        text = f"Distilled {pct(d)} beats System 1 {pct(s1)}" + (
            f" (System 2: {pct(s2)})" if s2 is not None else ""
        )
    if abs(d - s1) < noise:
        text += f"; with n={n} a difference under {pct(noise)} is within noise"
    return {"verdict": verdict, "text": text + "."}
