"""Weight transport: how the learner's new weights reach the inference engines.

One small interface, two sides. The learner's rank 0 is the *sender* (rank 0 of a dedicated
process group); every inference worker is a *receiver* (ranks 1..N). The group is separate from
DeepSpeed's training group so that a weight update never interleaves with gradient all-reduces.

Small tensors are packed into flat buckets (one broadcast per bucket rather than per parameter:
a 135M-parameter model has ~270 tensors and each collective has a fixed cost); a tensor of at
least a bucket's size travels alone and as it is, without a copy. Both sides derive the same
layout from the same `TensorMeta` list, which the driver fetches from the learner once and hands
to the receivers, so only raw bytes travel per update.

Broadcasts are pipelined: the sender prepares bucket k+1 (asks its iterator for the next tensor,
packs small ones into one of two reused buffers) while bucket k is on the wire, and a receiver
posts bucket k+1 before handing bucket k to the engine. Copies and fresh memory are what cost:
on the 2-core CPU measured, packing every tensor into new 256 MiB buckets made the transport
~7x slower than one raw broadcast of the same bytes (benchmarks/weight_sync.py).
"""
from __future__ import annotations

import datetime
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.distributed as dist

DEFAULT_BUCKET_BYTES = 64 << 10
"""Tensors smaller than this (norms, biases) are packed together; larger ones (nearly all the
bytes) go unpacked, one broadcast each: on the CPU measured, packing even 1 MiB buckets cost
more than the broadcasts it saved."""


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


def _check_shape(m: TensorMeta, t: torch.Tensor) -> None:
    if tuple(t.shape) != m.shape:
        raise ValueError(f"weight {m.name}: shape {tuple(t.shape)} != announced {m.shape}")


