"""Cluster files and configs speak one resource vocabulary: every actor any shipped config asks
for (learner ranks, rollout engines, reward actors, judge workers) fits on some node type of
the cluster files it is meant for, and the KubeRay RayJob is well-formed as far as it can be
checked without Kubernetes."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rlsys.cluster_files import actor_demands, load_node_types, rayjob_node_types, unplaceable
from rlsys.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_FILES = sorted((ROOT / "cluster").glob("*.yaml"))
RUN_CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if not p.name.startswith("judge_"))
JUDGE_CONFIGS = sorted((ROOT / "configs").glob("judge_*.yaml"))
GPU_CLUSTERS = [ROOT / "cluster" / "ray_gpu_cluster.yaml", ROOT / "cluster" / "kuberay_rayjob.yaml"]


def _run_config(path: Path, tmp_path: Path):
    """A shipped config, with its model and data pointed at local stand-ins (they live on the
    cluster's storage, not here)."""
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "data.parquet").write_bytes(b"")
    return load_config(path, [f"model.path={tmp_path / 'model'}", f"data.path={tmp_path / 'data.parquet'}"])


def test_every_cluster_file_parses_with_node_types():
    assert {p.name for p in CLUSTER_FILES} >= {"ray_gpu_cluster.yaml", "judge_workers.yaml", "kuberay_rayjob.yaml"}
    for path in CLUSTER_FILES:
        types = load_node_types(path)
        assert types and all(isinstance(v, float) for t in types.values() for v in t.values()), path
        used = {k for t in types.values() for k in t}
        assert used <= {"CPU", "GPU", "judge_node"}, f"{path.name}: resource names outside the vocabulary: {used}"


@pytest.mark.parametrize("config", RUN_CONFIGS, ids=lambda p: p.name)
def test_every_actor_of_every_config_fits_its_cluster(config, tmp_path):
    from rlsys.judge import load_judge_config

    cfg = _run_config(config, tmp_path)
    judge = None
    if cfg.reward.judge:
        judge = load_judge_config(ROOT / cfg.reward.judge).workers.model_dump()
    demands = actor_demands(cfg, judge)
    # `rlsys train` on one machine starts a local head of cluster.num_cpus logical CPUs: every
    # actor must fit at once (a GPU recipe on one 8-GPU node too).
    total = sum(n * need.get("CPU", 0.0) for _, n, need in demands)
    assert total <= cfg.cluster.num_cpus, f"{config.name}: actors ask {total} CPUs of {cfg.cluster.num_cpus}"
    if any(need.get("GPU") for _, _, need in demands):
        for cluster in GPU_CLUSTERS:
            assert not unplaceable(demands, load_node_types(cluster)), cluster.name
    else:  # a CPU recipe
        assert not any(set(need) - {"CPU"} for _, _, need in demands)


@pytest.mark.parametrize("judge", JUDGE_CONFIGS, ids=lambda p: p.name)
def test_judge_workers_land_on_a_node_type(judge):
    from rlsys.judge import load_judge_config

    workers = load_judge_config(judge).workers.model_dump()
    demand = [("judge worker", workers["max_workers"], {"CPU": workers["num_cpus"], **workers["resources"]})]
    for cluster in GPU_CLUSTERS + [ROOT / "cluster" / "judge_workers.yaml"]:
        assert not unplaceable(demand, load_node_types(cluster)), (judge.name, cluster.name)


def test_unplaceable_names_the_mismatch():
    demand = [("judge worker", 2, {"CPU": 0.25, "judge": 0.01})]   # the old, mismatched name
    bad = unplaceable(demand, load_node_types(ROOT / "cluster" / "ray_gpu_cluster.yaml"))
    assert bad and "judge worker asks" in bad[0]


def test_kuberay_rayjob_manifest():
    doc = yaml.safe_load((ROOT / "cluster" / "kuberay_rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob" and doc["metadata"]["name"]
    spec = doc["spec"]
    words = spec["entrypoint"].split()
    assert words[:2] == ["rlsys", "train"] and (ROOT / words[2]).is_file()
    assert words[-2:] == ["--resume", "auto"] and any(w.startswith("train.output_dir=/shared/") for w in words)
    _run_config(ROOT / words[2], Path("/tmp"))  # the recipe it names loads
    types = rayjob_node_types(doc)
    assert types["head"] == {"CPU": 0.0} and types["judge-workers"]["judge_node"] == 1.0
    groups = {g["groupName"]: g for g in spec["rayClusterSpec"]["workerGroupSpecs"]}
    for name, g in groups.items():
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], name
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert float(limits.get("nvidia.com/gpu", 0)) == types[name].get("GPU", 0.0), name
        assert float(limits["cpu"]) == types[name]["CPU"], name
        mounts = {m["mountPath"] for c in g["template"]["spec"]["containers"] for m in c.get("volumeMounts", [])}
        assert name == "judge-workers" or "/shared" in mounts, f"{name}: learners/engines need the shared volume"
    text = (ROOT / "cluster" / "kuberay_rayjob.yaml").read_text()
    assert "secretKeyRef" in text and "API_KEY: " not in text   # keys from a Secret, never inline
