"""From one rank's learner batch to padded micro-batches, and the loss scale (pure torch).

Masks are aligned to *target positions*: index t of a [b, T-1] mask refers to the log-prob of
token t+1 given tokens 0..t, i.e. the output of `learners.logprobs.token_logprobs`.

Loss scaling, the whole arithmetic in one place. Let D be the step's global denominator
(response tokens over all ranks for token_mean, sequences for seq_mean_token_mean) and
L = sum over every rank r and micro-batch m of l_rm, with l_rm = (sum of the micro-batch's
per-token losses, or of its per-sequence mean losses) / D. L is exactly the single-process full-batch loss, however the batch is
split. DeepSpeed then (a) divides the loss by gradient_accumulation_steps in backward() unless
scale_wrt_gas=False, and (b) averages gradients over the W data-parallel ranks (ZeRO reduce:
divide by W, then sum). The learner calls backward(W * l_rm, scale_wrt_gas=False) with
managed_gradient_accumulation=False (one optimizer step per pass, whatever the number of
micro-batches), so the reduced gradient is (1/W) * sum_r sum_m W * grad l_rm = grad L.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch


def backward_scale(world_size: int) -> float:
    """Factor on each micro-batch loss before engine.backward (see the module docstring)."""
    return float(world_size)


@dataclass
class MicroBatch:
    input_ids: torch.Tensor        # [b, T] long, right-padded
    attention_mask: torch.Tensor   # [b, T] long
    loss_mask: torch.Tensor        # [b, T-1] float32: which log-probs enter the loss
    target_mask: torch.Tensor      # [b, T-1] bool: which log-probs to compute at all
    advantages: torch.Tensor       # [b] float32
    behaviour: torch.Tensor | None       # [b, T-1] float32 sampler log-probs (0 where absent)
    behaviour_mask: torch.Tensor | None  # [b, T-1] bool (False on rows without sampler log-probs)
    n_real: int                    # real sequences (0 for a filler micro-batch)

    @property
    def n_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def needed_chunks(self, chunk_tokens: int) -> int:
        return max(1, -(-int(self.target_mask.sum()) // chunk_tokens))


def _to_targets(values: Sequence[float], prompt_len: int, n_ids: int, what: str) -> list[float]:
    """Per-token values -> target-aligned list of length n_ids - 1 (0 on prompt positions).

    Accepts either response-aligned values (len = n_ids - prompt_len: what vLLM returns) or
    values aligned with input_ids (len = n_ids; the first one, which has no prefix, is dropped).
    """
    n_resp = n_ids - prompt_len
    if len(values) == n_resp:
        return [0.0] * (prompt_len - 1) + [float(v) for v in values]
    if len(values) == n_ids:
        return [float(v) for v in values[1:]]
    raise ValueError(f"{what}: {len(values)} values for a sequence of {n_ids} tokens "
                     f"({n_resp} response tokens); give one per response token or per token")


def filler_micro_batch(pad_id: int) -> MicroBatch:
    """Two padding tokens with an empty loss mask: keeps a rank with fewer sequences in step
    with the others (ZeRO-3 forward/backward are collectives) while adding zero gradient."""
    ids = torch.full((1, 2), pad_id, dtype=torch.long)
    zeros = torch.zeros(1, 1)
    return MicroBatch(ids, torch.ones_like(ids), zeros, zeros.bool(), torch.zeros(1), None, None, 0)


def build_micro_batches(batch: dict[str, Any], micro_batch_size: int, pad_id: int,
                        keep_order: bool = False) -> list[MicroBatch]:
    """Validate one rank's batch and pad it into micro-batches of at most `micro_batch_size`
    sequences, longest first (similar lengths together waste less padding), or in the given
    order with `keep_order` (preference pairs: chosen, rejected, chosen, ...)."""
    ids: list[list[int]] = batch["input_ids"]
    plens: list[int] = batch["prompt_lens"]
    advs: list[float] = batch["advantages"]
    masks = batch.get("loss_mask")
    behaviour = batch.get("behaviour_logprobs")
    if not (len(ids) == len(plens) == len(advs)):
        raise ValueError(f"input_ids ({len(ids)}), prompt_lens ({len(plens)}) and advantages "
                         f"({len(advs)}) must have one entry per sequence")
    for i, (seq, p) in enumerate(zip(ids, plens)):
        if not 1 <= p < len(seq):
            raise ValueError(f"sequence {i}: prompt_len {p} must be >= 1 and below its length {len(seq)}")
    order = list(range(len(ids))) if keep_order else sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out = []
    for start in range(0, len(order), micro_batch_size):
        rows = order[start:start + micro_batch_size]
        t = max(len(ids[i]) for i in rows)
        input_ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
        attn = torch.zeros((len(rows), t), dtype=torch.long)
        loss_mask = torch.zeros((len(rows), t - 1))
        resp_mask = torch.zeros((len(rows), t - 1), dtype=torch.bool)
        beh = torch.zeros((len(rows), t - 1)) if behaviour is not None else None
        has_beh = torch.zeros((len(rows), 1), dtype=torch.bool)  # a teacher-forced row has none
        for j, i in enumerate(rows):
            n, p = len(ids[i]), plens[i]
            input_ids[j, :n] = torch.tensor(ids[i], dtype=torch.long)
            attn[j, :n] = 1
            resp_mask[j, p - 1:n - 1] = True
            if masks is not None and masks[i] is not None:
                loss_mask[j, :n - 1] = torch.tensor(_to_targets(masks[i], p, n, f"loss_mask[{i}]"))
            else:
                loss_mask[j, p - 1:n - 1] = 1.0
            if beh is not None and behaviour[i] is not None:
                beh[j, :n - 1] = torch.tensor(_to_targets(behaviour[i], p, n, f"behaviour_logprobs[{i}]"))
                has_beh[j] = True
        out.append(MicroBatch(
            input_ids, attn, loss_mask, resp_mask | (loss_mask > 0),
            torch.tensor([float(advs[i]) for i in rows]),
            beh, resp_mask & has_beh if beh is not None else None, len(rows)))
    return out