def plan_buckets(metas: list[TensorMeta], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[list[TensorMeta]]:
    """Split `metas` (in order) into same-dtype buckets of at most `bucket_bytes` (a larger
    tensor gets a bucket of its own; a bucket of one tensor travels unpacked). Sender and
    receiver must call this identically."""
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
        self.last_receive_buffers: dict[str, int] = {}  # buffers the last receive allocated / reused

    def send(self, metas: list[TensorMeta], tensors: Iterable[torch.Tensor]) -> None:
        """A tensor that travels alone (one of a bucket's size or more) is broadcast from its own
        storage when it is already in the announced dtype on the transport's device: it must
        stay unchanged until two more tensors have been asked for (the learner hands over
        private copies). Packed tensors are copied before the next one is asked for."""
        it = iter(tensors)
        buffers: list[torch.Tensor | None] = [None, None]  # bucket i packs into buffers[i % 2]
        inflight = None
        try:
            for i, bucket in enumerate(plan_buckets(metas, self.bucket_bytes)):
                # buffers[i % 2] last held bucket i-2, whose broadcast was waited for below.
                flat = self._pack(bucket, it, buffers, i % 2)
                if inflight is not None:
                    inflight[0].wait()
                inflight = (self.group.broadcast(flat, 0), flat)
        finally:  # also on an error: never free a buffer a broadcast still reads
            if inflight is not None:
                inflight[0].wait()

    def _pack(self, bucket: list[TensorMeta], it: Iterator[torch.Tensor], buffers: list[torch.Tensor | None],
              slot: int) -> torch.Tensor:
        """The bucket as one flat tensor in the announced dtype on the transport's device: a lone
        tensor as it is (cast, moved or made contiguous only if needed), several copied in
        order into `buffers[slot]`."""
        if len(bucket) == 1:
            m, t = bucket[0], next(it)
            _check_shape(m, t)
            return t.detach().to(device=self.device, dtype=m.torch_dtype).reshape(-1)
        n, dtype = sum(m.numel for m in bucket), bucket[0].torch_dtype
        buf = buffers[slot]
        if buf is None or buf.dtype != dtype or buf.numel() < n:
            buf = buffers[slot] = torch.empty(max(n, self.bucket_bytes // dtype.itemsize), dtype=dtype,
                                              device=self.device)
        flat, offset = buf[:n], 0
        for m in bucket:
            t = next(it)
            _check_shape(m, t)
            flat[offset:offset + m.numel].copy_(t.detach().reshape(-1))
            offset += m.numel
        return flat

    def receive(self, metas: list[TensorMeta]) -> Iterator[tuple[str, torch.Tensor]]:
        """Each bucket lands in a buffer nothing else refers to (the engine may hold views of a
        bucket until the layer they belong to is complete, which can be in a later bucket), and
        the next bucket is already on its way while the consumer loads this one."""
        buckets = plan_buckets(metas, self.bucket_bytes)
        buffers = ReceiveBuffers(self.device)

        def post(bucket: list[TensorMeta]) -> tuple[object, torch.Tensor]:
            flat = buffers.take(sum(m.numel for m in bucket), bucket[0].torch_dtype)
            return self.group.broadcast(flat, 0), flat

        nxt = post(buckets[0]) if buckets else None
        try:
            for i, bucket in enumerate(buckets):
                work, flat = nxt
                nxt = None
                work.wait()
                nxt = post(buckets[i + 1]) if i + 1 < len(buckets) else None
                offset = 0
                for m in bucket:
                    yield m.name, flat[offset:offset + m.numel].view(m.shape)
                    offset += m.numel
                buffers.release(flat)
        finally:  # closed early: never free a buffer a broadcast still writes into
            if nxt is not None:
                nxt[0].wait()
            self.last_receive_buffers = {"allocated": buffers.allocated, "reused": buffers.reused}

    def close(self) -> None:
        # Dropping the references tears the group down; there is no public destroy for an
        # unregistered group.
        self.group = None
        self._store = None


class ReceiveBuffers:
    """A receiver's flat bucket buffers for one update, each handed out again (its front, to a
    later bucket of the same dtype that fits: typically the next layer's twin) once nothing but
    this pool refers to its memory, i.e. the consumer dropped every view of it.

    Why: a fresh CPU tensor of the bucket's size is fresh pages, and the first touch of each
    costs a page fault; receiving a model into fresh memory took twice a raw broadcast into a
    warm buffer (benchmarks/weight_sync.py). Reusing the buffers of one update keeps nothing
    resident between updates (the pool is dropped with the update). CPU only: a CUDA tensor
    comes from PyTorch's caching allocator, which already reuses memory, and a kernel still
    reading a buffer is invisible to the reference count checked here.
    """

    def __init__(self, device: torch.device):
        use_count = getattr(torch._C, "_storage_Use_Count", None)  # private API: absent = no reuse
        self._use_count = use_count if device.type == "cpu" else None
        self.device = device
        self._alone: dict[int, int] = {}  # id(buffer) -> its storage's reference count unshared
        self._free: list[torch.Tensor] = []  # released by the transport; maybe still viewed
        self.allocated = self.reused = 0

    def _refs(self, t: torch.Tensor) -> int:
        return int(self._use_count(t.untyped_storage()._cdata))

    def take(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat buffer of `numel` elements: the front of the smallest released buffer big
        enough that nothing else refers to any more, or a new one."""
        fits = [(t.numel(), i) for i, t in enumerate(self._free)
                if t.dtype == dtype and t.numel() >= numel and self._refs(t) == self._alone[id(t)]]
        if fits:
            base = self._free.pop(min(fits)[1])
            self.reused += 1
        else:
            self.allocated += 1
            base = torch.empty(numel, dtype=dtype, device=self.device)
            if self._use_count is None:  # no reuse: nothing kept, freed as the consumer drops it
                return base
            self._alone[id(base)] = self._refs(base)  # before any view of it exists
        return base if base.numel() == numel else base[:numel]

    def release(self, t: torch.Tensor) -> None:
        """`t` (from `take`) is no longer written or read by the transport; its buffer is handed
        out again once the consumer's views of it are gone too."""
        if self._use_count is None:
            return
        base = t if t._base is None else t._base  # take() hands out a buffer or its front
        if id(base) in self._alone:
            self._free.append(base)


def make_transport(host: str, port: int, rank: int, world_size: int, backend: str, device: str,
                   bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> WeightTransport:
    """Factory used by both sides so they agree on the implementation."""
    return ProcessGroupTransport(host, port, rank, world_size, backend, device, bucket_bytes)
