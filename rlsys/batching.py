"""From scored groups to learner batches (pure; no Ray).

A *sample* is a flat dict (one row of rollouts.parquet): prompt/response token ids, the
sampler's log-probs, the policy version that produced it, one `reward_<channel>` per channel,
and after `assign_advantages` its `advantage`.
"""
from __future__ import annotations

import torch

from rlsys.algorithms import ADVANTAGE_ESTIMATORS


def assign_advantages(groups: list[list[dict]], weights: dict[str, float], *, estimator: str = "grpo",
                      aggregation: str = "per_channel", eps: float = 1e-6) -> None:
    """Write `advantage` and `reward` (weighted raw sum, for logging) into every sample, per group.

    Samples with `valid=False` (reward unavailable) stay out of the statistics and get 0.
    """
    channels = [c for c, w in weights.items() if w != 0]
    w = torch.tensor([weights[c] for c in channels], dtype=torch.float64)
    fn = ADVANTAGE_ESTIMATORS[estimator]
    for group in groups:
        r = torch.tensor([[s[f"reward_{c}"] if s.get("valid", True) else 0.0 for c in channels]
                          for s in group], dtype=torch.float64)
        valid = torch.tensor([bool(s.get("valid", True)) for s in group])
        adv = fn(r, w, valid, eps=eps, aggregation=aggregation)
        for s, a, row in zip(group, adv.tolist(), (r * w).sum(-1).tolist()):
            s["advantage"] = a
            s["reward"] = row


def split_for_ranks(samples: list[dict], world_size: int) -> list[dict]:
    """Learner batches, one per rank, balanced by token count (longest first, to the lightest
    rank among those with the fewest sequences), carrying the global totals the loss needs."""
    order = sorted(range(len(samples)), key=lambda i: -(len(samples[i]["prompt_token_ids"]) + len(samples[i]["token_ids"])))
    buckets: list[list[int]] = [[] for _ in range(world_size)]
    tokens = [0] * world_size
    for i in order:
        fewest = min(len(b) for b in buckets)
        r = min((r for r in range(world_size) if len(buckets[r]) == fewest), key=lambda r: tokens[r])
        buckets[r].append(i)
        tokens[r] += len(samples[i]["prompt_token_ids"]) + len(samples[i]["token_ids"])
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
