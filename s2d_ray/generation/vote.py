"""The voting stage: the job's filter over each input's samples, and the kept rows as
the distillation set (id, prompt, target: no reasoning)."""

from __future__ import annotations

import json
from collections import Counter

import pandas as pd
import pyarrow as pa

from s2d_ray.config import FilterConfig
from s2d_ray.filters import Vote, adaptive_vote, majority_vote, no_filter, swap_vote, usc_vote
from s2d_ray.tasks import Task


def vote_row(row: dict, label: str, filt: FilterConfig) -> Vote:
    """The configured filter over one input's samples (columns written by `run_batch`)."""
    answers = list(row[f"{label}_answers"])
    # pandas may hold a missing failure as NaN: only text is a failure.
    if any(isinstance(row.get(f"{lab}_failure"), str) for lab in (label, f"{label}_swapped")):
        return Vote(None, 0, len(answers), False, "failed", {})  # the reason is in <label>_failure
    if filt.name == "usc":
        return usc_vote(answers, int(row[f"{label}_selected"]), row[f"{label}_selected_how"])
    if filt.name == "swap":
        return swap_vote(answers, list(row[f"{label}_swapped_answers"]))
    if filt.name == "none":
        return no_filter(answers)
    if filt.adaptive:
        vote = adaptive_vote(answers, filt.samples, filt.min_agreement, filt.confidence, filt.window)
        if vote is not None:
            return vote
    return majority_vote(answers, filt.min_agreement)


def vote_batch(batch: pd.DataFrame, label: str, filt: FilterConfig, task: Task) -> pd.DataFrame:
    """The consistency-voting stage: a pure function of each row's sampled answers."""
    votes = [vote_row(row, label, filt) for row in batch.to_dict("records")]
    out = batch.copy()
    out["vote_answer"] = [v.answer for v in votes]
    out["vote_count"] = [v.count for v in votes]
    out["vote_total"] = [v.total for v in votes]
    out["agreement"] = [v.agreement for v in votes]
    out["kept"] = [v.kept for v in votes]
    out["vote_reason"] = [v.reason for v in votes]
    out["vote_counts"] = [json.dumps(v.counts, sort_keys=True) for v in votes]
    out["target"] = [task.target(v.answer) if v.kept else None for v in votes]
    return out


DISTILL_SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("target", pa.string())])


def distill_rows(table: pa.Table) -> pa.Table:
    """The kept rows of voted generation output as (id, prompt, target): no reasoning."""
    rows = [r for r in table.select(["id", "input", "target", "kept"]).to_pylist() if r["kept"]]
    return pa.Table.from_pylist(
        [{"id": r["id"], "prompt": r["input"], "target": r["target"]} for r in rows], schema=DISTILL_SCHEMA
    )


def diversity(targets: list[str], space: int | None) -> dict | None:
    """How varied the distillation set's targets are: the share of its most common one.
    Dominated: above half (an open answer space), or 1.5x what an even spread over the
    task's answers would give (coin flip: 75%), a set that teaches one answer for all."""
    if not targets:
        return None
    (top, count), = Counter(targets).most_common(1)
    share, limit = count / len(targets), max(0.5, 1.5 / space) if space else 0.5
    return {"top_target": top, "top_share": share, "distinct": len(set(targets)), "dominated": share > limit,
            "dominated_above": limit}  # fmt: skip

