"""clusters/: the launcher YAML passes Ray's own schema; the KubeRay manifests hold together."""

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTERS = ROOT / "clusters"
PINNED = re.compile(r"^[\w./-]+:\d+\.\d+\.\d+-ray2\.60\.0-cu\d+$")  # a version tag, never :latest


def _walk(node, key):
    """Every value stored under `key`, at any depth."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _walk(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v, key)


def test_launcher_config_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTERS / "aws-70b.yaml").read_text())
    validate_config(prepare_config(config))  # raises on any schema error


def test_launcher_config_is_locked_down_and_pinned():
    c = yaml.safe_load((CLUSTERS / "aws-70b.yaml").read_text())
    types = c["available_node_types"]
    assert "GPU" not in types[c["head_node_type"]]["resources"]  # CPU-only head
    gpu = [t for t in types.values() if t["resources"].get("GPU")]
    assert gpu and all(t["min_workers"] == 0 < t["max_workers"] for t in gpu)
    assert PINNED.match(c["docker"]["image"])
    assert c["setup_commands"] == []  # no launcher-default pip install of another Ray
    for cmd in c["head_start_ray_commands"][1:] + c["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token" in cmd
    assert "--dashboard-host=127.0.0.1" in c["head_start_ray_commands"][1]
    ranges = [r["CidrIp"] for p in c["provider"]["security_group"]["IpPermissions"] for r in p["IpRanges"]]
    assert "0.0.0.0/0" not in ranges
    assert all(p["FromPort"] != 8265 for p in c["provider"]["security_group"]["IpPermissions"])


MANIFESTS = [("raycluster-70b.yaml", "RayCluster"), ("rayjob-last-letter-70b.yaml", "RayJob"),
             ("rayservice-70b.yaml", "RayService")]  # fmt: skip


def _cluster_spec(m: dict) -> dict:
    return {"RayCluster": lambda: m["spec"], "RayJob": lambda: m["spec"]["rayClusterSpec"],
            "RayService": lambda: m["spec"]["rayClusterConfig"]}[m["kind"]]()  # fmt: skip


@pytest.mark.parametrize("name, kind", MANIFESTS)
def test_kuberay_manifests(name, kind):
    m = yaml.safe_load((CLUSTERS / "kuberay" / name).read_text())
    assert m["apiVersion"] == "ray.io/v1" and m["kind"] == kind
    spec = _cluster_spec(m)
    assert spec["rayVersion"] == "2.60.0" and spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"  # the dashboard is not exposed outside the cluster
    head_limits = head["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in head_limits
    (workers,) = spec["workerGroupSpecs"]
    worker = workers["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "8" and workers["minReplicas"] == 0 < workers["maxReplicas"]
    images = set(_walk(m, "image"))
    assert len(images) == 1 and PINNED.match(images.pop())
    for env in _walk(m, "env"):
        names = {e["name"]: e for e in env}
        assert names["RAY_AUTH_MODE"]["value"] == "token"
        assert "secretKeyRef" in names["RAY_AUTH_TOKEN"]["valueFrom"]  # from a Secret, never inline
    if kind == "RayJob":
        entry = m["spec"]["entrypoint"].split()
        assert entry[:4] == ["python", "-m", "s2d_ray.cli", "run"]
        assert (ROOT / entry[4]).is_file()  # a job file the image carries (clusters/Dockerfile copies the repo)


def test_the_rayservice_serves_s2ds_application_with_a_key_from_a_secret():
    import importlib

    m = yaml.safe_load((CLUSTERS / "kuberay" / "rayservice-70b.yaml").read_text())
    config = yaml.safe_load(m["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    module, _, attr = app["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), attr))  # the builder `s2d serve` itself uses
    assert all(d.startswith("/opt/s2d-ray/runs/") for d in app["args"]["run_dirs"])  # on the runs volume
    head = m["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"
    (container,) = head["template"]["spec"]["containers"]
    assert {"containerPort": 8000, "name": "serve"} in container["ports"]
    key = {e["name"]: e for e in container["env"]}["S2D_API_KEY"]
    assert "secretKeyRef" in key["valueFrom"]  # never inline


def test_the_cluster_jobs_match_the_declared_cluster():
    from s2d_ray.config import load_config

    c = yaml.safe_load((CLUSTERS / "aws-70b.yaml").read_text())
    gpu_type = next(t for t in c["available_node_types"].values() if t["resources"].get("GPU"))
    for job in sorted((ROOT / "jobs" / "paper").glob("*.yaml")):
        cfg = load_config(job)
        assert cfg.cluster.gpus_per_node == gpu_type["resources"]["GPU"], job.name
        assert cfg.cluster.max_nodes == gpu_type["max_workers"], job.name


def test_every_aws_node_mounts_the_shared_file_system_into_its_container():
    c = yaml.safe_load((CLUSTERS / "aws-70b.yaml").read_text())
    mounts = " ".join(c["initialization_commands"])  # on every node's host, head and workers
    assert "mount -t lustre" in mounts and "flock" in mounts and " /fsx" in mounts
    assert "-v /fsx:/fsx" in c["docker"]["run_options"]
    for job in sorted((ROOT / "jobs" / "paper").glob("*.yaml")):
        text = job.read_text()
        assert "/fsx/" in text or "submit" not in text, job.name  # the jobs' own recipes use the shared mount


@pytest.mark.parametrize("name", [name for name, _ in MANIFESTS])
def test_kuberay_pods_mount_readwritemany_volumes_and_request_ephemeral_storage(name):
    claims = {d["metadata"]["name"]: d for d in yaml.safe_load_all((CLUSTERS / "kuberay" / "storage.yaml").read_text())}
    assert all(d["kind"] == "PersistentVolumeClaim" and d["spec"]["accessModes"] == ["ReadWriteMany"] for d in claims.values())
    m = yaml.safe_load((CLUSTERS / "kuberay" / name).read_text())
    spec = _cluster_spec(m)
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        (container,) = pod["containers"]
        mounted = {v["name"]: v["mountPath"] for v in container["volumeMounts"]}
        assert volumes["runs"]["persistentVolumeClaim"]["claimName"] in claims  # declared, ReadWriteMany
        assert mounted["runs"] == "/opt/s2d-ray/runs"
        for resources in (container["resources"]["requests"], container["resources"].get("limits", {})):
            assert "ephemeral-storage" in resources  # Ray's /tmp (logs, spilling); checkpoints go to the volume
    if m["kind"] == "RayJob":
        assert "--out /opt/s2d-ray/runs/" in m["spec"]["entrypoint"]  # on the shared volume
