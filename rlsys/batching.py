"""From scored groups to learner batches (pure; no Ray).

A *sample* is a flat dict (one row of rollouts.parquet): prompt/response token ids, the
sampler's log-probs, the policy version that produced it, one `reward_<channel>` per channel,
and after `assign_advantages` its `advantage`.
"""
from __future__ import annotations

import math
import random
from collections import Counter
from typing import Any

import torch

from rewards.channels import active_channels
from rlsys.algorithms import ADVANTAGE_ESTIMATORS


# Group statistics (mean, std) need two rewards: a group with fewer valid samples is dropped.
MIN_VALID_PER_GROUP = 2


def group_is_usable(valid: list[bool]) -> bool:
    """Whether a group keeps enough valid (scored) samples for GRPO statistics."""
    return sum(bool(v) for v in valid) >= MIN_VALID_PER_GROUP


def mask_nonfinite(samples: list[dict], channels: list[str]) -> int:
    """Mask (valid=False, with a reason) every valid sample with a NaN/inf reward on an active
    channel, so that it never reaches a group statistic or the loss. Returns how many."""
    n = 0
    for s in samples:
        if not s.get("valid", True):
            continue
        bad = [c for c in channels if not _finite(s.get(f"reward_{c}"))]
        if bad:
            s["valid"], s["mask_reason"] = False, "non-finite reward: " + ", ".join(
                f"{c}={s.get(f'reward_{c}')!r}" for c in bad)
            n += 1
    return n


def _finite(x) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):  # None, a string...: no usable reward
        return False


def is_reference(sample: dict) -> bool:
    """An injected human reference (POLARIS HRI): trained on, never part of group statistics."""
    return bool(sample.get("is_reference", False))


def group_is_constant(group: list[dict], channels: list[str], threshold: float) -> bool:
    """True when every channel's population std over the group's valid policy samples is <=
    threshold: the group expresses no preference, so every advantage is ~0."""
    valid = [s for s in group if s.get("valid", True) and not is_reference(s)]
    for c in channels:
        x = [float(s[f"reward_{c}"]) for s in valid]
        mean = sum(x) / len(x)
        if math.sqrt(sum((v - mean) ** 2 for v in x) / len(x)) > threshold:
            return False
    return True


def screen_groups(groups: list[list[dict]], channels: list[str], *, filter_constant: bool = False,
                  std_threshold: float = 0.0) -> tuple[list[list[dict]], Counter]:
    """The one group-validity rule, applied to freshly scored groups, in order:
    non-finite rewards are masked; a group left with fewer than 2 valid policy samples (an
    injected reference does not count) is dropped (no statistics from one sample); optionally a zero-variance group is filtered (DAPO). Returns the
    kept groups and counts: masked_nonfinite, dropped_groups, filtered_groups."""
    counts: Counter = Counter()
    kept = []
    for g in groups:
        counts["masked_nonfinite"] += mask_nonfinite(g, channels)
        if not group_is_usable([s.get("valid", True) for s in g if not is_reference(s)]):
            counts["dropped_groups"] += 1
        elif filter_constant and group_is_constant(g, channels, std_threshold):
            counts["filtered_groups"] += 1
        else:
            kept.append(g)
    return kept, counts


def assign_advantages(groups: list[list[dict]], weights: dict[str, float], *, estimator: str = "grpo",
                      aggregation: str = "per_channel", eps: float = 1e-6, reference_weight: float = 1.0) -> None:
    """Write `advantage` and `reward` (weighted raw sum, for logging) into every sample, per group.

    Samples with `valid=False` (reward unavailable) stay out of the statistics and get 0. An
    injected reference (`is_reference`) stays out of the statistics too; its advantage is its
    reward scored against the policy samples' mean and std, times `reference_weight`.
    """
    channels = active_channels(weights)
    w = torch.tensor([weights[c] for c in channels], dtype=torch.float64)
    fn = ADVANTAGE_ESTIMATORS[estimator]
    for group in groups:
        r = torch.tensor([[s[f"reward_{c}"] if s.get("valid", True) else 0.0 for c in channels]
                          for s in group], dtype=torch.float64)
        valid = torch.tensor([bool(s.get("valid", True)) for s in group])
        policy = torch.tensor([not is_reference(s) for s in group])
        adv = fn(r, w, valid, eps=eps, aggregation=aggregation, in_stats=policy)
        for s, a, row in zip(group, adv.tolist(), (r * w).sum(-1).tolist()):
            if is_reference(s):
                a *= reference_weight
            if not math.isfinite(a):  # e.g. rewards so large their variance overflows
                s["valid"], s["mask_reason"], a = False, f"non-finite advantage {a!r}", 0.0
            s["advantage"] = a
            s["reward"] = row


def reference_weight(step: int, weight: float, warmup_steps: int) -> float:
    """POLARIS HRI: the reference's advantage weight, rising linearly from 0 (step 1, the first)
    to `weight` over `warmup_steps` steps (reached at step warmup_steps + 1)."""
    if warmup_steps <= 0:
        return weight
    return weight * min(1.0, max(0, step - 1) / warmup_steps)


def split_mini_batches(samples: list[dict], n: int, rng: random.Random) -> list[list[dict]]:
    """Split a step's samples into min(n, groups) mini-batches of whole groups (a group's
    samples share one prompt and one baseline), groups shuffled by `rng`, dealt so the
    mini-batches hold as equal a number of samples as whole groups allow."""
    by_group: dict = {}
    for s in samples:
        by_group.setdefault(s.get("group", s.get("prompt_uid")), []).append(s)
    groups = list(by_group.values())
    rng.shuffle(groups)
    parts: list[list[dict]] = [[] for _ in range(max(1, min(n, len(groups))))]
    for g in sorted(groups, key=len, reverse=True):  # stable: equal sizes keep the shuffled order
        min(parts, key=len).extend(g)
    return parts


