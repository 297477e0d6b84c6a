"""Engine placement groups on a real (local) Ray whose node declares GPUs it does not have,
and an engine's processes when its actor leaves: no engine is handed a live one's GPUs."""

import subprocess
import sys
import textwrap
import time

import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def ray_gpus():
    import ray

    ray.init(address="local", num_cpus=4, num_gpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _wait(predicate, seconds=30.0):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for Ray's resource view"
        time.sleep(0.2)


def test_a_new_engine_never_gets_a_live_engines_group(ray_gpus):
    ray = ray_gpus
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from s2d_ray.placement import EngineGroups, engine_bundles

    bundles, strategy = engine_bundles(2, 1, 1.0)
    groups = EngineGroups(bundles, strategy, "s2d-engine-test-", most=2, cpus=1.0, grace_s=0.0, wait_s=0.0)

    @ray.remote(num_cpus=1)
    class Engine:
        def ping(self):
            return 1

    def start(group):
        ray.get(group.ready(), timeout=30)
        actor = Engine.options(scheduling_strategy=PlacementGroupSchedulingStrategy(group, 0)).remote()
        ray.get(actor.ping.remote(), timeout=30)
        return actor

    g0, g1 = groups.take(), groups.take()
    a, b = start(g0), start(g1)
    ray.kill(b)  # Ray Data scales the pool down: the second engine goes
    _wait(lambda: groups.free() == [1])
    third = groups.take()  # and up again: a ring would hand out g0, whose engine is alive
    assert third.id == g1.id
    start(third)
    assert groups.free() == []
    before = len(groups.groups)
    extra = groups.take()  # all held (a dying engine not gone yet): a new, pending group, never a live one's
    assert extra.id not in {g0.id, g1.id} and len(groups.groups) == before + 1
    ray.kill(a)
    for g in groups.groups:
        ray.util.remove_placement_group(g)


def test_waiting_for_a_held_gpu_bundle_is_bounded(ray_gpus):
    ray = ray_gpus
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from s2d_ray.placement import wait_for_group_gpus

    group = placement_group([{"GPU": 1, "CPU": 1}], strategy="STRICT_PACK")
    ray.get(group.ready(), timeout=30)

    @ray.remote(num_cpus=0, num_gpus=1)
    class Holder:  # a dead engine's worker still holding the bundle's GPU
        def ping(self):
            return 1

    holder = Holder.options(scheduling_strategy=PlacementGroupSchedulingStrategy(group, 0)).remote()
    ray.get(holder.ping.remote(), timeout=30)

    @ray.remote(num_cpus=0)
    def waits():
        return wait_for_group_gpus(0.5, timeout_s=0.5, margin_s=2.0)

    seen = ray.get(waits.options(scheduling_strategy=PlacementGroupSchedulingStrategy(group)).remote(), timeout=60)
    assert seen == [0.0]  # taken as full, instead of waiting for ever
    ray.kill(holder)
    remove_placement_group(group)


def test_an_engine_leaving_takes_its_engine_core_process_with_it(tmp_path):
    # As on a GPU: the engine's core runs in a child process of the actor's; os._exit runs
    # no cleanup, so the actor must stop it first or it keeps the GPU for ever.
    pid_file = tmp_path / "child.pid"
    script = textwrap.dedent(f"""
        import os, subprocess, sys
        sys.path.insert(0, {str(ROOT)!r})
        from s2d_ray.engine import Engine
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        Engine.kill(None)
        os._exit(1)
    """)
    subprocess.run([sys.executable, "-c", script], timeout=60)
    pid = int(pid_file.read_text())
    import psutil

    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
