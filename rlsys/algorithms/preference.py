"""Preference losses on pairs (chosen, rejected): per-sequence summed log-probs in, loss out.

A pair's log-prob under a model is the sum of its response tokens' log-probs. Plain tensors,
no trainer plumbing; the learner sums micro-batch losses over the step's pairs (`denominator`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rlsys.algorithms.registry import register_preference_loss


@register_preference_loss("dpo")
def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             *, beta: float = 0.1, label_smoothing: float = 0.0, denominator: float | None = None
             ) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO (Rafailov et al. 2023): -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), with
    conservative label smoothing eps: (1 - eps) * that + eps * -log sigmoid(-logits).

    Inputs are [P] summed log-probs of P pairs. Returns the loss summed over the pairs divided by
    `denominator` (the step's pair count over every rank; default P) and sums for the metrics:
    implicit rewards beta * (pi - ref) of chosen and rejected, their margin, and how many pairs
    already rank the chosen one higher (accuracy)."""
    chosen_reward = beta * (chosen - ref_chosen)
    rejected_reward = beta * (rejected - ref_rejected)
    logits = chosen_reward - rejected_reward
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    n = denominator if denominator is not None else max(int(chosen.numel()), 1)
    loss = losses.sum() / n
    with torch.no_grad():
        met = {"loss_sum": float(losses.sum()), "pairs": float(chosen.numel()),
               "accuracy_sum": float((logits > 0).float().sum()), "margin_sum": float(logits.sum()),
               "chosen_reward_sum": float(chosen_reward.sum()), "rejected_reward_sum": float(rejected_reward.sum())}
    return loss, met
