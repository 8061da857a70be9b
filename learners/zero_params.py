"""Reading full parameters out of a (possibly ZeRO-3-partitioned) model, a bucket at a time.

Under ZeRO-3 each rank holds 1/W of every parameter; `GatheredParameters` all-gathers a list of
them for the duration of a `with` block. Every rank must enter the same blocks in the same
order (they are collectives), so all helpers here are called on every rank; only the caller on
rank 0 looks at the values. Gathering in buckets bounds the extra memory to one bucket rather
than the whole model.
"""
from __future__ import annotations

from typing import Iterator

import deepspeed
import torch
from torch import nn


def full_shape(p: nn.Parameter) -> tuple[int, ...]:
    """Unpartitioned shape: ZeRO-3 leaves the local tensor empty and records it as ds_shape."""
    return tuple(getattr(p, "ds_shape", p.shape))


def full_numel(p: nn.Parameter) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


def dtype_name(p: nn.Parameter) -> str:
    return str(p.dtype).removeprefix("torch.")


def _buckets(params: list[nn.Parameter], bucket_bytes: int) -> list[list[nn.Parameter]]:
    out: list[list[nn.Parameter]] = []
    size = 0
    for p in params:
        nbytes = full_numel(p) * p.element_size()
        if not out or size + nbytes > bucket_bytes:
            out.append([])
            size = 0
        out[-1].append(p)
        size += nbytes
    return out


def iter_full_params(params: list[nn.Parameter], *, rank: int, zero3: bool, private: bool = True,
                     bucket_bytes: int = 128 << 20) -> Iterator[torch.Tensor | None]:
    """Yield each parameter's full value in order on rank 0, None elsewhere; must be driven to
    the end on every rank.

    Under ZeRO-3 the values are copies, taken inside the gather block because the gathered
    storage is released (and may be reused) when the block exits; a gather bucket's copies of
    one dtype are views of one flat buffer, in order, so the weight transport sends them without
    another copy (`rlsys.weight_sync.adjacent_span`). Unpartitioned, with `private=False`, a
    value is the parameter itself, detached (for a reader done before the parameters change:
    the weight broadcast, where copying the model per update cost more than sending it);
    otherwise a clone.
    """
    if not zero3:
        yield from (None if rank != 0 else p.detach().clone() if private else p.detach() for p in params)
        return
    for bucket in _buckets(params, bucket_bytes):
        with deepspeed.zero.GatheredParameters(bucket, modifier_rank=None):
            copies = _flat_copies(bucket) if rank == 0 else [None] * len(bucket)
        yield from copies


def _flat_views(params: list[nn.Parameter]) -> Iterator[tuple[nn.Parameter, torch.Tensor]]:
    """Each parameter with its place in one new buffer (same dtype and device as the first), in
    order and back to back: the one layout both the gathered copies and the packed parameters use."""
    first = params[0]
    flat = torch.empty(sum(p.numel() for p in params), dtype=first.dtype, device=first.device)
    offset = 0
    for p in params:
        yield p, flat[offset:offset + p.numel()].view(p.shape)
        offset += p.numel()


def _flat_copies(params: list[nn.Parameter]) -> list[torch.Tensor]:
    """Copies of `params` as consecutive views of one new buffer (one per parameter when their
    dtypes or devices differ)."""
    first = params[0]
    if any(p.dtype != first.dtype or p.device != first.device for p in params):
        return [p.detach().clone() for p in params]
    return [view.copy_(p.detach()) for p, view in _flat_views(params)]


def pack_parameters(module: nn.Module) -> int:
    """Make `module`'s parameters consecutive views of one flat buffer per (dtype, device), in
    `named_parameters` order (a tied parameter once), so the weight broadcast sends them as a
    few spans without a copy. Values, `requires_grad` and identities are kept (an optimizer
    holding the parameters is unaffected: its state is per parameter object). Skipped, returning
    0, where any parameter already shares its storage (a framework that flattened them itself)
    or is partitioned; otherwise returns the bytes packed. Unpartitioned parameters only."""
    params = [p for _, p in module.named_parameters()]
    if not params or any(hasattr(p, "ds_id") or p.untyped_storage().nbytes() != p.numel() * p.element_size()
                         for p in params):
        return 0
    groups: dict[tuple[torch.dtype, torch.device], list[nn.Parameter]] = {}
    for p in params:
        groups.setdefault((p.dtype, p.device), []).append(p)
    with torch.no_grad():
        for group in groups.values():
            for p, view in _flat_views(group):  # one at a time: each old storage is freed once copied
                p.data = view.copy_(p.data)
    return sum(p.numel() * p.element_size() for p in params)


def digest(t: torch.Tensor) -> list[float]:
    """[float64 sum, first, middle (numel // 2), last value] of a full tensor, all as float64."""
    flat = t.reshape(-1)
    n = flat.numel()
    return [float(flat.to(torch.float64).sum()), float(flat[0]), float(flat[n // 2]), float(flat[n - 1])]
