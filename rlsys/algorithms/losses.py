"""Policy losses on per-token tensors of shape [B, T] (response positions only via `mask`).

`logprobs` carry gradient; `old_logprobs` are the policy's log-probs recomputed by the learner
before the update (not the sampler's, which differ numerically); `ref_logprobs` come from the
frozen reference model when a KL penalty is used.
"""
from __future__ import annotations

import torch

from rlsys.algorithms.registry import register_loss


def masked_mean(x: torch.Tensor, mask: torch.Tensor, agg: str = "token_mean",
                denominator: float | None = None) -> torch.Tensor:
    """token_mean: mean over every unmasked token of the batch (long answers weigh more);
    seq_mean_token_mean: mean per sequence first, then over sequences.

    `denominator` replaces the local count (tokens, or sequences) when x is one micro-batch of a
    larger batch: the learner passes the whole step's count so that summing micro-batch losses
    gives exactly the batch's mean, however the batch was split over ranks and micro-batches.
    """
    m = mask.to(x.dtype)
    if agg == "token_mean":
        return (x * m).sum() / (denominator if denominator is not None else m.sum().clamp_min(1.0))
    if agg == "seq_mean_token_mean":
        per_seq = (x * m).sum(-1) / m.sum(-1).clamp_min(1.0)
        has = (m.sum(-1) > 0).to(x.dtype)
        return (per_seq * has).sum() / (denominator if denominator is not None else has.sum().clamp_min(1.0))
    raise ValueError(f"unknown loss aggregation {agg!r}")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi."""
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio ** 2
    if estimator == "k3":
        # Clamp before exp: a single runaway token must not turn the loss into inf.
        log_ratio = log_ratio.clamp(-20.0, 20.0)
        return torch.exp(log_ratio) - log_ratio - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r}")


def truncated_is_weights(old_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor,
                         has_behaviour: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated importance sampling weights min(pi_old / mu, cap) per token, where mu is the
    policy that really sampled (the engine's log-probs: a stale policy version under
    `algorithm.max_staleness`, and numerically another kernel even when current) and pi_old the
    learner's log-probs before the update. Tokens without sampler log-probs (a teacher-forced
    human reference) get weight 1. Returns (weights, truncated: bool mask of capped tokens)."""
    log_w = (old_logprobs - behaviour_logprobs).clamp(-20.0, 20.0)
    raw = torch.exp(log_w)
    truncated = (raw > cap) & has_behaviour
    w = torch.where(has_behaviour, raw.clamp(max=cap), torch.ones_like(raw))
    return w.detach(), truncated


@register_loss("grpo_clip")
def grpo_clip_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                   mask: torch.Tensor, ref_logprobs: torch.Tensor | None = None, *, clip_low: float = 0.2,
                   clip_high: float = 0.28, kl_coef: float = 0.0, kl_estimator: str = "k3",
                   loss_agg: str = "token_mean", denominator: float | None = None,
                   is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clipped surrogate with decoupled bounds [1-clip_low, 1+clip_high] and a KL penalty.

    `advantages` is per sequence ([B]) or per token ([B, T]). `denominator`: see masked_mean.
    `is_weights` ([B, T], no gradient): per-token importance weights on the policy-gradient term
    (truncated importance sampling, `truncated_is_weights`); the KL term is not reweighted.
    Returns (loss, metrics); metrics are local to this call.
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logprobs)
    ratio = torch.exp((logprobs - old_logprobs).clamp(-20.0, 20.0))
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * advantages
    pg = -torch.minimum(unclipped, clipped)
    if is_weights is not None:
        pg = pg * is_weights.detach()
    loss = masked_mean(pg, mask, loss_agg, denominator)
    metrics = {
        "pg_loss": float(loss.detach()),
        "clip_frac": float(masked_mean((clipped < unclipped).float(), mask, "token_mean")),
        "ratio_mean": float(masked_mean(ratio.detach(), mask, "token_mean")),
    }
    if ref_logprobs is not None and kl_coef > 0:
        kl = masked_mean(kl_penalty(logprobs, ref_logprobs, kl_estimator), mask, loss_agg, denominator)
        loss = loss + kl_coef * kl
        metrics["kl"] = float(kl.detach())
    metrics["loss"] = float(loss.detach())
    return loss, metrics
