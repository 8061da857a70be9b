"""Per-step learner metrics, accumulated per micro-batch and reduced over ranks in two
collectives (one SUM, one MAX), so every rank returns the same numbers."""
from __future__ import annotations

import resource
import time

import torch
import torch.distributed as dist

from learners.microbatches import MicroBatch

# Summed over ranks. loss/pg/kl arrive already divided by the global denominator (their sum
# over micro-batches and ranks is the step's loss); the *_w entries are token-weighted sums.
_SUM_KEYS = ("loss", "pg_loss", "kl", "clip_w", "ratio_w", "update_tokens", "entropy_w", "entropy_tokens",
             "mismatch_sum", "mismatch_n", "grad_norm", "optimizer_steps", "token_slots", "encoded_tokens",
             "sequence_tokens", "tis_w", "tis_truncated", "tis_tokens")
# Max over ranks.
_MAX_KEYS = ("mismatch_max", "micro_batches", "seconds", "peak_rss_gib")


class StepStats:
    def __init__(self):
        self.sums = dict.fromkeys(_SUM_KEYS, 0.0)
        self.maxes = dict.fromkeys(_MAX_KEYS, 0.0)
        self.times: dict[str, float] = {}
        self._t = time.perf_counter()
        self.has_kl = False

    def mark(self, key: str) -> None:
        """Record the seconds since the previous mark under `key`."""
        now = time.perf_counter()
        self.times[key] = now - self._t
        self._t = now

    def add_old_pass(self, m: MicroBatch, logp: torch.Tensor, entropy: torch.Tensor) -> None:
        self.sums["entropy_w"] += float((entropy * m.loss_mask).sum())
        self.sums["entropy_tokens"] += m.n_tokens
        if m.behaviour is not None:
            diff = (logp - m.behaviour).abs()[m.behaviour_mask]
            self.sums["mismatch_sum"] += float(diff.sum())
            self.sums["mismatch_n"] += diff.numel()
            if diff.numel():
                self.maxes["mismatch_max"] = max(self.maxes["mismatch_max"], float(diff.max()))

    def add_layout(self, mbs: list[MicroBatch]) -> None:
        """What one pass over these micro-batches computes: token slots (padding included), real
        tokens encoded, and the tokens of the sequences themselves (what a per-sample forward
        would encode)."""
        for m in mbs:
            self.sums["token_slots"] += m.token_slots
            self.sums["encoded_tokens"] += m.encoded_tokens
            self.sums["sequence_tokens"] += int(m.attention_mask.sum()) if m.n_real else 0

    def add_tis(self, m: MicroBatch, weights: torch.Tensor, truncated: torch.Tensor) -> None:
        """Truncated-IS statistics over the loss tokens that have sampler log-probs."""
        sel = (m.loss_mask > 0) & m.behaviour_mask
        self.sums["tis_w"] += float(weights[sel].sum())
        self.sums["tis_truncated"] += float(truncated[sel].sum())
        self.sums["tis_tokens"] += int(sel.sum())

    def add_micro_batch(self, met: dict[str, float], n_tokens: int) -> None:
        for k in ("loss", "pg_loss", "kl"):
            self.sums[k] += met.get(k, 0.0)
        self.has_kl = self.has_kl or "kl" in met
        self.sums["clip_w"] += met["clip_frac"] * n_tokens
        self.sums["ratio_w"] += met["ratio_mean"] * n_tokens
        self.sums["update_tokens"] += n_tokens

    def add_optimizer_step(self, norm: float | torch.Tensor | None) -> None:
        # DeepSpeed's norm is already global (same on every rank): divide the SUM by W later.
        # None if DeepSpeed kept no norm (ZeRO-0 in fp32 unless engine_setup.keep_clip_norm).
        self.sums["grad_norm"] += float(norm) if norm is not None else float("nan")
        self.sums["optimizer_steps"] += 1

    def reduce(self, g_tokens: float, g_seqs: float, n_micro: int, seconds: float) -> dict[str, float]:
        world = dist.get_world_size()
        self.maxes.update(micro_batches=float(n_micro), seconds=seconds,
                          peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
        s = torch.tensor([self.sums[k] for k in _SUM_KEYS], dtype=torch.float64)
        mx = torch.tensor([self.maxes[k] for k in _MAX_KEYS] + list(self.times.values()), dtype=torch.float64)
        dist.all_reduce(s)
        dist.all_reduce(mx, op=dist.ReduceOp.MAX)
        S, M = dict(zip(_SUM_KEYS, s.tolist())), dict(zip(_MAX_KEYS, mx.tolist()))
        # Each optimizer step's summed loss is that update's mean: report the mean over updates.
        # Token-weighted metrics are over every token of every update (clip_frac: the share of
        # the tokens trained on whose clipped term was the one taken).
        steps = max(S["optimizer_steps"] / world, 1.0)
        upd_tok = max(S["update_tokens"], 1.0)
        out = {
            "loss/total": S["loss"] / steps, "loss/pg": S["pg_loss"] / steps,
            "policy/clip_frac": S["clip_w"] / upd_tok, "policy/ratio_mean": S["ratio_w"] / upd_tok,
            "policy/entropy": S["entropy_w"] / max(S["entropy_tokens"], 1.0),
            "policy/grad_norm": S["grad_norm"] / (world * steps), "learner/optimizer_steps": steps,
            "learner/response_tokens": g_tokens, "learner/sequences": g_seqs,
            "learner/micro_batches_per_rank": M["micro_batches"], "time/learner_step": M["seconds"],
            "mem/learner_peak_rss_gib": M["peak_rss_gib"],
            # Share of computed positions that are padding; encoded / per-sample tokens (< 1 when
            # the shared-prompt forward encodes a group's prompt once).
            "learner/padding_share": 1.0 - S["encoded_tokens"] / max(S["token_slots"], 1.0),
            "learner/encoded_share": S["encoded_tokens"] / max(S["sequence_tokens"], 1.0),
        }
        if self.has_kl:
            out["loss/kl"] = S["kl"] / steps
        if S["tis_tokens"] > 0:
            out["policy/tis_weight_mean"] = S["tis_w"] / S["tis_tokens"]
            out["policy/tis_truncated_frac"] = S["tis_truncated"] / S["tis_tokens"]
        if S["mismatch_n"] > 0:
            out["policy/logprob_mismatch"] = S["mismatch_sum"] / S["mismatch_n"]
            out["policy/logprob_mismatch_max"] = M["mismatch_max"]
        out.update(zip(self.times, mx[len(_MAX_KEYS):].tolist()))
        return out
