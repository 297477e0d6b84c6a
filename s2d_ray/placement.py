"""Where work runs on a Ray cluster, and whether the cluster can hold it.

* A generator engine reserves tensor_parallel x pipeline_parallel GPUs: one GPU
  directly, or a placement group of one bundle per GPU, packed on one node (tensor
  parallel) or spread over nodes stage by stage (pipeline parallel), plus its CPUs.
* The trainer group is `train.workers` bundles of one GPU each (one DeepSpeed rank
  per GPU), placed with `train.placement_strategy`.
* `check_cluster` compares both with the live cluster's GPU nodes before anything is
  allocated, and fails with one line when the job cannot run there.

`S2D_FAKE_GPUS=1` is for tests on a local multi-node cluster whose nodes declare GPUs
they do not have (`ray.cluster_utils.Cluster`): GPU resources are requested exactly as
on a real cluster, but the engines and trainers behind them run on CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

from s2d_ray.errors import S2DError

FAKE_GPUS_ENV = "S2D_FAKE_GPUS"
GROUP_PREFIX = "s2d-engine-"
NOSET_ENV = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"


def fake_gpus() -> bool:
    return os.environ.get(FAKE_GPUS_ENV, "") not in ("", "0")


def runs_on_cpu(device: str) -> bool:
    """The compute device behind the resources: CPU locally and with fake GPUs."""
    return device == "cpu" or fake_gpus()


def visible_devices_env(environ: dict, gpu_ids: list) -> dict[str, str]:
    """With RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES set (some clusters set it for
    their own tools), Ray no longer narrows CUDA_VISIBLE_DEVICES, every engine and rank
    sees every GPU of the node and all of them pick GPU 0. Pin the GPUs Ray assigned."""
    if environ.get(NOSET_ENV, "") in ("", "0") or not gpu_ids:
        return {}
    return {"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in gpu_ids)}  # indices or UUIDs


def pin_assigned_gpus() -> None:
    """Call in an engine actor before CUDA is initialised. (Not in Ray Train workers: Ray
    Train sets their CUDA_VISIBLE_DEVICES and device itself, NOSET or not.)"""
    import ray

    os.environ.update(visible_devices_env(dict(os.environ), ray.get_gpu_ids()))


def engine_bundles(tensor_parallel: int, pipeline_parallel: int, cpus: float) -> tuple[list[dict], str]:
    """One GPU bundle per engine GPU (the first also holds the actor's CPUs), and the
    strategy: a tensor-parallel group must share a node; pipeline stages may not (PACK
    still keeps them on one node when one has room; vLLM orders its ranks node by node,
    see `split_tp_groups`)."""
    gpus = tensor_parallel * pipeline_parallel
    bundles = [{"GPU": 1, "CPU": cpus}] + [{"GPU": 1} for _ in range(gpus - 1)]
    return bundles, "STRICT_PACK" if pipeline_parallel == 1 else "PACK"


def split_tp_groups(bundle_nodes: list[str], tensor_parallel: int) -> list[str]:
    """Nodes whose share of an engine's bundles is not a whole number of tensor-parallel
    groups: vLLM gives consecutive ranks (a TP group) to bundles sorted by node, so such a
    node has a TP group reaching across the network."""
    counts: dict[str, int] = {}
    for node in bundle_nodes:
        counts[node] = counts.get(node, 0) + 1
    return [node for node, count in counts.items() if count % tensor_parallel]


def engines_that_fit(node_gpus: list[int], tensor_parallel: int, pipeline_parallel: int) -> int:
    groups = sum(n // tensor_parallel for n in node_gpus)  # tensor-parallel groups that fit on one node each
    return groups // pipeline_parallel


def check_cluster(cfg, node_gpus: list[int]) -> None:
    """One clear line when the live cluster cannot hold the job's GPU work.

    An autoscaling cluster declares what it can grow to (`cluster.gpus_per_node` and
    `cluster.max_nodes`, checked when the job file is loaded); only a cluster without
    that declaration is held to the GPUs it has now."""
    e, t = cfg.engine, cfg.train
    if e.gpus_per_engine == 0 and not t.use_gpu:
        return
    if cfg.cluster.max_nodes is not None and cfg.cluster.gpus_per_node is not None:
        return
    nodes = [n for n in node_gpus if n > 0]
    have = f"the cluster has {sum(nodes)} GPUs on {len(nodes)} node(s) ({', '.join(map(str, nodes)) or 'none'})"
    hint = "; if it autoscales, declare cluster.gpus_per_node and cluster.max_nodes"
    if e.gpus_per_engine:
        if e.tensor_parallel > max(nodes, default=0):
            raise S2DError(f"engine.tensor_parallel {e.tensor_parallel} needs that many GPUs on one node; {have}{hint}")
        fit = engines_that_fit(nodes, e.tensor_parallel, e.pipeline_parallel)
        if fit < e.concurrency[0]:
            raise S2DError(
                f"engine.concurrency needs at least {e.concurrency[0]} engines of {e.gpus_per_engine} GPUs; "
                f"{have}, room for {fit}{hint}"
            )
    if t.use_gpu:
        if t.placement_strategy == "STRICT_PACK" and max(nodes, default=0) < t.workers:
            raise S2DError(f"train.placement_strategy STRICT_PACK puts {t.workers} workers on one node; {have}{hint}")
        if t.placement_strategy == "STRICT_SPREAD" and len(nodes) < t.workers:
            raise S2DError(f"train.placement_strategy STRICT_SPREAD needs {t.workers} GPU nodes; {have}{hint}")
        need = t.workers + (e.concurrency[0] * e.gpus_per_engine if t.streaming else 0)
        if sum(nodes) < need:
            what = f"{t.workers} trainer GPUs" + (" plus the minimum engines (train.streaming)" if t.streaming else "")
            raise S2DError(f"{what}: {need} GPUs; {have}{hint}")


def live_node_gpus() -> list[int]:
    import ray

    return [int(n["Resources"].get("GPU", 0)) for n in ray.nodes() if n.get("Alive")]


def engine_remote_args(cfg, env: dict, tag: str = "") -> dict:
    """Ray resources of one generator actor: its CPUs, and its GPUs on a cluster.

    Placement groups are named `s2d-engine-<tag>-...` so that `release_engine_groups(tag)`
    can free every GPU of a stage when it ends, whichever process (driver, or Ray Train's
    data coordinator when streaming) started the engines."""
    if cfg.device == "cpu":
        return {"num_cpus": cfg.cpus_per_engine, "runtime_env": {"env_vars": env}}
    if cfg.gpus_per_engine == 1:
        return {"num_cpus": cfg.cpus_per_engine, "num_gpus": 1, "runtime_env": {"env_vars": env}}
    bundles, strategy = engine_bundles(cfg.tensor_parallel, cfg.pipeline_parallel, cfg.cpus_per_engine)
    groups = EngineGroups(bundles, strategy, f"{GROUP_PREFIX}{tag}-", cfg.concurrency[1], cfg.cpus_per_engine)

    def placement() -> dict:
        # Ray Data asks for remote args each time it starts an actor (a scale-up, a
        # replacement): each new actor gets a group no live actor holds. It also asks
        # without starting one (its issue detectors read the memory setting): no claim then.
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group = groups.peek() if _probing() else groups.take()
        return {
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                # vLLM hands the group to its Ray workers itself (ParallelConfig.placement_group);
                # capturing child tasks would pull any other task into bundles without CPUs.
                group, placement_group_bundle_index=0, placement_group_capture_child_tasks=False
            )
        }

    # The actor takes the first bundle's CPUs; its GPUs belong to vLLM's workers.
    return {"num_cpus": cfg.cpus_per_engine, "ray_remote_args_fn": placement, "runtime_env": {"env_vars": env}}


def _probing() -> bool:
    """Whether Ray Data is only reading an operator's remote args, not starting an actor:
    in Ray 2.60 such reads go through MapOperator._get_dynamic_ray_remote_args, actor
    starts through ActorPoolMapOperator._merge_ray_remote_args. Any other caller claims."""
    import sys

    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == "_get_dynamic_ray_remote_args":
            return True
        if frame.f_code.co_name in ("_merge_ray_remote_args", "_start_actor"):
            return False
        frame = frame.f_back
    return False


class EngineGroups:
    """The engine pool's placement groups: at most `most` (engine.concurrency max), so the
    GPUs reserved never exceed what the job asks for, and each handed to one actor at a time.

    A group is free for a new actor when no actor holds its first bundle (the actor's CPUs
    there are all available) and it was not handed out in the last `grace_s` (an actor
    handed it may not be scheduled yet). A ring would hand a live actor's group to a new
    one after Ray Data scaled the pool down and up again (the new actor then waits for
    ever). With every group held (a dying actor not yet gone), it waits up to `wait_s` for
    one to free, then adds a group (pending until GPUs are free; removed with the stage)."""

    def __init__(self, bundles: list[dict], strategy: str, prefix: str, most: int, cpus: float,
                 grace_s: float = 60.0, wait_s: float = 30.0):  # fmt: skip
        self.bundles, self.strategy, self.prefix, self.most, self.cpus = bundles, strategy, prefix, most, cpus
        self.grace_s, self.wait_s = grace_s, wait_s
        self.groups: list = []
        self.handed: list[float] = []

    def peek(self):
        """A group for a caller that only reads the remote args (Ray Data's memory probes):
        nothing is claimed; the first group is made if there is none (the first engine
        will take it)."""
        if not self.groups:
            self._new()
            self.handed[0] = float("-inf")
        return self.groups[0]

    def take(self):
        import ray

        free = self.free()
        if free:  # a group no engine holds (a peeked one, or one whose engine went)
            oldest = min(free, key=lambda i: self.handed[i])
            self.handed[oldest] = time.monotonic()
            return self.groups[oldest]
        if len(self.groups) < self.most:
            return self._new()
        deadline = time.monotonic() + self.wait_s
        while True:
            free = self.free()
            if free:
                oldest = min(free, key=lambda i: self.handed[i])
                self.handed[oldest] = time.monotonic()
                return self.groups[oldest]
            if time.monotonic() >= deadline:
                print(f"engines: every placement group of the pool is held; adding one ({len(self.groups) + 1})", flush=True)
                return self._new()
            time.sleep(1.0)
            ray.available_resources()  # (the view refreshes between polls)

    def free(self) -> list[int]:
        import ray

        available = ray.available_resources()
        now = time.monotonic()
        out = []
        for i, group in enumerate(self.groups):
            key = f"CPU_group_0_{group.id.hex()}"  # Ray's resource of a placed group's first bundle
            if now - self.handed[i] >= self.grace_s and available.get(key, 0.0) >= self.cpus - 1e-9:
                out.append(i)
        return out

    def _new(self):
        import ray

        group = ray.util.placement_group(self.bundles, strategy=self.strategy, name=f"{self.prefix}{uuid.uuid4().hex[:8]}")
        self.groups.append(group)
        self.handed.append(time.monotonic())
        return group


def trainer_scaling(t) -> dict:
    """Keyword arguments of Ray Train's ScalingConfig for the ZeRO-3 worker group."""
    resources = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = 1
    return {
        "num_workers": t.workers,
        "use_gpu": t.use_gpu,
        "resources_per_worker": resources,
        "placement_strategy": t.placement_strategy,
    }


def release_engine_groups(tag: str) -> int:
    """Remove the engines' placement groups of one stage (their GPUs go back to the
    cluster for the trainer or the next stage); returns how many were removed."""
    import ray
    from ray.util.placement_group import get_placement_group, remove_placement_group

    removed = 0
    for group in ray.util.placement_group_table().values():
        name = group.get("name") or ""
        if name.startswith(f"{GROUP_PREFIX}{tag}-") and group.get("state") != "REMOVED":
            try:
                remove_placement_group(get_placement_group(name))
                removed += 1
            except ValueError:  # already gone
                pass
    return removed


# A process of an earlier stage that Ray already counts as gone (an engine, a trainer rank)
# may still be releasing its GPU memory; vLLM refuses to start below its share.
GPU_RELEASE_TIMEOUT_S = 180.0


def wait_for_free_gpu(fraction: float, timeout_s: float = GPU_RELEASE_TIMEOUT_S, device=None) -> float:
    """Block until `device` (default: the current CUDA device) has `fraction` of its memory
    free, or the timeout passes; returns the free fraction seen last. Creates a CUDA context."""
    import torch

    deadline = time.monotonic() + timeout_s
    while True:
        free, total = torch.cuda.mem_get_info(device)
        if free >= fraction * total or time.monotonic() >= deadline:
            return free / total
        time.sleep(1.0)


def wait_for_free_gpu_elsewhere(fraction: float, timeout_s: float = GPU_RELEASE_TIMEOUT_S) -> float:
    """`wait_for_free_gpu` in a child process, so that the caller (an engine actor whose
    engine runs in processes of its own) keeps no CUDA context of its own."""
    # Self-contained: a child of a Ray worker may not see s2d_ray (a runtime env's py_modules).
    code = (
        "import time, torch\n"
        f"deadline = time.monotonic() + {timeout_s!r}\n"
        "while True:\n"
        "    free, total = torch.cuda.mem_get_info()\n"
        f"    if free >= {fraction!r} * total or time.monotonic() >= deadline:\n"
        "        break\n"
        "    time.sleep(1.0)\n"
        "print(free / total)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s + 120)
    if proc.returncode != 0:
        raise S2DError(f"could not read GPU memory: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return float(proc.stdout.strip().splitlines()[-1])


def wait_for_group_gpus(fraction: float, timeout_s: float = GPU_RELEASE_TIMEOUT_S, margin_s: float = 60.0) -> list[float]:
    """For a multi-GPU engine: one short task per GPU bundle of the caller's placement
    group waits until that GPU is free enough (each in a worker process that exits after)."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = ray.util.get_current_placement_group()
    if group is None:
        return []
    waiter = ray.remote(num_cpus=0, num_gpus=1, max_calls=1)(wait_for_free_gpu)
    refs = [
        waiter.options(scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i)).remote(
            fraction, timeout_s
        )
        for i, bundle in enumerate(group.bundle_specs)
        if bundle.get("GPU")
    ]
    # A bundle whose GPU another process still holds as a Ray resource (a dead engine's
    # worker not yet gone) never runs its waiter: bounded, and then taken as full.
    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s + margin_s)
    for ref in pending:
        ray.cancel(ref, force=True)
    return [ray.get(r) if r in ready else 0.0 for r in refs]


def engine_bundle_nodes() -> list[str]:
    """The node of each bundle of the caller's placement group (empty outside one)."""
    import ray

    group = ray.util.get_current_placement_group()
    if group is None:
        return []
    table = ray.util.placement_group_table(group)
    return [table["bundles_to_node_id"][i] for i in sorted(table.get("bundles_to_node_id", {}))]
