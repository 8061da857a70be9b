"""From one rank's learner batch to micro-batches (padded, or packed by a token budget), and the
loss scale (pure torch).

Padded (`token_budget=None`): at most `micro_batch_size` sequences per micro-batch, each row
right-padded to the longest. Packed (`token_budget=N`, `learner.micro_batch_tokens`): the
micro-batch's sequences are concatenated into one row of at most N tokens (with the
shared-prompt forward: its distinct prompts in one row, its responses in another, N bounding
both together), position ids restarting per sequence and attention confined to each sequence
(`learners.logprobs.Segments`), so the decoder computes no padding at all. Micro-batches are
then filled first-fit, largest first, up to the budget. Either way the loss side sees the same
per-row [b, T-1] layout.

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

from learners.logprobs import PackedRows
from learners.shared_prompt import PackedSharedPrompt, SharedPrompt


def backward_scale(world_size: int) -> float:
    """Factor on each micro-batch loss before engine.backward (see the module docstring)."""
    return float(world_size)


@dataclass
class MicroBatch:
    """One forward/backward. The per-row tensors below are always the padded [b, T] layout (the
    loss works on it); what the decoder computes is `layout` when set."""

    input_ids: torch.Tensor        # [b, T] long, right-padded
    attention_mask: torch.Tensor   # [b, T] long
    loss_mask: torch.Tensor        # [b, T-1] float32: which log-probs enter the loss
    target_mask: torch.Tensor      # [b, T-1] bool: which log-probs to compute at all
    advantages: torch.Tensor       # [b] float32
    behaviour: torch.Tensor | None       # [b, T-1] float32 sampler log-probs (0 where absent)
    behaviour_mask: torch.Tensor | None  # [b, T-1] bool (False on rows without sampler log-probs)
    n_real: int                    # real sequences (0 for a filler micro-batch)
    # set: the shared-prompt forward (learners.shared_prompt), padded or packed
    shared: SharedPrompt | PackedSharedPrompt | None = None
    packed: PackedRows | None = None     # set: packed sequences, no shared prompt (learners.logprobs)

    @property
    def layout(self) -> SharedPrompt | PackedSharedPrompt | PackedRows | None:
        """What the decoder runs on, as `LogprobModule(..., shared=...)` takes it; None: input_ids."""
        return self.shared if self.shared is not None else self.packed

    @property
    def n_tokens(self) -> int:
        return int(self.loss_mask.sum())

    @property
    def token_slots(self) -> int:
        """Token positions the decoder computes, padding included."""
        return self.layout.padded_tokens if self.layout is not None else self.input_ids.numel()

    @property
    def encoded_tokens(self) -> int:
        """Real tokens the decoder computes (a shared prompt counts once)."""
        return self.layout.real_tokens if self.layout is not None else int(self.attention_mask.sum())

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


def filler_micro_batch(pad_id: int, shared_prompt: bool = False, packed: bool = False) -> MicroBatch:
    """Two padding tokens with an empty loss mask: keeps a rank with fewer sequences in step
    with the others (ZeRO-3 forward/backward are collectives) while adding zero gradient. With
    `shared_prompt` it runs the same two decoder passes as every other micro-batch; with
    `packed`, in the packed layout."""
    ids = torch.full((1, 2), pad_id, dtype=torch.long)
    zeros = torch.zeros(1, 1)
    one = torch.ones(1, dtype=torch.long)
    shared, rows = None, None
    if shared_prompt and packed:
        shared = PackedSharedPrompt.build([[pad_id]], [0], [[pad_id]])
    elif shared_prompt:
        shared = SharedPrompt(ids[:, :1], torch.ones_like(ids[:, :1]), one - 1, one, ids[:, 1:],
                              torch.ones_like(ids[:, 1:]))
    elif packed:
        rows = PackedRows.build([[pad_id, pad_id]])
    return MicroBatch(ids, torch.ones_like(ids), zeros, zeros.bool(), torch.zeros(1), None, None, 0, shared, rows)


def _by_length(ids: list[list[int]], size: int, keep_order: bool) -> list[list[int]]:
    """Micro-batches of `size` rows: longest first (similar lengths waste less padding) or in order."""
    order = list(range(len(ids))) if keep_order else sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    return [order[i:i + size] for i in range(0, len(order), size)]


def _by_prompt(ids: list[list[int]], plens: list[int], size: int, keep_order: bool) -> list[list[int]]:
    """Micro-batches of at most `size` rows that keep the rows sharing a prompt together: a group
    is cut into slices of `size` rows only when it is larger; slices are packed first-fit,
    longest first (or in order with `keep_order`, slices kept whole and in sequence)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (seq, p) in enumerate(zip(ids, plens)):
        groups.setdefault(tuple(seq[:p]), []).append(i)
    slices = [g[j:j + size] for g in groups.values() for j in range(0, len(g), size)]
    if keep_order:
        out: list[list[int]] = []
        for sl in slices:
            if out and len(out[-1]) + len(sl) <= size:
                out[-1] += sl
            else:
                out.append(list(sl))
        return out
    slices.sort(key=lambda sl: -max(len(ids[i]) for i in sl))
    bins: list[list[int]] = []
    for sl in slices:
        fit = next((b for b in bins if len(b) + len(sl) <= size), None)
        if fit is None:
            bins.append(list(sl))
        else:
            fit += sl
    return bins


