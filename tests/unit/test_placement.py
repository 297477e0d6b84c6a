"""Placement, cluster checks, memory and cost estimates: no Ray cluster needed."""

from pathlib import Path

import pytest

from s2d_ray.config import ConfigError, load_config, parse_config
from s2d_ray.errors import S2DError
from s2d_ray.estimate import estimate, params_from_config, trainer_memory
from s2d_ray.placement import check_cluster, engine_bundles, engines_that_fit, trainer_scaling, visible_devices_env

JOBS = Path(__file__).resolve().parents[2] / "jobs"
PAPER = JOBS / "paper" / "last-letter-rar2-70b.yaml"

LLAMA2_70B = {"hidden_size": 8192, "num_hidden_layers": 80, "vocab_size": 32000, "intermediate_size": 28672,
              "num_attention_heads": 64, "num_key_value_heads": 8}  # fmt: skip


def test_parameter_count_of_llama2_70b_from_its_config():
    assert params_from_config(LLAMA2_70B) == pytest.approx(68.98e9, rel=0.002)


def test_engine_bundles_pack_tensor_parallel_and_spread_pipeline_stages():
    bundles, strategy = engine_bundles(4, 1, 4)
    assert bundles == [{"GPU": 1, "CPU": 4}, {"GPU": 1}, {"GPU": 1}, {"GPU": 1}] and strategy == "STRICT_PACK"
    bundles, strategy = engine_bundles(2, 2, 1)
    assert len(bundles) == 4 and strategy == "PACK"
    assert engines_that_fit([8, 8], 4, 1) == 4 and engines_that_fit([8, 2], 4, 1) == 2
    assert engines_that_fit([4, 4, 4], 4, 2) == 1  # two 4-GPU stages per engine, one node each


def test_trainer_scaling_is_one_gpu_per_rank():
    cfg = load_config(PAPER)
    assert trainer_scaling(cfg.train) == {
        "num_workers": 16, "use_gpu": True, "resources_per_worker": {"CPU": 8, "GPU": 1}, "placement_strategy": "PACK",
    }  # fmt: skip


def test_noset_cuda_visible_devices_is_pinned_to_the_assigned_gpus():
    assert visible_devices_env({}, [3]) == {}  # Ray narrows CUDA_VISIBLE_DEVICES itself
    noset = {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}
    assert visible_devices_env(noset, [3, 5]) == {"CUDA_VISIBLE_DEVICES": "3,5"}
    assert visible_devices_env(noset, []) == {}


def _paper(*sets):
    return load_config(PAPER, ["cluster.max_nodes=null", *sets])  # held to the live cluster


def test_live_cluster_check_names_what_does_not_fit():
    check_cluster(_paper(), [0, 8, 8])  # CPU head + two 8-GPU nodes: 16 trainer GPUs, 1+ engines
    with pytest.raises(S2DError, match="train.*16 GPUs; the cluster has 8 GPUs on 1 node"):
        check_cluster(_paper(), [0, 8])
    with pytest.raises(S2DError, match="at least 3 engines of 4 GPUs.*room for 2"):
        check_cluster(_paper("engine.concurrency=[3, 4]"), [8])
    with pytest.raises(S2DError, match="tensor_parallel 4 needs that many GPUs on one node"):
        check_cluster(_paper(), [2, 2, 2, 2, 2, 2, 2, 2])
    with pytest.raises(S2DError, match="plus the minimum engines"):
        check_cluster(_paper("train.streaming=true"), [8, 8])
    with pytest.raises(S2DError, match="if it autoscales, declare"):
        check_cluster(_paper(), [])
    check_cluster(load_config(PAPER), [])  # autoscaling cluster declared in the job: checked at load time


@pytest.mark.parametrize(
    "override, message",
    [
        ("engine.tensor_parallel=1", "needs 128.5 GiB of weights per GPU"),
        ("engine.tensor_parallel=3", "tensor_parallel 3 must divide cluster.gpus_per_node 8"),
        ("train.offload_optimizer=false,train.workers=8", "ZeRO-3 training of a 69B model on 8 GPUs needs ~166 GiB"),
        ("cluster.host_memory_gib=100", "CPU offload needs ~519 GiB of host memory per node"),
        ("train.workers=64", "train.workers 64 need 64 GPUs; the cluster has at most 32"),
        ("train.gpus_per_worker=2", "a DeepSpeed rank drives one GPU"),
        ("train.streaming=true", "streaming: true needs train.steps"),
    ],
)
def test_jobs_that_cannot_fit_fail_when_loaded(override, message):
    sets = override.split(",") + (["train.steps=null"] if "streaming" in override else [])
    with pytest.raises(ConfigError, match=message) as err:
        load_config(PAPER, sets)
    assert "\n" not in str(err.value)


def test_offload_moves_optimizer_states_off_the_gpu():
    cfg = load_config(PAPER, ["train.offload_params=true"])
    with_offload = trainer_memory(cfg, 69e9)
    assert with_offload["breakdown_gib"]["optimizer"] == 0 and with_offload["breakdown_gib"]["parameters"] == 0
    assert with_offload["host_per_node_gib"] > trainer_memory(load_config(PAPER), 69e9)["host_per_node_gib"]