def reward_metrics(groups: list[list[dict]], channels: list[str]) -> dict[str, float]:
    """Step means of each channel and of the weighted reward over valid policy samples; the
    same for injected references under reward_ref/ (only when there are any)."""
    every = [s for g in groups for s in g]
    out: dict[str, float] = {}
    policy = [s for s in every if not is_reference(s)]
    refs = [s for s in every if is_reference(s)]
    for prefix, rows in (("reward", policy), ("reward_ref", refs)):
        scored = [s for s in rows if s["valid"]]  # masked samples have no reward to average
        if prefix == "reward_ref" and not rows:
            continue
        n = max(len(scored), 1)
        out.update({f"{prefix}/{c}": sum(s[f"reward_{c}"] for s in scored) / n for c in channels})
        out[f"{prefix}/weighted"] = sum(s["reward"] for s in scored) / n
    if refs:
        out["reward_ref/advantage"] = sum(s["advantage"] for s in refs) / len(refs)
        out["reward_ref/masked"] = float(sum(not s["valid"] for s in refs))
    out["rollout/response_len"] = sum(len(s["token_ids"]) for s in policy) / max(len(policy), 1)
    out["rollout/masked_samples"] = float(sum(not s["valid"] for s in policy))
    return out


def split_for_ranks(samples: list[dict], world_size: int, keep_groups: bool = False) -> list[dict]:
    """Learner batches, one per rank, balanced by token count (longest first, to the lightest
    rank among those with the fewest sequences), carrying the global totals the loss needs.

    `keep_groups` (the learner's shared-prompt forward): a group's samples (same `group`, else
    same prompt tokens) go to one rank, so its prompt is encoded once, whenever there are at
    least as many groups as ranks (with fewer, rows are spread one by one so no rank idles)."""
    def tokens(i: int) -> int:
        return len(samples[i]["prompt_token_ids"]) + len(samples[i]["token_ids"])

    by_group: dict[Any, list[int]] = {}
    for i, s in enumerate(samples):
        by_group.setdefault(s.get("group", tuple(s["prompt_token_ids"])), []).append(i)
    units = list(by_group.values()) if keep_groups and len(by_group) >= world_size \
        else [[i] for i in range(len(samples))]
    units.sort(key=lambda u: -sum(tokens(i) for i in u))
    buckets: list[list[int]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for u in units:
        fewest = min(len(b) for b in buckets)
        r = min((r for r in range(world_size) if len(buckets[r]) == fewest), key=lambda r: load[r])
        buckets[r].extend(u)
        load[r] += sum(tokens(i) for i in u)
    global_tokens = sum(len(s["token_ids"]) for s in samples)
    batches = []
    for b in buckets:
        rows = [samples[i] for i in b]
        batches.append({
            "input_ids": [s["prompt_token_ids"] + s["token_ids"] for s in rows],
            "prompt_lens": [len(s["prompt_token_ids"]) for s in rows],
            "advantages": [float(s["advantage"]) for s in rows],
            "behaviour_logprobs": [s["logprobs"] for s in rows],
            "global_tokens": global_tokens,
            "global_sequences": len(samples),
        })
    return batches


def build_pairs(groups: list[list[dict]], weights: dict[str, float], min_margin: float = 0.0
                ) -> tuple[list[tuple[dict, dict]], Counter]:
    """Preference pairs for DPO: per group, its best against its worst valid sample by weighted
    reward (sum of weight * raw channel value; first sample wins a tie for either end). A group
    whose two ends differ by `min_margin` or less makes no pair (counted: tied_groups); each
    sample gets `reward` (the weighted sum), and the pair's two samples `pair` and `chosen`."""
    channels = active_channels(weights)
    pairs: list[tuple[dict, dict]] = []
    counts: Counter = Counter()
    for g in groups:
        valid = [s for s in g if s.get("valid", True)]
        for s in g:
            s["reward"] = sum(weights[c] * s[f"reward_{c}"] for c in channels) if s.get("valid", True) \
                else float("nan")
        if not group_is_usable([s.get("valid", True) for s in g]):
            counts["dropped_groups"] += 1
            continue
        best = max(valid, key=lambda s: s["reward"])
        worst = min(valid, key=lambda s: s["reward"])
        if not best["reward"] - worst["reward"] > min_margin:
            counts["tied_groups"] += 1
            continue
        best.update(pair=len(pairs), chosen=True)
        worst.update(pair=len(pairs), chosen=False)
        pairs.append((best, worst))
    return pairs, counts


def split_pairs_for_ranks(pairs: list[tuple[dict, dict]], world_size: int) -> list[dict]:
    """Learner batches of pairs, one per rank: whole pairs, balanced by token count like
    `split_for_ranks`; each batch lists chosen then rejected for every pair (the learner keeps
    that order) and carries the global pair count the loss divides by."""
    def tokens(p: tuple[dict, dict]) -> int:
        return sum(len(s["prompt_token_ids"]) + len(s["token_ids"]) for s in p)

    buckets: list[list[tuple[dict, dict]]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for p in sorted(pairs, key=lambda p: -tokens(p)):
        fewest = min(len(b) for b in buckets)
        r = min((r for r in range(world_size) if len(buckets[r]) == fewest), key=lambda r: load[r])
        buckets[r].append(p)
        load[r] += tokens(p)
    out = []
    for b in buckets:
        rows = [s for p in b for s in p]
        out.append({"input_ids": [s["prompt_token_ids"] + s["token_ids"] for s in rows],
                    "prompt_lens": [len(s["prompt_token_ids"]) for s in rows],
                    "advantages": [0.0] * len(rows), "global_pairs": len(pairs)})
    return out
