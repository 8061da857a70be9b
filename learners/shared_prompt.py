"""Shared-prompt group forward: a group's prompt is encoded once, its G responses attend to it.

The G samples of a GRPO group share one prompt. A per-sample forward re-encodes that prompt G
times (in the reference pass, the training forward and its backward); with a ~400-token prompt
and ~64-token answers that is most of the learner's work. Here one micro-batch runs the decoder
twice inside one module call:

1. **prompt pass**: each distinct prompt once ([n_prompts, P], right-padded). Every attention
   layer's keys and values (after RoPE) are recorded by `_RecordLayer`.
2. **response pass**: the responses ([b, R], right-padded) with explicit positions (prompt length
   + r) and a cache whose layer l holds the recorded prompt keys/values expanded to b rows
   (`index_select` by each row's prompt). Attention sees [prompt keys | own response keys]
   under a 2D mask (prompt padding and response padding are 0), so every response token attends
   to exactly what it would in the per-sample sequence. The expansion is an autograd op: in
   backward the G rows' gradients sum into the one prompt encoding, which is the per-sample
   gradient summed over the group.

The log-prob of response token r comes from the hidden state before it: the prompt's last
hidden state for r = 0, the response's hidden state r-1 otherwise; those rows go through the
same chunked `lm_head` as the per-sample path (`learners.logprobs.head_logprobs`), and the
result is written back into the per-sample [b, T-1] layout, so the loss code cannot tell the
difference.

Gradient checkpointing: transformers' checkpointed layers drop `past_key_values` unless the
layer is marked as safe to replay (`_can_checkpoint_with_cache`): the recompute in backward calls
the cache's `update` again. Both caches here are replay-safe: the recording layer keeps its first
record and returns its inputs; the prefix layer never mutates. `enable_replay_safe_cache` marks
the model's layers once.

Expects a Hugging Face decoder whose attention calls `past_key_values.update(k, v, layer_idx)`
and whose mask builder reads the cache's sizes (Llama, Qwen2/3, Mistral in transformers 5).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from learners.logprobs import PackedRows, Segments, enable_varlen_attention, head_logprobs, packed_logprobs


@dataclass
class SharedPrompt:
    """A micro-batch's prompts and responses, as the shared-prompt forward takes them.

    Row j of the micro-batch is prompt `group_index[j]` followed by response j; the per-sample
    sequence is input_ids[j] = prompt_ids[g, :prompt_lens[j]] + resp_ids[j, :n_resp]."""

    prompt_ids: torch.Tensor    # [n_prompts, P] long, right-padded
    prompt_mask: torch.Tensor   # [n_prompts, P] long
    group_index: torch.Tensor   # [b] long: row -> its prompt
    prompt_lens: torch.Tensor   # [b] long
    resp_ids: torch.Tensor      # [b, R] long, right-padded
    resp_mask: torch.Tensor     # [b, R] long

    def to(self, device: torch.device) -> "SharedPrompt":
        return SharedPrompt(*(t.to(device) for t in (self.prompt_ids, self.prompt_mask, self.group_index,
                                                     self.prompt_lens, self.resp_ids, self.resp_mask)))

    @property
    def padded_tokens(self) -> int:
        """Token slots the two passes compute (prompt rows once, response rows once)."""
        return self.prompt_ids.numel() + self.resp_ids.numel()

    @property
    def real_tokens(self) -> int:
        return int(self.prompt_mask.sum()) + int(self.resp_mask.sum())


class _RecordLayer(DynamicLayer):
    """Keeps the keys/values of its first `update` (the prompt pass) and returns its inputs.

    A checkpointed layer's recompute calls `update` again with identical tensors: the record
    stays as it was, and the replay sees the same shapes as the original forward."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.dtype, self.device = key_states.dtype, key_states.device
            self.keys, self.values = key_states, value_states
            self.is_initialized = True
        return key_states, value_states