def test_estimate_counts_every_call_of_the_method():
    base = parse_config({"task": {"name": "last_letter", "train": 10, "test": 4}, "method": {"name": "rar2"},
                         "filter": {"samples": 4}, "sampling": {"max_tokens": 100}, "cost": {"device_hour_price": 2.0}})  # fmt: skip
    est = estimate(base)
    assert est["stages"]["generate"]["tokens"] == 10 * 4 * 2 * 100 * 0.5  # inputs x N x steps x tokens x fill
    more = parse_config({**base.model_dump(mode="json"), "filter": {"samples": 8}})
    assert estimate(more)["stages"]["generate"]["tokens"] == 2 * est["stages"]["generate"]["tokens"]
    assert est["cost"] == pytest.approx(2.0 * est["device_hours"])
    assert est["stages"]["eval"]["inputs"] == 4


def test_estimate_of_bsm_with_swap_counts_both_orders_and_every_criterion(tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text('{"question": "q", "response_a": "a", "response_b": "b", "winner": "tie"}\n' * 3)
    cfg = parse_config({"task": {"name": "pairwise", "data": {"train": str(data)}}, "method": {"name": "bsm"},
                        "filter": {"name": "swap", "samples": 1}, "sampling": {"max_tokens": 10}})  # fmt: skip
    assert estimate(cfg)["stages"]["generate"]["tokens"] == 3 * (1 + 5 + 1) * 10 * 0.5 * 2


def test_paper_jobs_estimate_without_their_data_or_weights():
    for job in sorted((JOBS / "paper").glob("*.yaml")):
        est = estimate(load_config(job))
        assert {"generate", "train", "eval"} <= set(est["stages"]), job.name
        assert est["memory"]["engine"]["weights_per_gpu_gib"] < est["memory"]["engine"]["usable_per_gpu_gib"]


def test_a_node_with_a_partial_tensor_parallel_group_is_named():
    from s2d_ray.placement import split_tp_groups

    assert split_tp_groups(["a"] * 8, 4) == []
    assert split_tp_groups(["a"] * 4 + ["b"] * 4, 4) == []
    assert split_tp_groups(["a"] * 5 + ["b"] * 3, 4) == ["a", "b"]
    assert split_tp_groups(["a"] * 6 + ["b"] * 2, 2) == []


def test_gpu_ids_may_be_uuids_under_noset():
    noset = {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}
    assert visible_devices_env(noset, ["GPU-1a2b"]) == {"CUDA_VISIBLE_DEVICES": "GPU-1a2b"}


def test_gpu_engines_compile_by_default_and_cpu_engines_do_not():
    from s2d_ray.config import EngineConfig

    assert EngineConfig().enforce_eager is None  # resolved by the engine: eager on CPU only
    assert load_config(PAPER).engine.enforce_eager is False
    with pytest.raises(ConfigError, match="train.collective_timeout_s"):
        load_config(PAPER, ["train.collective_timeout_s=5"])
    with pytest.raises(ConfigError, match="train.export_shard_gib"):
        load_config(PAPER, ["train.export_shard_gib=0"])


def test_resuming_counts_the_checkpoint_read_back_into_host_memory():
    cfg = load_config(JOBS / "paper" / "coin-flip-rar2-70b.yaml")
    mem = trainer_memory(cfg, 69e9)
    # 8 ranks a node, each reading its 12-byte-a-parameter shard on top of 16 bytes resident.
    assert 1.7 < mem["host_per_node_resume_gib"] / (mem["host_per_node_gib"] - mem["export_host_gib"]) < 1.8
    steady = mem["host_per_node_gib"]
    with pytest.raises(ConfigError, match="resuming from a checkpoint needs ~9\\d\\d GiB of host memory per node"):
        load_config(JOBS / "paper" / "coin-flip-rar2-70b.yaml", [f"cluster.host_memory_gib={steady + 50:.0f}"])


def test_checkpoints_are_planned_from_their_cost():
    from s2d_ray.estimate import checkpoint_plan
    from s2d_ray.training.checkpoints import checkpoint_interval

    cfg = load_config(JOBS / "paper" / "gsm8k-cot-70b.yaml")
    plan = estimate(cfg)["stages"]["train"]["checkpoints"]
    assert plan["bytes"] == 69e9 * 12 and plan["bytes_per_rank"] == 69e9 * 12 / 16
    assert plan["count"] == len(range(plan["every"], 5000, plan["every"]))
    assert plan["device_hours"] == pytest.approx(plan["count"] * plan["seconds_each"] * 16 / 3600)
    # Unset interval: never more than 10% of the training time spent writing checkpoints.
    t = cfg.train.model_copy(update={"checkpoint_every": None})
    assert checkpoint_interval(t, 1000, steps_per_checkpoint=30.0) == 300
    assert checkpoint_interval(t, 1000, steps_per_checkpoint=0.1) == 100  # about ten a run
    assert checkpoint_interval(t, 100, steps_per_checkpoint=30.0) == 0  # one would cost more than that
    assert checkpoint_interval(t, 9, steps_per_checkpoint=0.0) == 0
    slow = load_config(JOBS / "paper" / "gsm8k-cot-70b.yaml", ["cluster.storage_gib_per_s=0.25"])
    assert checkpoint_plan(slow, 69e9, 5000, 10.0)["seconds_each"] == pytest.approx(4 * plan["seconds_each"])
