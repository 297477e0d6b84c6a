"""Elastic generation on a local multi-node Ray cluster whose nodes declare (fake) GPUs:
the engine pool grows when a node joins and loses nothing when a node leaves.

The engines behind the fake GPUs are the real vLLM CPU engine (S2D_FAKE_GPUS=1): Ray
schedules them exactly as on a GPU cluster, one GPU each."""

import threading
import time

import pyarrow.parquet as pq
import pytest

from s2d_ray.config import load_config
from s2d_ray.rundir import RunDir, read_parts
from tests.conftest import TINY

pytestmark = pytest.mark.e2e
# Enough work that the first engine alone cannot finish it while the second one starts
# (about 65 s on 2 cores): the node that leaves must leave mid-run. Measured with 96: 26
# of 96 inputs were done when the node left; with 64, 26 of 64 (38 after).
INPUTS = 64


def _engine_nodes(run: RunDir) -> set[str]:
    table = read_parts(run.generate, columns=["engine_node"])  # (a part merged away meanwhile is read again)
    return set(table.column("engine_node").to_pylist()) if table is not None else set()


def _rows(run: RunDir) -> int:
    table = read_parts(run.generate, columns=["id"])
    return table.num_rows if table is not None else 0


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


def test_generation_grows_with_a_new_node_and_survives_one_leaving(tmp_path, monkeypatch, local_job):
    import ray
    from ray.cluster_utils import Cluster

    from s2d_ray import pipeline

    monkeypatch.setenv("S2D_FAKE_GPUS", "1")
    cfg = load_config(local_job, [
        *TINY, "engine.device=cuda", "engine.concurrency=[1, 2]", "engine.batch_size=2", "engine.cpus_per_engine=1",
        "train.use_gpu=true", "train.backend=nccl", "train.workers=1",
        f"task.train={INPUTS}", "method.name=rar1", "filter.samples=4", "sampling.max_tokens=24",
    ])  # fmt: skip
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    first = cluster.add_node(num_cpus=1, num_gpus=1)
    ray.init(address=cluster.address)
    run = RunDir(tmp_path)
    errors: list[BaseException] = []

    def generate() -> None:
        try:
            pipeline.generate(cfg, run, log=lambda m: None)
        except BaseException as err:  # noqa: BLE001 (re-raised in the test thread)
            errors.append(err)

    worker = threading.Thread(target=generate)
    try:
        worker.start()
        _wait(lambda: _engine_nodes(run) == {first.node_id}, 600, "the first engine's first part")
        second = cluster.add_node(num_cpus=1, num_gpus=1)
        _wait(lambda: second.node_id in _engine_nodes(run) or not worker.is_alive(), 600, "an engine on the new node")
        assert second.node_id in _engine_nodes(run), "the pool did not grow onto the node that joined"
        # The first node leaves mid-run (its engine is busy); a spare node takes its place.
        spare = cluster.add_node(num_cpus=1, num_gpus=1)
        before = _rows(run)
        assert worker.is_alive() and before <= INPUTS * 3 // 4, f"{before} of {INPUTS} inputs were done before the node could leave"
        cluster.remove_node(first, allow_graceful=False)
        worker.join(timeout=900)
        assert not worker.is_alive(), "generation did not finish after a node left"
        assert not errors, errors
        table = pq.read_table(run.generate)
        ids = table.column("id").to_pylist()
        assert len(ids) == INPUTS and len(set(ids)) == INPUTS  # every input exactly once
        assert {e.id for e in cfg.task.examples("train")} == set(ids)
        assert len(ids) > before  # it kept going after the loss (the parts are merged at the stage's end)
        assert {first.node_id, second.node_id} <= _engine_nodes(run) <= {first.node_id, second.node_id, spare.node_id}
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_a_tensor_parallel_engine_reserves_its_gpus_in_one_packed_placement_group(tmp_path, monkeypatch, local_job):
    import ray
    from ray.cluster_utils import Cluster

    from s2d_ray import pipeline

    monkeypatch.setenv("S2D_FAKE_GPUS", "1")
    cfg = load_config(local_job, [
        *TINY, "engine.device=cuda", "engine.tensor_parallel=2", "engine.concurrency=[1, 1]", "engine.cpus_per_engine=1",
        "train.use_gpu=true", "train.backend=nccl", "train.workers=1",
        "task.train=2", "method.name=rar1", "filter.samples=1", "sampling.max_tokens=8",
    ])  # fmt: skip
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    cluster.add_node(num_cpus=1, num_gpus=1)  # a 1-GPU node cannot hold a 2-GPU engine
    two_gpus = cluster.add_node(num_cpus=1, num_gpus=2)
    ray.init(address=cluster.address)
    try:
        pipeline.generate(cfg, RunDir(tmp_path), log=lambda m: None)
        groups = [g for g in ray.util.placement_group_table().values() if (g.get("name") or "").startswith("s2d-engine-")]
        assert len(groups) == 1, groups
        (group,) = groups
        assert group["strategy"] == "STRICT_PACK"
        assert sorted(b.get("GPU", 0) for b in group["bundles"].values()) == [1, 1]
        assert group["state"] == "REMOVED"  # released at the end of the stage: the GPUs are free again
        deadline = time.time() + 30
        while ray.available_resources().get("GPU", 0) < 3:
            assert time.time() < deadline, ray.available_resources()
            time.sleep(1)
        nodes = pq.read_table(tmp_path / "generate", columns=["engine_node"]).column("engine_node").to_pylist()
        assert set(nodes) == {two_gpus.node_id}
    finally:
        ray.shutdown()
        cluster.shutdown()
