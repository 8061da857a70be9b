"""Per-token log-probabilities without materialising a micro-batch's full-vocabulary logits.

A 49k-token vocabulary makes fp32 logits the largest tensor in training by far
(B x T x V x 4 bytes: 16 x 400 x 49152 x 4 = 1.26 GB per micro-batch, plus as much again for
log_softmax's saved output and its gradient). Here the decoder runs once, then `lm_head` is
applied to at most `chunk_tokens` positions at a time; each chunk keeps only the gathered
target log-prob (and optionally the entropy) and drops its logits.

With gradient, each chunk runs under `torch.utils.checkpoint`: the chunk's logits are freed
after the forward and recomputed, one chunk at a time, during backward. Without it, autograd
would keep every chunk's logits alive until backward and nothing would be saved.

Where the head is a plain bias-free Linear (under ZeRO-3 too: it runs as the module's
forward, so DeepSpeed's hooks gather the weight), a chunk goes through `FusedHeadLogprob`
instead: the vocabulary in blocks of `HEAD_BLOCK` columns, an online logsumexp in the forward,
and a backward that recomputes each block's logits and writes its gradient,
(onehot - softmax) * g / T, straight into the two matmuls. Every fp32 [rows, block] temporary
stays cache-sized: the autograd path above makes ~19 passes over a chunk's [rows, vocab] fp32
logits (the forward, its recompute, the backward of logsumexp, gather, divide and cast), each a
trip to memory (100 MB for 512 rows). benchmarks/hot_kernels.py (SmolLM2-135M head, 512 rows,
2-core AMX CPU): bf16 forward + backward 798 -> 356 ms, a no-grad pass with entropy
303 -> 96 ms; fp32 forward + backward 1010 -> 613 ms.

Temperature: every log-prob here is taken under the *sampling* distribution's temperature,
log softmax(logits / T), T = `rollout.temperature` (the one setting the rollout and the learner
share). The policy gradient, the PPO ratio and the KL are then all about the policy that
actually sampled, as in verl/EasyR1 (which divide the logits by the rollout temperature too).

Only the target positions actually needed (by default every non-padding one) go through
`lm_head`: prompt tokens need no log-prob in GRPO, which skips a large share of the head's work.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def num_chunks_for(n_positions: int, chunk_tokens: int) -> int:
    """Chunks needed for `n_positions` target positions (at least one)."""
    return max(1, -(-n_positions // chunk_tokens))


HEAD_BLOCK = 1024
"""Vocabulary columns per block in `FusedHeadLogprob` (512 rows x 1024 fp32 = 2 MiB). Blocks of
1024, 2048, 4096 and 8192 took 270, 286, 335 and 353 ms for 512 bf16 rows forward + backward
(a first version that summed the hidden-state gradient per block): smaller blocks stay in cache."""


class FusedHeadLogprob(torch.autograd.Function):
    """(log p_T(targets | hidden), entropy of p_T or None) for rows of `hidden` [n, H], with
    p_T = softmax(hidden @ weight.T / temperature), in vocabulary blocks (module docstring).

    Numerics as `_head_logprobs`: logits in the weight's dtype (each block's matmul), softmax
    statistics in fp32, the logits' gradient cast to the weight's dtype for the two backward
    matmuls. The entropy is a metric: no gradient flows through it."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                with_entropy: bool, block: int = HEAD_BLOCK) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = hidden.shape[0]
        f32 = dict(dtype=torch.float32, device=hidden.device)
        run_max = torch.full((n,), -float("inf"), **f32)
        run_sum = torch.zeros(n, **f32)               # sum exp(l - run_max)
        run_dot = torch.zeros(n, **f32) if with_entropy else None   # sum exp(l - run_max) * l
        picked = torch.zeros(n, **f32)
        for c0, w, rows, cols in _blocks(weight, targets, block):
            logits = _block_logits(hidden, w, temperature)
            new_max = torch.maximum(run_max, logits.amax(dim=1))
            rescale = (run_max - new_max).exp_()
            e = (logits - new_max[:, None]).exp_()
            run_sum.mul_(rescale).add_(e.sum(dim=1))
            if with_entropy:
                run_dot.mul_(rescale).add_(e.mul_(logits).sum(dim=1))
            run_max = new_max
            if rows.numel():
                picked[rows] = logits[rows, cols]
        lse = run_max + run_sum.log()
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.block = temperature, block
        entropy = lse - run_dot / run_sum if with_entropy else None
        if entropy is not None:
            ctx.mark_non_differentiable(entropy)
        return picked - lse, entropy

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor, _grad_entropy: torch.Tensor | None):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        coef = grad_logp.float() / ctx.temperature    # d logp / d logits = (onehot - p) / T
        # The hidden state's gradient sums over the whole vocabulary. In fp32 it is summed block
        # by block; in a 16-bit dtype each block's product would be rounded before the sum, so
        # the blocks' logit gradients are collected ([n, vocab] in that dtype, what nn.Linear's
        # backward holds too) and multiplied once, as nn.Linear does.
        collect = need_h and hidden.dtype != torch.float32
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) \
            if need_h and not collect else None
        grad_logits = hidden.new_empty(hidden.shape[0], weight.shape[0]) if collect else None
        grad_w = torch.empty_like(weight) if need_w else None
        for c0, w, rows, cols in _blocks(weight, targets, ctx.block):
            g = _block_logits(hidden, w, ctx.temperature).sub_(lse[:, None]).exp_().mul_(-coef[:, None])
            if rows.numel():
                g[rows, cols] += coef[rows]
            g = g.to(hidden.dtype)
            if collect:
                grad_logits[:, c0:c0 + w.shape[0]] = g
            elif need_h:
                grad_h.add_(g @ w)
            if need_w:
                grad_w[c0:c0 + w.shape[0]] = g.t() @ hidden
        if collect:
            grad_h = grad_logits @ weight
        return (grad_h.to(hidden.dtype) if need_h else None), grad_w, None, None, None, None


