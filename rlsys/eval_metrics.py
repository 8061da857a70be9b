"""What the three model cards report, from scored samples (pure: no Ray, vLLM or torch).

Input: one list per prompt of its k scored samples, each a dict with the sample's `text`, its
`reward_<channel>` values (NaN when masked) and `valid`, plus the prompt's example fields under
`example` (`timing_metrics` alone takes the episode simulator's outcomes instead). Each function
returns {metric: float}; a recipe's metrics appear when its channels were computed.

Recipe A (EpisodeBench): Acc@1 (the first sample), avg@k (mean accuracy), Pass@k (any sample
right), JSON@k (share of samples whose answer parses as a JSON object), and transition timing
(`timing_metrics`) over multi-turn episode rollouts (`rlsys.eval_episodes`, where the model's
own answers feed the next prompt; single prompts from the data cannot time a transition): with
budget T, the first round r at which the model leaves the episode, bucketed by r/T as the card
does (`timing_bucket`, the one definition of the thresholds).
Recipe B (POLARIS): judge score (SQ) and length adherence = story words / requested words, per
requested-length bucket (the card's 1-4k, 4-8k, 8-12k words, plus <1k for short requests), and
the slope of the mean score over the buckets' centres (score per 1k requested words).
Recipe C (QwenStoryteller2, text-only): structure-parse rate, cross-frame re-identification on
real and on synthetic sequences (its share of linked entities, unsigned), grounding share.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

from rewards.episodebench import parse_response
from rewards.judge_rubric import prompt_text
from rewards.polaris import target_word_count, word_count

if TYPE_CHECKING:
    from rlsys.eval_episodes import EpisodeOutcome

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


TIMING_BUCKETS = ("too_fast", "on_time", "too_slow", "failure")
# Bookkeeping counts among the timing metrics (not shares: left out of the bar chart).
TIMING_COUNTS = ("A/timing_episodes", "A/timing_skipped_episodes", "A/timing_answers", "A/timing_parse_failures")


def timing_bucket(advanced_round: int | None, budget: int) -> str:
    """The card's bucket for a first advance at round r under budget T, by r/T: < 80 % too fast,
    80-100 % on time, 100-150 % too slow, > 150 % or never (None) failure. The card's ranges
    share their edges; *ours*: exactly 80 % and exactly 100 % are on time (round T is the
    budget's last round, where the data's reference moves on) and exactly 150 % is too slow.
    Compared in integers (5r < 4T, r <= T, 2r <= 3T), so no edge depends on float rounding."""
    if advanced_round is None:
        return "failure"
    if 5 * advanced_round < 4 * budget:
        return "too_fast"
    if advanced_round <= budget:
        return "on_time"
    if 2 * advanced_round <= 3 * budget:
        return "too_slow"
    return "failure"


def timing_metrics(outcomes: Sequence[EpisodeOutcome]) -> dict[str, float]:
    """Recipe A's transition timing from simulated episodes (`rlsys.eval_episodes`).

    `A/timing_<bucket>`: share of timed episodes per bucket (they sum to 1; a move to an episode
    that is not a trigger target of the current one is a failure whatever its round);
    `A/timing_wrong_target`: the share of those wrong moves (part of the failure share);
    `A/timing_first_advance_over_T`: mean r/T over the episodes that advanced at all;
    counts: `A/timing_episodes` (timed), `A/timing_skipped_episodes` (a prompt the engine could
    not take), `A/timing_answers` (answers generated), `A/timing_parse_failures` (answers with
    no schema-valid next_episode, each read as "did not advance")."""
    timed = [o for o in outcomes if not o.skipped]
    n = len(timed)
    buckets = {b: 0 for b in TIMING_BUCKETS}
    for o in timed:
        buckets["failure" if o.wrong_target else timing_bucket(o.advanced_round, o.budget)] += 1
    out = {f"A/timing_{b}": c / n if n else math.nan for b, c in buckets.items()}
    out["A/timing_wrong_target"] = sum(o.wrong_target for o in timed) / n if n else math.nan
    out["A/timing_first_advance_over_T"] = _mean([o.advanced_round / o.budget for o in timed
                                                  if o.advanced_round is not None])
    out.update({"A/timing_episodes": float(n), "A/timing_skipped_episodes": float(len(outcomes) - n),
                "A/timing_answers": float(sum(o.answers for o in outcomes)),
                "A/timing_parse_failures": float(sum(o.parse_failures for o in outcomes))})
    return out


def recipe_a_metrics(groups: list[list[dict]]) -> dict[str, float]:
    k = min((len(g) for g in groups), default=0)
    acc = [[float(s["reward_acc"]) for s in g] for g in groups]
    return {"A/acc@1": _mean([a[0] for a in acc if a]), f"A/avg@{k}": _mean([x for a in acc for x in a]),
            f"A/pass@{k}": _mean([float(any(x == 1.0 for x in a)) for a in acc]),
            f"A/json@{k}": _mean([float(parse_response(s["text"]).parse_ok) for g in groups for s in g])}


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
