"""Connecting to Ray: a local cluster on a laptop, or the cluster a job runs on."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

from s2d_ray.config import JobConfig

# No machine here reaches the internet; Ray must not try to send usage stats.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@contextmanager
def ray_session(cfg: JobConfig, run_root=None):
    """Ray for a command; `run_root`: its run directory, which a cluster of several nodes
    must share (checked once, when Ray starts, before any engine)."""
    import ray

    if ray.is_initialized():
        _check(cfg)
        yield ray
        return
    # A submitted job gets RAY_ADDRESS from Ray; otherwise start a fresh local Ray
    # rather than join whatever a crashed earlier run may have left behind.
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(
        address=address,
        num_cpus=cfg.ray.num_cpus if address == "local" else None,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=True,
        configure_logging=True,
    )
    _check(cfg)
    if run_root is not None:
        from s2d_ray.preflight import require_shared_run_dir

        try:
            require_shared_run_dir(run_root)
        except BaseException:
            ray.shutdown()
            raise
    # Into RUN/logs/ (stdout): where Ray keeps its own services' logs.
    print(f"s2d: Ray's session logs (raylet, GCS, each worker's files): {ray_logs_dir()}", flush=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    ctx.print_on_execution_start = False
    ctx.verbose_stats_logs = False
    try:
        yield ray
    finally:
        ray.shutdown()


def ray_logs_dir() -> str:
    """Where this Ray session keeps its logs (the workers' tracebacks), as Ray itself says."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # no public API in Ray 2.60
    return node.get_logs_dir_path() if node is not None else "the Ray session's logs folder"


def _check(cfg: JobConfig) -> None:
    """Before any GPU is allocated: can this cluster hold the job's engines and trainers?"""
    if cfg.engine.device == "cuda":
        from s2d_ray.placement import check_cluster, live_node_gpus

        check_cluster(cfg, live_node_gpus())