def _blocks(weight: torch.Tensor, targets: torch.Tensor, block: int):
    """(first column, weight rows, rows whose target is in the block, its column there) per block."""
    for c0 in range(0, weight.shape[0], block):
        w = weight[c0:c0 + block]
        rows = ((targets >= c0) & (targets < c0 + w.shape[0])).nonzero(as_tuple=True)[0]
        yield c0, w, rows, targets[rows] - c0


def _block_logits(hidden: torch.Tensor, w: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = (hidden @ w.t()).float()   # the matmul in the model's dtype, like nn.Linear
    return logits.div_(temperature) if temperature != 1.0 else logits


def fused_head_ok(head: nn.Module) -> bool:
    """True where `FusedHeadLogprob` can stand in for `head`'s own forward: a bias-free
    nn.Linear (a LoRA-wrapped head is not a plain Linear)."""
    return type(head) is nn.Linear and head.bias is None


def _fused_head_call(head: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor, temperature: float,
                     with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`FusedHeadLogprob` run as `head`'s forward, through `head(...)`: whatever hooks the
    module carries run around it as around its own forward. Under ZeRO-3 those gather the
    partitioned weight before and release it after, and gather it again before backward (the
    hook DeepSpeed puts on the module's outputs), as for `F.linear`."""
    def forward(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return FusedHeadLogprob.apply(h, head.weight, targets, temperature, with_entropy)

    head.forward = forward  # an instance attribute shadows nn.Linear.forward for this call only
    try:
        return head(hidden)
    finally:
        del head.forward


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
    fused = fused_head_ok(head)
    lps, ents = [], []
    for ih, y in zip(idx.tensor_split(k), ys.tensor_split(k)):
        h = hidden_flat.index_select(0, ih)
        if fused:
            lp, ent = _fused_head_call(head, h, y, temperature, with_entropy)
        elif use_ckpt:
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


# ---------------------------------------------------------------------------------------------
# Packed sequences: no compute on padding.
#
# A packed micro-batch is one row: its sequences concatenated, position ids restarting at 0 for
# each, so every projection and MLP runs on real tokens only. Attention must stay inside each
# sequence. transformers detects that layout from the position ids (attention_mask=None) and
# builds a block-diagonal causal mask, but sdpa still computes the whole [N, N] score matrix,
# cross-sequence blocks included (quadratic in the micro-batch's tokens). The attention function
# below instead runs attention per sequence (`Segments`): exactly sum_i n_i^2 scores, as unpacked
# sequences cost. It is registered with transformers' AttentionInterface under
# "rlsys_varlen|sdpa" and does exactly what sdpa does for any call without `rlsys_segments`, so a
# model switched to it (`enable_varlen_attention`) computes padded batches as before.
# ---------------------------------------------------------------------------------------------

VARLEN_ATTENTION = "rlsys_varlen|sdpa"


class Segments:
    """How the queries of one packed row attend (the `rlsys_segments` keyword of the decoder).

    Segment i = queries [starts[i], starts[i] + lens[i]) of the row; it attends causally to its
    own keys, which sit at `key_offset + starts[i]` in the layer's key tensor (`key_offset`: the
    length of a cache prefix that `past_key_values.update` put in front), and, when `prefix` is
    given, first to the whole key range prefix[i] = (start, length) of that prefix (a prompt
    encoded once for several responses)."""

    def __init__(self, lens: tuple[int, ...], key_offset: int = 0,
                 prefix: tuple[tuple[int, int], ...] | None = None, device: torch.device | None = None):
        self.lens = tuple(int(n) for n in lens)
        self.starts = tuple(sum(self.lens[:i]) for i in range(len(self.lens)))
        self.key_offset, self.prefix = key_offset, prefix
        # Bottom-right causal mask of a segment after its prefix: query r sees prefix + keys 0..r.
        self.masks = None if prefix is None else [
            torch.ones(n, p + n, dtype=torch.bool, device=device).tril(diagonal=p)
            for n, (_, p) in zip(self.lens, prefix)]

    @property
    def total(self) -> int:
        return sum(self.lens)


def varlen_sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          rlsys_segments: Segments | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: sdpa, per segment of a packed row when `rlsys_segments`
    is given (the mask transformers built for the row is then not used), plain sdpa otherwise."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    seg = rlsys_segments
    if seg is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1 or query.shape[2] != seg.total:
        raise ValueError(f"packed attention: query {tuple(query.shape)} is not one row of {seg.total} tokens")
    outs = []
    for i, (q0, n) in enumerate(zip(seg.starts, seg.lens)):
        k0 = seg.key_offset + q0
        k, v = key[:, :, k0:k0 + n], value[:, :, k0:k0 + n]
        mask = None
        if seg.prefix is not None:
            p0, p = seg.prefix[i]
            k = torch.cat([key[:, :, p0:p0 + p], k], dim=2)
            v = torch.cat([value[:, :, p0:p0 + p], v], dim=2)
            mask = seg.masks[i]
        if mask is not None and query.device.type == "cpu":
            out = _masked_gqa_sdpa(module, query[:, :, q0:q0 + n], k, v, mask, dropout, scaling)
        else:
            out, _ = sdpa_attention_forward(module, query[:, :, q0:q0 + n], k, v, mask, dropout=dropout,
                                            scaling=scaling, is_causal=True)
        outs.append(out)  # [1, n, heads, head_dim]
    return torch.cat(outs, dim=1), None


def _masked_gqa_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     mask: torch.Tensor, dropout: float, scaling: float | None) -> torch.Tensor:
    """sdpa of a response segment after its shared prompt (an explicit mask), grouped-query
    heads passed as they are (`enable_gqa`) instead of repeated: with a mask transformers
    repeats them ([1, 3, 444, 64] keys copied to 9 heads, and summed back in backward), which on
    CPU made a SmolLM2 segment's forward + backward 17-22 % slower (64 queries over 444 keys,
    bf16 and fp32). Returns [1, n, heads, head_dim] like `sdpa_attention_forward`."""
    groups = getattr(module, "num_key_value_groups", 1)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=groups > 1)
    return out.transpose(1, 2).contiguous()


def _register_varlen() -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    if VARLEN_ATTENTION not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(VARLEN_ATTENTION, varlen_sdpa_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN_ATTENTION, sdpa_mask)


def packing_unsupported(model: nn.Module) -> str | None:
    """Why `model` (a Hugging Face causal LM) cannot run packed micro-batches, or None if it can:
    its attention must dispatch through transformers' AttentionInterface (which passes the
    decoder's keyword arguments on to it) and currently use sdpa."""
    inner = getattr(model, "base_model", model)
    cfg = getattr(inner, "config", None)
    impl = getattr(cfg, "_attn_implementation", None)
    if not getattr(type(inner), "_supports_attention_backend", False):
        return f"{type(inner).__name__} does not dispatch attention through transformers' AttentionInterface"
    if impl not in ("sdpa", VARLEN_ATTENTION):
        return f"attention implementation {impl!r} (packing needs 'sdpa')"
    return None


def enable_varlen_attention(model: nn.Module) -> None:
    """Switch `model`'s attention to `varlen_sdpa_attention` (idempotent; padded batches compute
    as with sdpa). The choice lives in the config's private `_attn_implementation`, which
    save_pretrained does not write. Raises if the model cannot (see `packing_unsupported`)."""
    why = packing_unsupported(model)
    if why is not None:
        raise RuntimeError(f"packed micro-batches: {why}; set learner.micro_batch_tokens: null")
    cfg = getattr(model, "base_model", model).config
    if cfg._attn_implementation != VARLEN_ATTENTION:
        _register_varlen()
        cfg._attn_implementation = VARLEN_ATTENTION
        top = getattr(model, "config", None)
        if top is not None and top is not cfg:
            top._attn_implementation = VARLEN_ATTENTION


@dataclass
class PackedRows:
    """A micro-batch's sequences as one row without padding: row j of the micro-batch's [b, T]
    layout is input_ids[0, starts[j] : starts[j] + lens[j]]."""

    input_ids: torch.Tensor      # [1, N] long
    position_ids: torch.Tensor   # [1, N] long, restarting at 0 for each sequence
    starts: torch.Tensor         # [b] long
    lens: tuple[int, ...]        # tokens per sequence (sum N)

    @classmethod
    def build(cls, seqs: list[list[int]]) -> "PackedRows":
        lens = tuple(len(s) for s in seqs)
        starts = [sum(lens[:j]) for j in range(len(lens))]
        return cls(torch.tensor([[t for s in seqs for t in s]], dtype=torch.long),
                   torch.cat([torch.arange(n) for n in lens])[None],
                   torch.tensor(starts, dtype=torch.long), lens)

    def to(self, device: torch.device) -> "PackedRows":
        return PackedRows(self.input_ids.to(device), self.position_ids.to(device), self.starts.to(device), self.lens)

    @property
    def padded_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def real_tokens(self) -> int:
        return self.input_ids.numel()


def packed_logprobs(model: nn.Module, packed: PackedRows, target_mask: torch.Tensor, chunk_tokens: int, *,
                    num_chunks: int | None = None, with_entropy: bool = False, temperature: float = 1.0
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`chunked_logprobs` of the micro-batch's rows ([b, T-1] layout, `target_mask` [b, T-1])
    computed from one packed row: one decoder call on the real tokens only."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (got {temperature})")
    enable_varlen_attention(model)
    seg = Segments(packed.lens)
    hidden = model.base_model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False,
                              rlsys_segments=seg).last_hidden_state[0]                  # [N, H]
    b, t1 = target_mask.shape
    rows, cols = target_mask.nonzero(as_tuple=True)
    source = packed.starts[rows] + cols   # hidden state that predicts the next token of the same row
    logp_sel, ent_sel = head_logprobs(model.get_output_embeddings(), hidden, source,
                                      packed.input_ids[0].index_select(0, source + 1), chunk_tokens,
                                      num_chunks=num_chunks, with_entropy=with_entropy, temperature=temperature)
    dest = rows * t1 + cols
    logp = logp_sel.new_zeros(b * t1).index_copy(0, dest, logp_sel).view(b, t1)
    entropy = None if ent_sel is None else ent_sel.new_zeros(b * t1).index_copy(0, dest, ent_sel).view(b, t1)
    return logp, entropy
