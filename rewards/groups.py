"""Per-group reward channels for a recipe: the rule channels per sample plus the group-level
channel (recipe A: DPP diversity; recipe B: the judge's SQ, with its mask). Pure: the embedding
model and the judge's verdicts are passed in, nothing here imports Ray, vLLM or HTTP."""
from __future__ import annotations

from typing import Sequence

from rewards.diversity import Encoder, dpp_diversity
from rewards.episodebench import score_episodebench
from rewards.polaris import polaris_rule_channels


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


# Group statistics (mean, std) need two rewards; the driver drops groups with fewer valid samples.
MIN_VALID_PER_GROUP = 2


def group_is_usable(valid: Sequence[bool]) -> bool:
    """Whether a group keeps enough scored samples for GRPO statistics (the driver's drop rule)."""
    return sum(bool(v) for v in valid) >= MIN_VALID_PER_GROUP


def polaris_group_rewards(texts: Sequence[str], prompt: str | list[dict], judge_results: Sequence[dict] | None,
                          *, channels: Sequence[str], target: int | None = None) -> dict[str, list]:
    """Raw rewards of one recipe-B group plus its mask: ``{channel: [...], "valid": [...],
    "mask_reason": [...]}`` for ``channels`` (a subset of sq, rep, len_pen, blank).

    ``judge_results`` are ``JudgeScorer.score_groups`` results for this group, one per text (None
    when sq is not computed). ``sq`` is the judge's SQ (overall/100). A sample the judge masked is
    ``valid=False`` with the judge's reason and sq 0.0 -- a placeholder, never used: invalid samples
    stay out of group statistics and the loss. Its rule channels keep their real values (logged).
    """
    if judge_results is not None and len(judge_results) != len(texts):
        raise ValueError(f"{len(judge_results)} judge results for {len(texts)} samples")
    if "sq" in channels and judge_results is None:
        raise ValueError("the sq channel needs judge results")
    verdicts: Sequence[dict | None] = judge_results if judge_results is not None else [None] * len(texts)
    masked = [bool(v and v["masked"]) for v in verdicts]
    rule = [polaris_rule_channels(t, prompt, target) for t in texts]
    out: dict[str, list] = {}
    for c in channels:
        out[c] = ([0.0 if m else float(v["score"]) for m, v in zip(masked, verdicts)] if c == "sq"
                  else [r[c] for r in rule])
    out["valid"] = [not m for m in masked]
    out["mask_reason"] = [v["reason"] if m else None for m, v in zip(masked, verdicts)]
    return out