def _by_tokens(ids: list[list[int]], plens: list[int], budget: int, keep_order: bool,
               shared_prompt: bool) -> list[list[int]]:
    """Micro-batches whose decoder tokens fit `budget`: a sequence's length, or with
    `shared_prompt` each distinct prompt once plus the responses. Units placed whole: a row; with
    `shared_prompt` a group (rows sharing a prompt), cut into slices only where it alone exceeds
    the budget; with `keep_order` consecutive (chosen, rejected) pairs, in order. First-fit,
    largest unit first (or in sequence with `keep_order`). A unit larger than the budget gets a
    micro-batch of its own."""
    def cost(rows: list[int]) -> int:
        if not shared_prompt:
            return sum(len(ids[i]) for i in rows)
        prompts = {tuple(ids[i][:plens[i]]) for i in rows}
        return sum(len(p) for p in prompts) + sum(len(ids[i]) - plens[i] for i in rows)

    if keep_order:
        units = [list(range(i, min(i + 2, len(ids)))) for i in range(0, len(ids), 2)]
    elif shared_prompt:
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (seq, p) in enumerate(zip(ids, plens)):
            groups.setdefault(tuple(seq[:p]), []).append(i)
        units = []
        for g in groups.values():
            units.append([])
            for i in g:
                if units[-1] and cost(units[-1] + [i]) > budget:
                    units.append([])
                units[-1].append(i)
    else:
        units = [[i] for i in range(len(ids))]
    bins: list[list[int]] = []
    if keep_order:
        for u in units:
            if bins and cost(bins[-1] + u) <= budget:
                bins[-1] += u
            else:
                bins.append(list(u))
        return bins
    sizes: list[int] = []
    for u in sorted(units, key=lambda u: -cost(u)):
        c = cost(u)
        # Fast reject by the plain sum (a shared prompt can only make the real cost smaller).
        k = next((k for k, b in enumerate(bins) if (sizes[k] + c <= budget or shared_prompt)
                  and cost(b + u) <= budget), None)
        if k is None:
            bins.append(list(u))
            sizes.append(c)
        else:
            bins[k] += u
            sizes[k] = cost(bins[k])
    return bins


def _packed_shared(ids: list[list[int]], plens: list[int], rows: list[int]) -> PackedSharedPrompt:
    prompts: dict[tuple[int, ...], int] = {}
    group_index = [prompts.setdefault(tuple(ids[i][:plens[i]]), len(prompts)) for i in rows]
    return PackedSharedPrompt.build([list(p) for p in prompts], group_index, [ids[i][plens[i]:] for i in rows])


