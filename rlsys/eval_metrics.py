"""What the three model cards report, from scored samples (pure: no Ray, vLLM or torch).

Input: one list per prompt of its k scored samples, each a dict with the sample's `text`, its
`reward_<channel>` values (NaN when masked) and `valid`, plus the prompt's example fields under
`example`. Each function returns {metric: float}; a recipe's metrics appear when its channels
were computed.

Recipe A (EpisodeBench): Acc@1 (the first sample), avg@k (mean accuracy), Pass@k (any sample
right), JSON@k (share of samples whose answer parses as a JSON object), and transition timing:
for each turn whose current episode is known (the previous turn's reference in the same story:
*ours*, the rows do not carry it; a story's first turn is left out), a sample is *on time* when
its next_episode equals the reference, *too fast* when it leaves an episode the reference stays
in, *too slow* when it stays where the reference moves on, a *failure* otherwise (no valid
answer, or a move to a wrong episode).
Recipe B (POLARIS): judge score (SQ) and length adherence = story words / requested words, per
requested-length bucket (the card's 1-4k, 4-8k, 8-12k words, plus <1k for short requests), and
the slope of the mean score over the buckets' centres (score per 1k requested words).
Recipe C (QwenStoryteller2, text-only): structure-parse rate, cross-frame re-identification on
real and on synthetic sequences (its share of linked entities, unsigned), grounding share.
"""
from __future__ import annotations

import math
from typing import Any

from rewards.episodebench import parse_response
from rewards.judge_rubric import prompt_text
from rewards.polaris import target_word_count, word_count

LENGTH_BUCKETS = ((0, 1000, "<1k"), (1000, 4000, "1-4k"), (4000, 8000, "4-8k"), (8000, 12000, "8-12k"))


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else math.nan


def channel_means(groups: list[list[dict]], channels: list[str]) -> dict[str, float]:
    """Mean of every channel over the valid samples, and the masked share."""
    samples = [s for g in groups for s in g]
    out = {f"mean/{c}": _mean([s[f"reward_{c}"] for s in samples if s["valid"]]) for c in channels}
    out["masked_share"] = sum(not s["valid"] for s in samples) / max(len(samples), 1)
    return out


def _timing(sample: dict, current: str, reference: str) -> str:
    predicted = parse_response(sample["text"])
    if not predicted.schema_valid or predicted.next_episode is None:
        return "failure"
    got = predicted.next_episode
    if got == reference:
        return "on_time"
    if reference == current:
        return "too_fast"          # left an episode the reference stays in
    if got == current:
        return "too_slow"          # stayed where the reference moves on
    return "failure"               # moved, but to a wrong episode


def recipe_a_metrics(groups: list[list[dict]]) -> dict[str, float]:
    k = min((len(g) for g in groups), default=0)
    acc = [[float(s["reward_acc"]) for s in g] for g in groups]
    out = {"A/acc@1": _mean([a[0] for a in acc if a]), f"A/avg@{k}": _mean([x for a in acc for x in a]),
           f"A/pass@{k}": _mean([float(any(x == 1.0 for x in a)) for a in acc]),
           f"A/json@{k}": _mean([float(parse_response(s["text"]).parse_ok) for g in groups for s in g])}
    previous: dict[tuple, Any] = {}  # (story, turn) -> that turn's reference: the next turn's current episode
    for g in groups:
        ex = g[0]["example"]
        previous[(ex.get("story_id"), ex.get("turn_index"))] = ex.get("reference_next_episode")
    buckets = {"on_time": 0, "too_fast": 0, "too_slow": 0, "failure": 0}
    for g in groups:
        ex = g[0]["example"]
        turn = ex.get("turn_index")
        current = previous.get((ex.get("story_id"), turn - 1)) if isinstance(turn, int) else None
        if current is None:
            continue
        for s in g:
            buckets[_timing(s, str(current), str(ex.get("reference_next_episode")))] += 1
    total = sum(buckets.values())
    out.update({f"A/timing_{b}": n / total if total else math.nan for b, n in buckets.items()})
    return out


def _requested(ex: dict[str, Any]) -> int | None:
    t = ex.get("target_word_count")
    if isinstance(t, int) and not isinstance(t, bool) and t > 0:
        return t
    return target_word_count(prompt_text(ex.get("messages")))


def recipe_b_metrics(groups: list[list[dict]]) -> dict[str, float]:
    out: dict[str, float] = {}
    has_sq = any("reward_sq" in s for g in groups for s in g)
    if has_sq:
        out["B/judge_score"] = _mean([s["reward_sq"] for g in groups for s in g if s["valid"]])
    centres, means = [], []
    for lo, hi, name in LENGTH_BUCKETS:
        rows = [(s, t) for g in groups if (t := _requested(g[0]["example"])) and lo <= t < hi for s in g]
        if not rows:
            continue
        out[f"B/length_adherence_{name}"] = _mean([word_count(s["text"]) / t for s, t in rows])
        if has_sq:
            score = _mean([s["reward_sq"] for s, _ in rows if s["valid"]])
            out[f"B/judge_score_{name}"] = score
            if math.isfinite(score):
                centres.append((lo + hi) / 2000)
                means.append(score)
    if len(centres) >= 2:  # least-squares slope, score per 1k requested words
        cx, cy = sum(centres) / len(centres), sum(means) / len(means)
        out["B/score_slope_per_1k_words"] = sum((x - cx) * (y - cy) for x, y in zip(centres, means)) / \
            sum((x - cx) ** 2 for x in centres)
    return out


def recipe_c_metrics(groups: list[list[dict]]) -> dict[str, float]:
    samples = [s for g in groups for s in g]
    out = {"C/structure_rate": _mean([s["reward_st_struct"] for s in samples])}
    if samples and "reward_st_reid" in samples[0]:
        for kind, synthetic in (("real", False), ("synthetic", True)):
            rows = [abs(s["reward_st_reid"]) for s in samples if bool(s["example"].get("synthetic")) == synthetic]
            out[f"C/reid_links_{kind}"] = _mean(rows)
    if samples and "reward_st_ground" in samples[0]:
        out["C/grounding_share"] = _mean([s["reward_st_ground"] for s in samples])
    return out


def card_metrics(groups: list[list[dict]], channels: list[str]) -> dict[str, float]:
    """Every metric the scored channels allow (module docstring)."""
    out = channel_means(groups, channels)
    if "acc" in channels:
        out.update(recipe_a_metrics(groups))
    if {"sq", "len_pen", "blank", "rep"} & set(channels):
        out.update(recipe_b_metrics(groups))
    if "st_struct" in channels:
        out.update(recipe_c_metrics(groups))
    return out
