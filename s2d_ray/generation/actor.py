"""The generator actor: one vLLM engine (through `s2d_ray.engine`), whole programs over
batches, and the engine's health (a dead or stalled engine ends its actor)."""

from __future__ import annotations

import os
import threading
import time
import warnings

import pandas as pd

from s2d_ray.config import EngineConfig
from s2d_ray.engine import CPU_ENGINE_ENV, FAULT_ENV, GPU_ENGINE_ENV
from s2d_ray.hooks import BOUNDARY_ENV
from s2d_ray.generation.batch import run_batch
from s2d_ray.generation.health import EngineFailed
from s2d_ray.generation.stage import EngineStage, batch_job
from s2d_ray.generation.vote import vote_batch
from s2d_ray.methods.dataflow import Flow
from s2d_ray.placement import FAKE_GPUS_ENV, fake_gpus, runs_on_cpu


class GeneratorActor:
    """Hosts one vLLM engine; runs whole multi-step programs on batches of inputs.

    An engine that dies (EngineDead) or stalls (no step finished for
    `engine.stall_timeout_s` while it has work) is never used again: the actor's process
    exits, Ray starts the actor again (on the same or another node) and retries its batch.
    Every restart is counted by the stage's `EngineHealth`; past `engine.max_restarts` the
    restarted actor refuses to start and the stage fails with that line."""

    def __init__(self, stage: EngineStage, health=None, also: tuple[EngineStage, ...] = ()):
        import ray

        from s2d_ray.engine import Engine
        from s2d_ray.placement import pin_assigned_gpus

        context = ray.get_runtime_context()
        self.node = context.get_node_id()
        self.actor = context.get_actor_id() or "driver"
        self.health = health
        with warnings.catch_warnings():  # Ray's own use of a deprecated accessor
            warnings.simplefilter("ignore", DeprecationWarning)
            restarted = context.was_current_actor_reconstructed
        if health is not None and restarted:
            try:
                failure = ray.get(health.restarted.remote(self.actor, self.node), timeout=60)
            except Exception as err:  # noqa: BLE001 (counting must never stop an engine)
                print(f"engine on node {self.node[:8]}: restart not counted ({type(err).__name__})", flush=True)
                failure = None
            if failure:
                raise EngineFailed(failure)
        pin_assigned_gpus()
        engine = stage.engine
        if not runs_on_cpu(engine.device):
            _before_gpu_engine(engine)
        self.engine = Engine(stage.model_path, engine, dtype=stage.dtype, seed=stage.seed, chat_template=stage.chat_template)
        limits = ", ".join(f"{k} {v}" for k, v in self.engine.limits.items())
        print(f"engine on node {self.node[:8]}: vLLM uses {limits}", flush=True)
        self.stages = (stage, *also)  # a batch's `job` column picks one (same model and engine)
        # One thread turns the engine for every batch this actor holds (Ray Data hands it
        # engine.batches_per_engine at once): a batch's tail never leaves the engine idle.
        self.flow = Flow(self.engine)
        self.active: set = set()
        self.broken: BaseException | None = None
        self.lock = threading.Lock()  # `broken` and `active` change together
        self.flow.start(on_error=self._flow_failed)
        if engine.stall_timeout_s is not None:
            threading.Thread(target=self._watch, args=(engine.stall_timeout_s,), daemon=True).start()

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        stage = self.stages[batch_job(batch)]
        out = run_batch(self.flow, stage.task, list(stage.passes), batch, stage.engine.max_model_len, wait=self._wait)
        out["engine_node"] = self.node  # where each row was generated (elastic runs, debugging)
        # The vote here, on the batch's way out (~3 ms for 16 inputs): as a Ray Data stage of
        # its own (num_cpus 0) it started a worker process per concurrent block, each
        # importing Ray Data and pandas, on the CPUs the engines use.
        return vote_batch(out, **stage.vote, task=stage.task) if stage.vote is not None else out

    def _wait(self, work) -> None:
        with self.lock:
            if self.broken is not None:
                raise self.broken
            self.active.add(work)
        try:
            self.flow.add(work)
            work.done.wait()
        finally:
            self.active.discard(work)
        work.result()  # raises the flow's error, if it failed

    def _flow_failed(self, err: BaseException) -> None:
        from s2d_ray.engine import EngineDead

        if isinstance(err, EngineDead):
            self._exit(f"engine dead: {err}")
        # Anything else is a bug of ours, not the engine's: every batch fails with it (Ray
        # Data reports it), and so does every later one.
        with self.lock:
            self.broken = err
            failing = list(self.active)
        for work in failing:
            work.fail(err)

    def _watch(self, timeout: float) -> None:
        while True:
            time.sleep(min(5.0, timeout / 4))
            idle = time.monotonic() - self.engine.last_progress
            if self.engine.busy and idle > timeout:
                self._exit(f"engine stalled: no step finished for {idle:.0f} s (engine.stall_timeout_s {timeout:g})")

    def _exit(self, reason: str) -> None:
        """Leave for good: Ray restarts this actor in a fresh process and retries the batch."""
        import ray

        print(f"engine on node {self.node[:8]}: {reason}; the actor exits, Ray restarts it and its batch is redone",
              flush=True)  # fmt: skip
        if self.health is not None:
            try:
                ray.get(self.health.dying.remote(self.actor, reason), timeout=30)
            except Exception:  # noqa: BLE001 (the restart is counted all the same)
                pass
        try:
            self.engine.kill()  # its engine-core process must not outlive us holding the GPU
        except Exception as err:  # noqa: BLE001 (leaving matters more)
            print(f"engine on node {self.node[:8]}: could not stop the engine's processes: {err}", flush=True)
        os._exit(1)

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


def _before_gpu_engine(engine: EngineConfig) -> None:
    """On real GPUs: wait until an earlier stage's processes have released the memory this
    engine will claim (Ray frees the resource before the memory), and warn when a
    pipeline-parallel engine's placement split a tensor-parallel group across nodes."""
    from s2d_ray.placement import engine_bundle_nodes, split_tp_groups, wait_for_free_gpu_elsewhere, wait_for_group_gpus

    need = engine.gpu_memory_utilization
    seen = [wait_for_free_gpu_elsewhere(need)] if engine.gpus_per_engine == 1 else wait_for_group_gpus(need)
    if any(free < need for free in seen):
        print(f"engine: GPU memory still held by another process ({min(seen):.0%} free, "
              f"engine.gpu_memory_utilization {need}); vLLM will say whether it can start", flush=True)  # fmt: skip
    if engine.pipeline_parallel > 1:
        split = split_tp_groups(engine_bundle_nodes(), engine.tensor_parallel)
        if split:
            print(f"engine: a tensor-parallel group of {engine.tensor_parallel} spans nodes ({', '.join(split)} hold a "
                  "partial group): it will run, slowly; give nodes a multiple of engine.tensor_parallel free GPUs",
                  flush=True)  # fmt: skip


def engine_env(cfg: EngineConfig) -> dict[str, str]:
    env = dict(CPU_ENGINE_ENV if runs_on_cpu(cfg.device) else GPU_ENGINE_ENV)
    if runs_on_cpu(cfg.device):
        # Ray sets OMP_NUM_THREADS=num_cpus (rounded down); say it explicitly.
        env["OMP_NUM_THREADS"] = str(max(1, int(cfg.cpus_per_engine)))
    if fake_gpus():
        env[FAKE_GPUS_ENV] = "1"
    for hook in (FAULT_ENV, BOUNDARY_ENV):  # test hooks reach the engines on every node
        if os.environ.get(hook):
            env[hook] = os.environ[hook]
    return env

