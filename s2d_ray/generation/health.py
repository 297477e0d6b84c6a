"""Engine deaths counted over a whole stage, so that a crash loop ends with one line."""

from __future__ import annotations

from s2d_ray.config import EngineConfig
from s2d_ray.errors import S2DError


class EngineFailed(S2DError):
    """Engines died more often than `engine.max_restarts` allows in one stage."""


class EngineHealth:
    """One per generation stage, on the driver's node: counts engine deaths over every
    actor of the pool and keeps the last reasons, so that a crash loop ends with one line."""

    def __init__(self, max_restarts: int):
        self.max_restarts = max_restarts
        self.reasons: dict[str, str] = {}  # actor id -> why its last process died
        self.deaths: list[str] = []

    def dying(self, actor: str, reason: str) -> None:
        self.reasons[actor] = reason

    def restarted(self, actor: str, node: str) -> str | None:
        """A process of `actor` died and Ray started another: counted. Returns the line to
        fail with when that exceeds the budget."""
        reason = self.reasons.pop(actor, "its process died without a word (killed, out of memory, a crash, "
                                           "or its node was lost; see the actor's log)")  # fmt: skip
        self.deaths.append(f"{reason} (node {node[:8]})")
        return self.failure()

    def restarts(self) -> list[str]:
        return list(self.deaths)

    def failure(self) -> str | None:
        if len(self.deaths) <= self.max_restarts:
            return None
        times = "once" if len(self.deaths) == 1 else f"{len(self.deaths)} times"
        return (f"engine died {times} in this stage (engine.max_restarts {self.max_restarts}); "
                f"last: {self.deaths[-1]}")  # fmt: skip


def engine_health(engine: EngineConfig):
    """The stage's EngineHealth, on the driver's node (it must outlive any engine node)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(EngineHealth).options(num_cpus=0, scheduling_strategy=here).remote(engine.max_restarts)


def engine_failure(health) -> str | None:
    """The stage's engine-death line, if the pool's deaths exceeded the budget."""
    import ray

    try:
        return ray.get(health.failure.remote(), timeout=30)
    except Exception:  # noqa: BLE001 (the original error is raised instead)
        return None

