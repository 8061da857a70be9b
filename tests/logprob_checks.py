"""Shared checks of the learner's forward layouts (shared-prompt, packed): per-row log-probs and
the gradient of a layout-independent objective, keyed by each row's tokens so that any
micro-batch layout of the same sequences can be compared with the per-sample computation."""
from __future__ import annotations

import torch

from learners.logprobs import num_chunks_for


def grads(model) -> dict[str, torch.Tensor]:
    """The accumulated gradients by parameter name; zeroes them."""
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def row_logprobs(module, mbs) -> dict[tuple, tuple]:
    """Per row (keyed by its tokens): log-probs, entropy and target mask in the [T-1] layout."""
    out = {}
    with torch.no_grad():
        for m in mbs:
            k = num_chunks_for(int(m.target_mask.sum()), module.chunk_tokens)
            lp, ent = module(m.input_ids, m.attention_mask, m.target_mask, k, True, shared=m.layout)
            for j in range(m.n_real):
                n = int(m.attention_mask[j].sum())
                out[tuple(m.input_ids[j, :n].tolist())] = (lp[j, :n - 1], ent[j, :n - 1], m.target_mask[j, :n - 1])
    return out


def objective_grads(module, mbs) -> dict[str, torch.Tensor]:
    """Gradient of sum over rows of <c_row, logp_row>, c_row a fixed random vector per row (keyed
    by the row's tokens, so any micro-batch layout computes the same function)."""
    for m in mbs:
        k = num_chunks_for(int(m.target_mask.sum()), module.chunk_tokens)
        lp, _ = module(m.input_ids, m.attention_mask, m.target_mask, k, shared=m.layout)
        total = lp.sum() * 0.0
        for j in range(m.n_real):
            n = int(m.attention_mask[j].sum())
            key = tuple(m.input_ids[j, :n].tolist())
            c = torch.randn(n - 1, generator=torch.Generator().manual_seed(sum(key) * 31 + n))
            total = total + (lp[j, :n - 1] * c).sum()
        total.backward()
    return grads(module.model)
