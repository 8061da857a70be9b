"""Group-relative advantages (GRPO) over several reward channels.

Input is one group: `rewards[g, c]` for G samples and C channels, `weights[c]`, and a boolean
`valid[g]` (a sample whose reward could not be computed, e.g. a masked judge call, is excluded
from the group statistics and gets advantage 0 — never a made-up score).
"""
from __future__ import annotations

import torch

from rlsys.algorithms.registry import register_advantage


def group_zscore(x: torch.Tensor, valid: torch.Tensor, eps: float, in_stats: torch.Tensor | None = None) -> torch.Tensor:
    """(x - mean) / (std + eps) with mean and std over the `in_stats` entries of dim 0 (default:
    the valid ones); 0 where invalid. A valid row outside the statistics (POLARIS's injected
    human reference) is scored against the others' mean and std.

    A column that is constant over the valid samples carries no preference and yields 0, not NaN
    (its std is 0 and its deviation is exactly 0). std is the population std (unbiased=False), so
    a group of 2 gives ±1 rather than ±0.71.
    """
    shape = (-1, *([1] * (x.dim() - 1)))
    v = valid.to(x.dtype).reshape(shape)
    s = (valid if in_stats is None else in_stats & valid).to(x.dtype).reshape(shape)
    n = s.sum(0).clamp_min(1.0)
    mean = (x * s).sum(0) / n
    var = (((x - mean) ** 2) * s).sum(0) / n
    return (x - mean) / (var.sqrt() + eps) * v


@register_advantage("grpo")
def grpo_advantages(rewards: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor | None = None,
                    *, eps: float = 1e-6, aggregation: str = "per_channel",
                    in_stats: torch.Tensor | None = None) -> torch.Tensor:
    """Advantage of each sample of a group.

    per_channel (recipe A card): A = sum_c w_c * zscore(r[:, c]).
    sum_then_norm (public-code variant): A = zscore(sum_c w_c * r[:, c]).
    `in_stats` (default: `valid`) picks the rows whose rewards make the mean and std; fewer than
    2 valid such rows give every row 0.
    """
    if rewards.dim() == 1:
        rewards = rewards[:, None]
    weights = weights.to(rewards.dtype)
    if valid is None:
        valid = torch.ones(rewards.shape[0], dtype=torch.bool)
    if int((valid if in_stats is None else valid & in_stats).sum()) < 2:
        return torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    if aggregation == "per_channel":
        return (group_zscore(rewards, valid, eps, in_stats) * weights).sum(-1)
    if aggregation == "sum_then_norm":
        return group_zscore((rewards * weights).sum(-1), valid, eps, in_stats)
    raise ValueError(f"unknown aggregation {aggregation!r} (per_channel or sum_then_norm)")


@register_advantage("reinforce_mean")
def mean_baseline_advantages(rewards: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor | None = None,
                             *, eps: float = 1e-6, aggregation: str = "per_channel",
                             in_stats: torch.Tensor | None = None) -> torch.Tensor:
    """Dr.GRPO-style: subtract the group mean (over `in_stats`, default `valid`) of the weighted
    reward, no std scaling."""
    if rewards.dim() == 1:
        rewards = rewards[:, None]
    total = (rewards * weights.to(rewards.dtype)).sum(-1)
    if valid is None:
        valid = torch.ones_like(total, dtype=torch.bool)
    stats = valid if in_stats is None else valid & in_stats
    if int(stats.sum()) < 2:
        return torch.zeros_like(total)
    mean = total[stats].mean()
    return torch.where(valid, total - mean, torch.zeros_like(total))