class _PrefixLayer(DynamicLayer):
    """A read-only prefix: `update` returns [prefix | new] and stores nothing (replay-safe)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.dtype, self.device = keys.dtype, keys.device
        self.keys, self.values = keys, values
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


def enable_replay_safe_cache(model: nn.Module) -> None:
    """Let checkpointed decoder layers keep `past_key_values` (see the module docstring): only the
    caches of this module ever reach them in training (the per-sample path passes none)."""
    for module in model.modules():
        if hasattr(type(module), "_can_checkpoint_with_cache"):
            module._can_checkpoint_with_cache = True


def shared_prompt_logprobs(model: nn.Module, sp: "SharedPrompt | PackedSharedPrompt | PackedRows", target_mask: torch.Tensor, chunk_tokens: int, *,
                           num_chunks: int | None = None, with_entropy: bool = False, temperature: float = 1.0
                           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-probs [b, T-1], entropy or None) in the per-sample layout of
    `learners.logprobs.chunked_logprobs` (position p-1+r holds response token r's log-prob),
    computed with one encoding per distinct prompt. `target_mask` [b, T-1] may only select
    response positions (p-1 .. p-2+n_resp).

    Also the entry point of packed micro-batches (`MicroBatch.layout`, which is what
    `LogprobModule` receives as `shared`): a `PackedSharedPrompt` goes to
    `packed_shared_prompt_logprobs`, a `PackedRows` (packed, no shared prompt) to
    `learners.logprobs.packed_logprobs`."""
    if isinstance(sp, PackedSharedPrompt):
        return packed_shared_prompt_logprobs(model, sp, target_mask, chunk_tokens, num_chunks=num_chunks,
                                             with_entropy=with_entropy, temperature=temperature)
    if isinstance(sp, PackedRows):
        return packed_logprobs(model, sp, target_mask, chunk_tokens, num_chunks=num_chunks,
                               with_entropy=with_entropy, temperature=temperature)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (got {temperature})")
    base = model.base_model
    b, r_max = sp.resp_ids.shape
    n_p, p_max = sp.prompt_ids.shape
    t1 = target_mask.shape[1]
    record = Cache(layer_class_to_replicate=_RecordLayer)
    prompt_hidden = base(input_ids=sp.prompt_ids, attention_mask=sp.prompt_mask, past_key_values=record,
                         position_ids=torch.arange(p_max, device=sp.prompt_ids.device).expand(n_p, -1),
                         use_cache=False).last_hidden_state                      # [n_p, P, H]
    if len(record.layers) == 0 or not all(layer.is_initialized for layer in record.layers):
        raise RuntimeError(f"{type(base).__name__} did not pass its keys/values through past_key_values; "
                           "set learner.shared_prompt: false for this model")
    prefix = Cache(layers=[_PrefixLayer(layer.keys.index_select(0, sp.group_index),
                                        layer.values.index_select(0, sp.group_index)) for layer in record.layers])
    positions = sp.prompt_lens[:, None] + torch.arange(r_max, device=sp.resp_ids.device)
    mask = torch.cat([sp.prompt_mask.index_select(0, sp.group_index), sp.resp_mask], dim=1)
    resp_hidden = base(input_ids=sp.resp_ids, attention_mask=mask, past_key_values=prefix,
                       position_ids=positions, use_cache=False).last_hidden_state  # [b, R, H]

    # Target (row j, per-sample position c) is response token r = c - (p_j - 1).
    rows, cols = target_mask.nonzero(as_tuple=True)
    r = cols - (sp.prompt_lens[rows] - 1)
    if bool(((r < 0) | (r >= r_max)).any()):
        raise ValueError("shared-prompt forward: a log-prob was asked for a prompt position "
                         "(a loss mask that covers the prompt); set learner.shared_prompt: false")
    hidden_dim = resp_hidden.shape[-1]
    # One flat source of hidden states: the prompts' rows, then the responses' rows.
    flat = torch.cat([prompt_hidden.reshape(n_p * p_max, hidden_dim), resp_hidden.reshape(b * r_max, hidden_dim)])
    from_prompt = sp.group_index[rows] * p_max + sp.prompt_lens[rows] - 1
    from_resp = n_p * p_max + rows * r_max + (r - 1).clamp(min=0)
    source = torch.where(r == 0, from_prompt, from_resp)
    targets = sp.resp_ids[rows, r]
    return _head_into_rows(model, flat, source, targets, rows * t1 + cols, (b, t1), chunk_tokens, num_chunks,
                           with_entropy, temperature)


@dataclass
class PackedSharedPrompt:
    """A shared-prompt micro-batch without padding: the distinct prompts packed into one row, the
    responses into another. Row j of the micro-batch is prompt `group_index[j]` (tokens
    prompt_ids[0, prompt_starts[g] : prompt_starts[g] + prompt_lens[j]]) followed by response j
    (resp_ids[0, resp_starts[j] : resp_starts[j] + resp_lens[j]])."""

    prompt_ids: torch.Tensor      # [1, sum of distinct prompt lengths] long
    prompt_starts: torch.Tensor   # [n_prompts] long
    prompt_seg: tuple[int, ...]   # length of each distinct prompt
    group_index: torch.Tensor     # [b] long: row -> its prompt
    prompt_lens: torch.Tensor     # [b] long
    resp_ids: torch.Tensor        # [1, sum of response lengths] long
    resp_starts: torch.Tensor     # [b] long
    resp_lens: tuple[int, ...]    # length of each response

    @classmethod
    def build(cls, prompts: list[list[int]], group_index: list[int], responses: list[list[int]]) -> "PackedSharedPrompt":
        p_lens = tuple(len(p) for p in prompts)
        r_lens = tuple(len(r) for r in responses)
        long = dict(dtype=torch.long)
        return cls(torch.tensor([[t for p in prompts for t in p]], **long),
                   torch.tensor([sum(p_lens[:k]) for k in range(len(p_lens))], **long), p_lens,
                   torch.tensor(group_index, **long), torch.tensor([p_lens[g] for g in group_index], **long),
                   torch.tensor([[t for r in responses for t in r]], **long),
                   torch.tensor([sum(r_lens[:j]) for j in range(len(r_lens))], **long), r_lens)

    def to(self, device: torch.device) -> "PackedSharedPrompt":
        return PackedSharedPrompt(self.prompt_ids.to(device), self.prompt_starts.to(device), self.prompt_seg,
                                  self.group_index.to(device), self.prompt_lens.to(device), self.resp_ids.to(device),
                                  self.resp_starts.to(device), self.resp_lens)

    @property
    def padded_tokens(self) -> int:
        return self.prompt_ids.numel() + self.resp_ids.numel()

    @property
    def real_tokens(self) -> int:
        return self.padded_tokens