def _shared_prompt(ids: list[list[int]], plens: list[int], rows: list[int], pad_id: int) -> SharedPrompt:
    """The micro-batch's distinct prompts (once each) and its responses, right-padded."""
    prompts: dict[tuple[int, ...], int] = {}
    group_index = [prompts.setdefault(tuple(ids[i][:plens[i]]), len(prompts)) for i in rows]
    p_max = max(len(p) for p in prompts)
    prompt_ids = torch.full((len(prompts), p_max), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(prompts), p_max), dtype=torch.long)
    for k, prompt in enumerate(prompts):
        prompt_ids[k, :len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        prompt_mask[k, :len(prompt)] = 1
    r_max = max(len(ids[i]) - plens[i] for i in rows)
    resp_ids = torch.full((len(rows), r_max), pad_id, dtype=torch.long)
    resp_mask = torch.zeros((len(rows), r_max), dtype=torch.long)
    for j, i in enumerate(rows):
        resp = ids[i][plens[i]:]
        resp_ids[j, :len(resp)] = torch.tensor(resp, dtype=torch.long)
        resp_mask[j, :len(resp)] = 1
    return SharedPrompt(prompt_ids, prompt_mask, torch.tensor(group_index, dtype=torch.long),
                        torch.tensor([plens[i] for i in rows], dtype=torch.long), resp_ids, resp_mask)


def build_micro_batches(batch: dict[str, Any], micro_batch_size: int, pad_id: int,
                        keep_order: bool = False, shared_prompt: bool = False,
                        token_budget: int | None = None) -> list[MicroBatch]:
    """Validate one rank's batch and pad it into micro-batches of at most `micro_batch_size`
    sequences, longest first (similar lengths together waste less padding), or in the given
    order with `keep_order` (preference pairs: chosen, rejected, chosen, ...). With
    `shared_prompt` the rows that share a prompt stay together and each micro-batch carries its
    prompts once (`MicroBatch.shared`); a loss mask may then cover response tokens only.
    With `token_budget` the micro-batches are packed instead (see the module docstring and
    `_by_tokens`; `micro_batch_size` is then not used): `MicroBatch.packed`, or with
    `shared_prompt` a `PackedSharedPrompt` in `MicroBatch.shared`."""
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
    if token_budget is not None:
        if token_budget < 2:
            raise ValueError(f"token_budget must be >= 2 (got {token_budget})")
        row_lists = _by_tokens(ids, plens, token_budget, keep_order, shared_prompt)
    elif shared_prompt:
        row_lists = _by_prompt(ids, plens, micro_batch_size, keep_order)
    else:
        row_lists = _by_length(ids, micro_batch_size, keep_order)
    out = []
    for rows in row_lists:
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
                if shared_prompt and bool(loss_mask[j, :p - 1].any()):
                    raise ValueError(f"loss_mask[{i}] covers prompt tokens, which the shared-prompt forward "
                                     "does not score; set learner.shared_prompt: false")
            else:
                loss_mask[j, p - 1:n - 1] = 1.0
            if beh is not None and behaviour[i] is not None:
                beh[j, :n - 1] = torch.tensor(_to_targets(behaviour[i], p, n, f"behaviour_logprobs[{i}]"))
                has_beh[j] = True
        shared, packed = None, None
        if shared_prompt:
            shared = _shared_prompt(ids, plens, rows, pad_id) if token_budget is None else _packed_shared(ids, plens, rows)
        elif token_budget is not None:
            packed = PackedRows.build([ids[i] for i in rows])
        out.append(MicroBatch(
            input_ids, attn, loss_mask, resp_mask | (loss_mask > 0),
            torch.tensor([float(advs[i]) for i in rows]),
            beh, resp_mask & has_beh if beh is not None else None, len(rows), shared, packed))
    return out
