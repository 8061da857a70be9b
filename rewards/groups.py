"""Per-group reward channels for a recipe: the rule channels per sample plus the group-level
diversity channel. Pure: the embedding model is passed in, nothing here imports Ray or vLLM."""
from __future__ import annotations

from typing import Sequence

from rewards.diversity import Encoder, dpp_diversity
from rewards.episodebench import score_episodebench


def episodebench_group_rewards(texts: Sequence[str], reference_next_episode: str, *,
                               channels: Sequence[str], l_min: int, l_max: int, sigma: float,
                               strict: bool, encoder: Encoder | None = None,
                               eta: float = 1e-2) -> dict[str, list[float]]:
    """Raw (un-normalised) rewards of one group: {channel: [value per sample]} for `channels`
    (a subset of fmt, acc, len, div). div needs `encoder` and compares the samples with each other."""
    rule = [score_episodebench(t, reference_next_episode, l_min=l_min, l_max=l_max, sigma=sigma, strict=strict)
            for t in texts]
    out = {c: [r[c] for r in rule] for c in channels if c != "div"}
    if "div" in channels:
        if encoder is None:
            raise ValueError("the div channel needs an embedding model")
        out["div"] = dpp_diversity(list(texts), encoder, eta)
    return out
