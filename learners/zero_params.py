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


def iter_full_params(params: list[nn.Parameter], *, rank: int, zero3: bool,
                     bucket_bytes: int = 128 << 20) -> Iterator[torch.Tensor | None]:
    """Yield each parameter's full value in order: a private copy on rank 0, None elsewhere.

    The copy is taken inside the gather block because the gathered storage is released (and may
    be reused) when the block exits. Must be driven to the end on every rank.
    """
    for bucket in _buckets(params, bucket_bytes):
        with deepspeed.zero.GatheredParameters(bucket, modifier_rank=None, enabled=zero3):
            copies = [p.detach().clone() if rank == 0 else None for p in bucket]
        yield from copies


def digest(t: torch.Tensor) -> list[float]:
    """[float64 sum, first, middle (numel // 2), last value] of a full tensor, all as float64."""
    flat = t.reshape(-1)
    n = flat.numel()
    return [float(flat.to(torch.float64).sum()), float(flat[0]), float(flat[n // 2]), float(flat[n - 1])]
