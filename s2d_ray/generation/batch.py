"""Every pass of a stage over one batch of inputs, on the per-sample dataflow: the
columns each pass adds (outputs, answers, failures, tokens per step, USC's pick)."""

from __future__ import annotations

import json

import pandas as pd

from s2d_ray.filters import adaptive_vote, first_round
from s2d_ray.generation.stage import Pass
from s2d_ray.tasks import Task


NO_ANSWER = "no answer"


def dropped(task: Task, answer: str | None, values: dict) -> str | None:
    """Why an extracted answer is not counted for its input (`values`): "no answer" or
    'malformed "<answer>": <why>'; None when it is a well-formed answer."""
    if answer is None:
        return NO_ANSWER
    why = task.malformed(answer, values)
    shown = answer if len(answer) <= 40 else answer[:40] + "..."
    return None if why is None else f'malformed "{shown}": {why}'


def pass_run(p: Pass, task: Task, max_model_len: int):
    """What the dataflow needs of a pass: sampling, rounds and the adaptive stop, USC."""
    from s2d_ray.methods.dataflow import PassRun

    first, round_size, decided = p.samples, 1, None
    if p.adaptive is not None:
        min_agreement, confidence, round_size, window = p.adaptive
        first = first_round(p.samples, confidence, window)

        def stop(samples, values) -> bool:
            answers = [task.extract(s.final) for s in samples]
            counted = [a if dropped(task, a, values) is None else None for a in answers]  # as run_batch counts them
            return adaptive_vote(counted, p.samples, min_agreement, confidence, window) is not None

        decided = stop

    return PassRun(
        program=p.program, samples=p.samples, first=first, round_size=round_size, decided=decided,
        sampling=dict(temperature=p.temperature, top_p=p.top_p, max_tokens=p.max_tokens),
        usc=(p.usc_max_tokens, max_model_len, p.usc_fallback) if p.select == "usc" else None,
    )  # fmt: skip


def run_batch(flow, task: Task, passes: list[Pass], batch: pd.DataFrame, max_model_len: int, wait=None) -> pd.DataFrame:
    """Every pass over one batch of input rows, all at once on `flow` (a `Flow`, or an
    engine to make one for this batch); adds the pass's columns. `wait(run)`, if given,
    hands the batch to a flow turned elsewhere and waits for it."""
    from s2d_ray.methods.dataflow import BatchRun, Flow

    if not isinstance(flow, Flow):
        flow = Flow(flow)
    originals = [
        {"format": task.answer_format, **json.loads(f), "question": q} for f, q in zip(batch["fields"], batch["input"])
    ]
    keys = list(batch["id"])
    work = BatchRun(flow, [
        (pass_run(p, task, max_model_len), [task.perturb(v) for v in originals] if p.perturbed else originals, keys)
        for p in passes
    ])  # fmt: skip
    if wait is None:
        flow.run(work)
    else:
        wait(work)
    out = batch.copy()
    for k, p in enumerate(passes):
        results, chosen, seconds = work.outputs(k)
        # Judged against the input as given (a perturbed pass's answers mapped back first).
        raw = [[task.extract(s.final) for s in samples] for samples in results]
        if p.perturbed:
            raw = [[task.unperturb(a) for a in row] for row in raw]
        why = [[dropped(task, a, v) for a in row] for row, v in zip(raw, originals)]
        answers = [[a if w is None else None for a, w in zip(row, ws)] for row, ws in zip(raw, why)]
        # An input fails (recorded, never voted into distill/) when none of its samples got
        # through every step: a prompt too long for the context at some step, typically.
        errors = [[s.error for s in samples if s.error] for samples in results]
        out[f"{p.label}_failed_samples"] = [len(e) for e in errors]
        out[f"{p.label}_failure"] = [e[0] if e and len(e) == len(r) else None for e, r in zip(errors, results)]
        out[f"{p.label}_outputs"] = [[s.final for s in samples] for samples in results]
        if len(p.program.step_names) > 1:  # the reasoning before the final step, per sample: {step: text}
            before = p.program.step_names[:-1]
            out[f"{p.label}_steps"] = [[json.dumps({k: s.values.get(k, "") for k in before}) for s in samples]
                                       for samples in results]  # fmt: skip
        out[f"{p.label}_answers"] = answers  # well-formed answers only (None: not counted)
        out[f"{p.label}_dropped"] = why  # per sample: None (counted), or why not
        out[f"{p.label}_samples"] = [len(samples) for samples in results]
        for step in p.program.step_names:
            out[f"{p.label}_tokens_{step}"] = [sum(s.tokens[step] for s in samples) for samples in results]
        tokens = [sum(sum(s.tokens.values()) for s in samples) for samples in results]
        if p.select == "usc":
            out[f"{p.label}_selected"] = [c.index for c in chosen]
            out[f"{p.label}_selected_how"] = [c.how for c in chosen]
            out[f"{p.label}_tokens_usc"] = [c.tokens for c in chosen]
            tokens = [t + c.tokens for t, c in zip(tokens, chosen)]
        out[f"{p.label}_tokens"] = tokens
        # The pass's share of the engine's time (batches and passes overlap on one engine).
        out[f"{p.label}_seconds"] = seconds / max(len(batch), 1)
    return out

