"""Per-sample dataflow: every (input, sample) moves through its program on its own.

A sample's next request goes to the engine as soon as its previous one finishes; an
input's next adaptive round starts as soon as its own samples are in; its USC pick as
soon as its samples are complete; a perturbed pass runs beside the main one. Nothing
waits for the slowest sequence of a batch, and the engine's queue is refilled from
every batch the actor holds (`Flow` feeds one engine from several batches at once).

The engine is driven at request level (`submit` one prompt, `step`, collect what
finished), through `Engine` in engine.py: the only vLLM importer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from s2d_ray.filters.usc import choose, plan
from s2d_ray.methods.base import render, split_items
from s2d_ray.methods.runner import Sample, Selection


class Flow:
    """Requests from any number of batches, one engine. `ask` queues a prompt with its
    continuation; `turn` submits what is queued, runs one engine step and calls the
    continuations of the requests it finished (which may `ask` again).

    Either the caller turns the crank (`run`, one batch), or a thread does (`start`,
    several batches at once, each waiting for its own `BatchRun.done`)."""

    def __init__(self, engine):
        self.engine = engine
        self._starting: list[BatchRun] = []
        self._queue: list[tuple[str, dict, Callable]] = []
        self._waiting: dict[str, Callable] = {}
        self._wake = threading.Condition()

    def ask(self, text: str, then: Callable, **sampling) -> None:
        with self._wake:
            self._queue.append((text, sampling, then))
            self._wake.notify()

    def add(self, batch: BatchRun) -> None:
        """Start `batch` on the turning thread (all of a batch's state lives there)."""
        with self._wake:
            self._starting.append(batch)
            self._wake.notify()

    @property
    def idle(self) -> bool:
        return not self._starting and not self._queue and not self._waiting

    def turn(self) -> None:
        from s2d_ray.engine import Completion

        with self._wake:
            starting, self._starting = self._starting, []
        for batch in starting:
            batch.start()
        with self._wake:
            queued, self._queue = self._queue, []
        for text, sampling, then in queued:
            try:
                rid = self.engine.submit(self.engine.encode(text), self.engine.sampling(**sampling))
            except ValueError as err:  # this prompt alone: too long, or rejected by the engine
                then(Completion("", 0, str(err)))
                continue
            self._waiting[rid] = then
        if self._waiting:
            for rid, (completion, *_) in self.engine.step():
                self._waiting.pop(rid)(completion)

    def run(self, batch: BatchRun) -> BatchRun:
        """One batch, turned by the caller."""
        self.add(batch)
        while not batch.done.is_set():
            self.turn()
        return batch.result()

    def start(self, on_error: Callable[[BaseException], None]) -> None:
        """Turn in a thread of its own; an error there (a dead engine) goes to `on_error`."""

        def loop() -> None:
            try:
                while True:
                    with self._wake:
                        while self.idle:
                            self._wake.wait()
                    self.turn()
            except BaseException as err:  # noqa: BLE001 (handed over: the engine is unusable)
                on_error(err)

        threading.Thread(target=loop, daemon=True, name="s2d-engine-flow").start()


@dataclass(frozen=True)
class PassRun:
    """What one pass needs to run (generation.Pass without the config plumbing)."""

    program: object
    samples: int
    sampling: dict
    first: int  # samples in the first round; == samples unless adaptive
    round_size: int
    decided: Callable[[list[Sample]], bool] | None  # adaptive: stop drawing for this input
    usc: tuple[int, int, int] | None  # (max_tokens, max_model_len, fallback_shown)


class BatchRun:
    """Every pass over every input of one batch, as a dataflow on `flow`. `done` is set
    when the last input of the last pass is complete; `result()` gives, per pass, each
    input's samples (in launch order) and its USC selection (or None) and the seconds
    the pass took."""

    def __init__(self, flow: Flow, passes: list[tuple[PassRun, list[dict], list[str]]]):
        self.flow = flow
        self.passes = passes  # (pass, inputs' template values, inputs' keys)
        self.done = threading.Event()
        self.error: BaseException | None = None
        self._left = sum(len(inputs) for _, inputs, _ in passes)
        self._out = [[None] * len(inputs) for _, inputs, _ in passes]
        self._ended = [0.0] * len(passes)

    def start(self) -> None:
        self.started = time.perf_counter()
        if not self._left:
            self.done.set()
        for k, (p, inputs, keys) in enumerate(self.passes):
            for i, values in enumerate(inputs):
                _InputRun(self, k, i, p, values, keys[i]).launch(p.first)

    def fail(self, err: BaseException) -> None:
        self.error = err
        self.done.set()

    def result(self) -> BatchRun:
        if self.error is not None:
            raise self.error
        return self

    def outputs(self, k: int) -> tuple[list[list[Sample]], list[Selection | None], float]:
        rows = self._out[k]
        return [r[0] for r in rows], [r[1] for r in rows], self._ended[k] - self.started

    def _finished(self, k: int, i: int, samples: list[Sample], selection: Selection | None) -> None:
        self._out[k][i] = (samples, selection)
        self._ended[k] = time.perf_counter()
        self._left -= 1
        if not self._left:
            self.done.set()


class _InputRun:
    """One input of one pass: its samples, its adaptive rounds, its USC pick."""

    def __init__(self, batch: BatchRun, k: int, i: int, p: PassRun, values: dict, key: str):
        self.batch, self.k, self.i, self.p, self.values, self.key = batch, k, i, p, values, key
        self.samples: list[Sample | None] = []
        self.outstanding = 0

    def launch(self, n: int) -> None:
        self.outstanding += n
        for _ in range(n):
            self.samples.append(None)
            _run_sample(self.batch.flow, self.p, self.values, partial(self._sample_done, len(self.samples) - 1))

    def _sample_done(self, index: int, sample: Sample) -> None:
        self.samples[index] = sample
        self.outstanding -= 1
        if self.outstanding:
            return
        samples: list[Sample] = self.samples  # type: ignore[assignment]
        p = self.p
        if p.decided is not None and len(samples) < p.samples and not p.decided(samples):
            self.launch(min(p.round_size, p.samples - len(samples)))
        elif p.usc is not None:
            self._usc(samples)
        else:
            self.batch._finished(self.k, self.i, samples, None)

    def _usc(self, samples: list[Sample]) -> None:
        """Universal self-consistency: one greedy request naming the most consistent sample."""
        max_tokens, max_model_len, fallback = self.p.usc
        if len(samples) == 1:
            return self.batch._finished(self.k, self.i, samples, Selection(0, "single", 0))
        engine = self.batch.flow.engine
        fits = lambda prompt: engine.prompt_tokens(prompt) + max_tokens <= max_model_len  # noqa: E731
        usc = plan(self.values["question"], [s.final for s in samples], fits, fallback)
        if usc.prompt is None:
            index, how = choose(self.key, len(samples), usc, None)
            return self.batch._finished(self.k, self.i, samples, Selection(index, how, 0))

        def picked(c) -> None:
            index, how = choose(self.key, len(samples), usc, c.text)
            self.batch._finished(self.k, self.i, samples, Selection(index, how, c.tokens))

        self.batch.flow.ask(usc.prompt, picked, temperature=0.0, top_p=1.0, max_tokens=max_tokens)


def _run_sample(flow: Flow, p: PassRun, values: dict, then: Callable[[Sample], None]) -> None:
    """One pass of one sample through the program's steps, each step asked as soon as the
    previous one is back. A fan-out step asks once per item and merges them in order."""
    steps = p.program.steps
    sample = Sample(dict(values))

    def step(n: int) -> None:
        if n == len(steps) or sample.error is not None:
            if sample.error is not None:
                sample.final = ""
            for later in steps[n:]:
                sample.tokens.setdefault(later.name, 0)
            return then(sample)
        st = steps[n]
        sample.tokens[st.name] = 0
        items = [None] if st.over is None else split_items(sample.values[st.over], st.max_items)
        replies: list[str | None] = [None] * len(items)
        left = [len(items)]

        def got(j: int, c) -> None:
            sample.tokens[st.name] += c.tokens
            if c.error and sample.error is None:
                sample.error = f"{st.name}: {c.error}"
            replies[j] = c.text if items[j] is None else f"{items[j]}\n{c.text.strip()}"
            left[0] -= 1
            if left[0]:
                return
            if sample.error is None:
                text = replies[0] if st.over is None else "\n\n".join(f"{m}. {r}" for m, r in enumerate(replies, 1))
                sample.values[st.name] = text
                sample.final = text
            step(n + 1)

        for j, item in enumerate(items):
            prompt = render(st.template, sample.values if item is None else {**sample.values, "item": item})
            flow.ask(prompt, partial(got, j), **p.sampling)

    step(0)