def packed_shared_prompt_logprobs(model: nn.Module, sp: PackedSharedPrompt, target_mask: torch.Tensor,
                                  chunk_tokens: int, *, num_chunks: int | None = None, with_entropy: bool = False,
                                  temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`shared_prompt_logprobs` without padding: the prompt pass is one packed row of the distinct
    prompts (attention per prompt), the response pass one packed row of the responses, each
    attending to its own prompt's recorded keys/values (taken from the packed prompt row, not
    copied per response up front) and causally to itself (`learners.logprobs.Segments`)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (got {temperature})")
    enable_varlen_attention(model)
    base = model.base_model
    dev = sp.resp_ids.device
    b, t1 = target_mask.shape
    n_prompt_tok = sp.prompt_ids.shape[1]
    record = Cache(layer_class_to_replicate=_RecordLayer)
    p_pos = torch.cat([torch.arange(n, device=dev) for n in sp.prompt_seg])[None]
    prompt_hidden = base(input_ids=sp.prompt_ids, position_ids=p_pos, past_key_values=record, use_cache=False,
                         rlsys_segments=Segments(sp.prompt_seg)).last_hidden_state[0]     # [sum P, H]
    if len(record.layers) == 0 or not all(layer.is_initialized for layer in record.layers):
        raise RuntimeError(f"{type(base).__name__} did not pass its keys/values through past_key_values; "
                           "set learner.shared_prompt: false for this model")
    prefix = Cache(layers=[_PrefixLayer(layer.keys, layer.values) for layer in record.layers])
    starts = sp.prompt_starts.tolist()
    groups = sp.group_index.tolist()
    seg = Segments(sp.resp_lens, key_offset=n_prompt_tok,
                   prefix=tuple((starts[g], sp.prompt_seg[g]) for g in groups), device=dev)
    r_pos = torch.cat([torch.arange(n, device=dev) + sp.prompt_seg[g] for n, g in zip(sp.resp_lens, groups)])[None]
    resp_hidden = base(input_ids=sp.resp_ids, position_ids=r_pos, past_key_values=prefix, use_cache=False,
                       rlsys_segments=seg).last_hidden_state[0]                             # [sum R, H]

    rows, cols = target_mask.nonzero(as_tuple=True)
    r = cols - (sp.prompt_lens[rows] - 1)
    resp_lens = torch.tensor(sp.resp_lens, device=dev)
    if bool(((r < 0) | (r >= resp_lens[rows])).any()):
        raise ValueError("shared-prompt forward: a log-prob was asked for a prompt position "
                         "(a loss mask that covers the prompt); set learner.shared_prompt: false")
    flat = torch.cat([prompt_hidden, resp_hidden])
    from_prompt = sp.prompt_starts[sp.group_index[rows]] + sp.prompt_lens[rows] - 1
    from_resp = n_prompt_tok + sp.resp_starts[rows] + (r - 1).clamp(min=0)
    source = torch.where(r == 0, from_prompt, from_resp)
    targets = sp.resp_ids[0].index_select(0, sp.resp_starts[rows] + r)
    return _head_into_rows(model, flat, source, targets, rows * t1 + cols, (b, t1), chunk_tokens, num_chunks,
                           with_entropy, temperature)


def _head_into_rows(model: nn.Module, flat: torch.Tensor, source: torch.Tensor, targets: torch.Tensor,
                    dest: torch.Tensor, shape: tuple[int, int], chunk_tokens: int, num_chunks: int | None,
                    with_entropy: bool, temperature: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropy) of `targets` from the hidden states `flat[source]`, placed at the
    flat positions `dest` of zero [b, T-1] tensors: the per-row layout the loss works on."""
    logp_sel, ent_sel = head_logprobs(model.get_output_embeddings(), flat, source, targets, chunk_tokens,
                                      num_chunks=num_chunks, with_entropy=with_entropy, temperature=temperature)
    n = shape[0] * shape[1]
    logp = logp_sel.new_zeros(n).index_copy(0, dest, logp_sel).view(shape)
    entropy = None if ent_sel is None else ent_sel.new_zeros(n).index_copy(0, dest, ent_sel).view(shape)
    return logp, entropy
