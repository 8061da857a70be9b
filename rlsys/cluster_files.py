"""One resource vocabulary for actors and clusters: what each actor of a run asks Ray for, what
each node type of a cluster file offers, and which asks no node type can satisfy.

Resources used by rlsys: `CPU`, `GPU` (learner ranks and rollout engines; reward actors are
CPU-only) and `judge_node` (the marker resource of the CPU-only judge worker group, asked for
by judge workers through the judge config's `workers.resources`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from rlsys.config import RunConfig


def actor_demands(cfg: RunConfig, judge_workers: dict[str, Any] | None = None) -> list[tuple[str, int, dict[str, float]]]:
    """(actor kind, how many, resources each) for a run; `judge_workers` is the judge config's
    `workers` section when the run uses a judge (its max_workers count)."""
    def res(cpu: float, gpu: float = 0.0, extra: dict | None = None) -> dict[str, float]:
        return {k: float(v) for k, v in {"CPU": cpu, "GPU": gpu, **(extra or {})}.items() if v}
    out = [("learner rank", cfg.learner.num_ranks, res(cfg.learner.num_cpus, cfg.learner.num_gpus)),
           ("rollout engine", cfg.rollout.num_actors, res(cfg.rollout.num_cpus, cfg.rollout.num_gpus)),
           ("reward actor", cfg.reward.num_actors, res(cfg.reward.num_cpus))]
    if judge_workers is not None:
        out.append(("judge worker", int(judge_workers.get("max_workers", 1)),
                    res(judge_workers.get("num_cpus", 0.25), 0.0, judge_workers.get("resources"))))
    return out


def launcher_node_types(doc: dict) -> dict[str, dict[str, float]]:
    """Node types of a Ray cluster-launcher YAML (`available_node_types.*.resources`)."""
    return {name: {k: float(v) for k, v in (spec.get("resources") or {}).items()}
            for name, spec in (doc.get("available_node_types") or {}).items()}


def _ray_start_resources(params: dict) -> dict[str, float]:
    out = {}
    if "num-cpus" in params:
        out["CPU"] = float(params["num-cpus"])
    if "num-gpus" in params:
        out["GPU"] = float(params["num-gpus"])
    if "resources" in params:
        # A JSON object in a string, as `ray start --resources` takes it; KubeRay's documented
        # form quotes it once more ('"{\"judge_node\": 1}"').
        value: Any = str(params["resources"])
        while isinstance(value, str):
            value = json.loads(value)
        out.update({k: float(v) for k, v in value.items()})
    return out


def rayjob_node_types(doc: dict) -> dict[str, dict[str, float]]:
    """Node types of a KubeRay RayJob (or RayCluster) manifest, from each group's rayStartParams."""
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    groups = {"head": spec["headGroupSpec"]}
    groups.update({g["groupName"]: g for g in spec.get("workerGroupSpecs", [])})
    return {name: _ray_start_resources(g.get("rayStartParams") or {}) for name, g in groups.items()}


def load_node_types(path: str | Path) -> dict[str, dict[str, float]]:
    doc = yaml.safe_load(Path(path).read_text())
    return rayjob_node_types(doc) if doc.get("kind") in ("RayJob", "RayCluster") else launcher_node_types(doc)


def unplaceable(demands: list[tuple[str, int, dict[str, float]]], node_types: dict[str, dict[str, float]]) -> list[str]:
    """The demands that no single node type can hold (one actor must fit on one node)."""
    bad = []
    for kind, _, need in demands:
        if not any(all(offer.get(k, 0.0) >= v for k, v in need.items()) for offer in node_types.values()):
            bad.append(f"{kind} asks {need}; node types offer {node_types}")
    return bad
