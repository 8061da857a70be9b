"""Weight transport: how the learner's new weights reach the inference engines.

One small interface, two sides. The learner's rank 0 is the *sender* (rank 0 of a dedicated
process group); every inference worker is a *receiver* (ranks 1..N). The group is separate from
DeepSpeed's training group so that a weight update never interleaves with gradient all-reduces.

Tensors are packed into flat buckets (one broadcast per bucket rather than per parameter: a
135M-parameter model has ~270 tensors and each collective has a fixed cost). Both sides derive
the same bucket layout from the same `TensorMeta` list, which the driver fetches from the
learner once and hands to the receivers, so only raw bytes travel per update.
"""
from __future__ import annotations

import datetime
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.distributed as dist

DEFAULT_BUCKET_BYTES = 256 << 20


@dataclass(frozen=True)
class TensorMeta:
    """Name, shape and dtype (as a string such as 'bfloat16') of one parameter."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def plan_buckets(metas: list[TensorMeta], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[list[TensorMeta]]:
    """Split `metas` (in order) into same-dtype buckets of at most `bucket_bytes` (a larger
    tensor gets a bucket of its own). Sender and receiver must call this identically."""
    buckets: list[list[TensorMeta]] = []
    size = 0
    for m in metas:
        nbytes = m.numel * m.torch_dtype.itemsize
        if not buckets or buckets[-1][0].dtype != m.dtype or size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(m)
        size += nbytes
    return buckets


class WeightTransport(ABC):
    """Moves named tensors from the sender to every receiver."""

    @abstractmethod
    def send(self, metas: list[TensorMeta], tensors: Iterable[torch.Tensor]) -> None:
        """Sender side: `tensors` yields one tensor per entry of `metas`, in order."""

    @abstractmethod
    def receive(self, metas: list[TensorMeta]) -> Iterator[tuple[str, torch.Tensor]]:
        """Receiver side: yields (name, tensor) in `metas` order as buckets arrive."""

    def close(self) -> None:
        """Release the transport's resources."""


class ProcessGroupTransport(WeightTransport):
    """Broadcast over a standalone torch process group: gloo on CPU, NCCL on GPU.

    Built from public API only (TCPStore + PrefixStore + ProcessGroupGloo/NCCL) so that it can
    coexist with the default group DeepSpeed owns in the learner and with vLLM's own groups in
    the inference workers.
    """

    def __init__(self, host: str, port: int, rank: int, world_size: int, backend: str = "gloo",
                 device: str = "cpu", bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 timeout_s: float = 600.0, group_name: str = "rlsys-weights"):
        timeout = datetime.timedelta(seconds=timeout_s)
        # Rank 0 (the learner) hosts the store; receivers connect to it.
        store = dist.TCPStore(host, port, world_size, is_master=(rank == 0), timeout=timeout)
        store = dist.PrefixStore(group_name, store)
        if backend == "gloo":
            self.group = dist.ProcessGroupGloo(store, rank, world_size, timeout)
        elif backend == "nccl":
            self.group = dist.ProcessGroupNCCL(store, rank, world_size)
        else:
            raise ValueError(f"weight transport backend {backend!r} is not supported (gloo or nccl)")
        self._store = store
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.bucket_bytes = bucket_bytes

    def _broadcast(self, flat: torch.Tensor) -> None:
        self.group.broadcast(flat, 0).wait()

    def send(self, metas: list[TensorMeta], tensors: Iterable[torch.Tensor]) -> None:
        it = iter(tensors)
        for bucket in plan_buckets(metas, self.bucket_bytes):
            parts = []
            for m in bucket:
                t = next(it)
                if tuple(t.shape) != m.shape:
                    raise ValueError(f"weight {m.name}: shape {tuple(t.shape)} != announced {m.shape}")
                parts.append(t.detach().to(device=self.device, dtype=m.torch_dtype).reshape(-1))
            self._broadcast(torch.cat(parts) if len(parts) > 1 else parts[0].contiguous())

    def receive(self, metas: list[TensorMeta]) -> Iterator[tuple[str, torch.Tensor]]:
        for bucket in plan_buckets(metas, self.bucket_bytes):
            flat = torch.empty(sum(m.numel for m in bucket), dtype=bucket[0].torch_dtype, device=self.device)
            self._broadcast(flat)
            offset = 0
            for m in bucket:
                yield m.name, flat[offset:offset + m.numel].view(m.shape)
                offset += m.numel

    def close(self) -> None:
        # Dropping the references tears the group down; there is no public destroy for an
        # unregistered group.
        self.group = None
        self._store = None


def make_transport(host: str, port: int, rank: int, world_size: int, backend: str, device: str,
                   bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> WeightTransport:
    """Factory used by both sides so they agree on the implementation."""
    return ProcessGroupTransport(host, port, rank, world_size, backend, device, bucket_bytes)
