"""Per-token log-probabilities without materialising a micro-batch's full-vocabulary logits.

A 49k-token vocabulary makes fp32 logits the largest tensor in training by far
(B x T x V x 4 bytes: 16 x 400 x 49152 x 4 = 1.26 GB per micro-batch, plus as much again for
log_softmax's saved output and its gradient). Here the decoder runs once, then `lm_head` is
applied to at most `chunk_tokens` positions at a time; each chunk keeps only the gathered
target log-prob (and optionally the entropy) and drops its logits.

With gradient, each chunk runs under `torch.utils.checkpoint`: the chunk's logits are freed
after the forward and recomputed, one chunk at a time, during backward. Without it, autograd
would keep every chunk's logits alive until backward and nothing would be saved.

Temperature: every log-prob here is taken under the *sampling* distribution's temperature,
log softmax(logits / T), T = `rollout.temperature` (the one setting the rollout and the learner
share). The policy gradient, the PPO ratio and the KL are then all about the policy that
actually sampled, as in verl/EasyR1 (which divide the logits by the rollout temperature too).

Only the target positions actually needed (by default every non-padding one) go through
`lm_head`: prompt tokens need no log-prob in GRPO, which skips a large share of the head's work.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def num_chunks_for(n_positions: int, chunk_tokens: int) -> int:
    """Chunks needed for `n_positions` target positions (at least one)."""
    return max(1, -(-n_positions // chunk_tokens))


def _head_logprobs(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                   with_entropy: bool, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p_T(target) (and the entropy of p_T) for rows of `hidden` ([n, H]), where
    p_T = softmax(logits / temperature); logits exist only here."""
    # lm_head in the model's dtype, like vLLM's sampler and HF's loss; softmax statistics in fp32
    # (vLLM also divides fp32 logits by the temperature).
    logits = head(hidden).float()
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)  # log_softmax without a second [n, V] tensor
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - lse
    if not with_entropy:
        return logp, None
    with torch.no_grad():  # a metric: no gradient, nothing kept for backward
        entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logp, entropy


def chunked_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     chunk_tokens: int, *, target_mask: torch.Tensor | None = None,
                     num_chunks: int | None = None, with_entropy: bool = False,
                     temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-probs [B, T-1], entropy [B, T-1] or None) of a Hugging Face causal LM under
    softmax(logits / temperature).

    Position t holds log p(input_ids[:, t+1] | input_ids[:, :t+1]). Positions outside
    `target_mask` ([B, T-1] bool; default: the target token is not padding) are 0 and cost
    nothing. Expects right padding (positions are counted from 0 for each row).

    `num_chunks` forces the number of `lm_head` calls (must be >= what `chunk_tokens` needs).
    Under ZeRO-3 each call all-gathers the head's weight, so data-parallel ranks must make the
    same number of calls; the learner agrees on it across ranks and passes it here.
    """
    b, t = input_ids.shape
    if t < 2:
        raise ValueError("need at least 2 tokens per row to have a next-token target")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (got {temperature}): log-probs of greedy decoding are undefined")
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                              use_cache=False).last_hidden_state
    if target_mask is None:
        target_mask = attention_mask[:, 1:].bool()
    rows, cols = target_mask.nonzero(as_tuple=True)
    flat_h = rows * t + cols          # hidden state that predicts ...
    flat_y = flat_h + 1               # ... this token, both indices into the [B*T] flattening
    logp_sel, ent_sel = head_logprobs(model.get_output_embeddings(), hidden.reshape(b * t, -1), flat_h,
                                      input_ids.reshape(-1).index_select(0, flat_y), chunk_tokens,
                                      num_chunks=num_chunks, with_entropy=with_entropy, temperature=temperature)
    # index_copy is differentiable w.r.t. the copied values; positions are re-based to [B, T-1].
    dest = rows * (t - 1) + cols
    logp = logp_sel.new_zeros(b * (t - 1)).index_copy(0, dest, logp_sel).view(b, t - 1)
    entropy = None
    if with_entropy:
        entropy = ent_sel.new_zeros(b * (t - 1)).index_copy(0, dest, ent_sel).view(b, t - 1)
    return logp, entropy


def head_logprobs(head: nn.Module, hidden_flat: torch.Tensor, source: torch.Tensor, targets: torch.Tensor,
                  chunk_tokens: int, *, num_chunks: int | None = None, with_entropy: bool = False,
                  temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p_T(targets[i] | hidden_flat[source[i]]) for every i ([n]; entropy [n] or None), with
    `lm_head` applied to at most `chunk_tokens` rows at a time (exactly `num_chunks` calls when
    given: ZeRO-3 ranks must agree on it)."""
    n = source.numel()
    k = num_chunks_for(n, chunk_tokens)
    if num_chunks is not None:
        if num_chunks < k:
            raise ValueError(f"num_chunks={num_chunks} < {k} needed for {n} positions")
        k = num_chunks
    # Every chunk gets at least one row (row 0 repeated, results dropped), so each of the
    # k head calls does real work and an identical autograd graph shape on every rank.
    pad = max(0, k - n)
    idx = torch.cat([source, source.new_zeros(pad)])
    ys = torch.cat([targets, targets.new_zeros(pad)])
    use_ckpt = torch.is_grad_enabled() and hidden_flat.requires_grad
    lps, ents = [], []
    for ih, y in zip(idx.tensor_split(k), ys.tensor_split(k)):
        h = hidden_flat.index_select(0, ih)
        if use_ckpt:
            lp, ent = checkpoint(_head_logprobs, head, h, y, with_entropy, temperature, use_reentrant=False)
        else:
            lp, ent = _head_logprobs(head, h, y, with_entropy, temperature)
        lps.append(lp)
        ents.append(ent)
    return torch.cat(lps)[:n], (torch.cat(ents)[:n] if with_entropy else None)


def token_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   chunk_tokens: int, *, target_mask: torch.Tensor | None = None,
                   num_chunks: int | None = None, temperature: float = 1.0) -> torch.Tensor:
    """log p_T(input_ids[:, t+1] | prefix) as [B, T-1] float32; see `chunked_logprobs`."""
    return chunked_logprobs(model, input_ids, attention_mask, chunk_tokens, target_mask=target_mask,
                            num_chunks=num_chunks, temperature=temperature)[0]


def naive_token_logprobs(model: nn.Module, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Reference implementation (full logits at once); for tests only."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logp = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    return logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1) * attention_mask[:, 1:]
