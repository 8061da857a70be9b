"""Weight transport: how the learner's new weights reach the inference engines.

One small interface, two sides. The learner's rank 0 is the *sender* (rank 0 of a dedicated
process group); every inference worker is a *receiver* (ranks 1..N). The group is separate from
DeepSpeed's training group so that a weight update never interleaves with gradient all-reduces.

Tensors are packed into flat buckets of up to 16 MiB (one broadcast per bucket rather than per
parameter: a 135M-parameter model has ~270 tensors and each collective has a fixed cost); a
tensor of at least a bucket's size travels alone. Both sides derive the same layout from the
same `TensorMeta` list, which the driver fetches from the learner once and hands to the
receivers, so only raw bytes travel per update. The learner holds its tensors back to back in
one buffer (`learners.zero_params`), so a bucket is a span of that buffer and is sent without a
copy (`adjacent_span`); only tensors that lie apart are copied into a send buffer.

Broadcasts are pipelined: the sender prepares bucket k+1 (asks its iterator for its tensors)
while bucket k is on the wire, and a receiver keeps buckets k+1 and k+2 posted while it waits
for bucket k and hands it to the engine, into buffers it keeps warm across updates. Copies,
fresh memory, a socket waiting for a posted buffer and the number of collectives are what cost:
on the 2-core CPU measured, packing every tensor into new 256 MiB buckets made the transport
~7x slower than one raw broadcast of the same bytes, one broadcast per tensor ~2x, copying each
16 MiB bucket ~2.5x; sending spans of the learner's buffer to a receiver that posted only the
next bucket once the current one arrived, into fresh buffers per update, ~1.6x; with two
buckets posted ahead into kept buffers, 0.9-1.4x (benchmarks/weight_sync.py).
"""
from __future__ import annotations

import collections
import datetime
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.distributed as dist

DEFAULT_BUCKET_BYTES = 16 << 20
"""Tensors smaller than this are packed together (a SmolLM2-135M layer is ~14 MB: about one
broadcast per layer), larger ones travel alone. Packing costs no copy where the sender holds a
bucket's tensors back to back in one storage, as the learner does (its parameters under ZeRO-0,
its gathered copies under ZeRO-3); elsewhere (merged LoRA weights) the bucket is copied into a
reused buffer. On the 2-core CPU measured, 16 MiB slices of one warm buffer broadcast at
~0.85x of one broadcast of the whole, one broadcast per tensor (241) at 0.4-0.5x."""


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


def adjacent_span(tensors: list[torch.Tensor], dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """One flat view over `tensors` when they lie back to back, in order, in one storage (each
    contiguous, of `dtype`, on `device`), else None: such a bucket is broadcast without a copy."""
    first = tensors[0]
    storage, end = first.untyped_storage().data_ptr(), first.data_ptr()
    for t in tensors:
        if t.dtype != dtype or t.device != device or not t.is_contiguous() or t.data_ptr() != end \
                or t.untyped_storage().data_ptr() != storage:
            return None
        end += t.numel() * t.element_size()
    return first.as_strided((sum(t.numel() for t in tensors),), (1,), first.storage_offset())

RECEIVE_AHEAD = 2
"""Buckets a receiver keeps posted beyond the one it is waiting for or handing to the engine.
In a probe of gloo on the 2-core CPU measured (16 MiB slices of one warm 538 MB buffer), a
receiver that posted each bucket only once the one before had arrived took 1.6-2x one raw
broadcast of the same bytes, one that kept two posted ahead 1.0-1.2x: the sender's bytes
never wait for a posted buffer."""


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
        self._receive_buffers = ReceiveBuffers(self.device)  # kept across updates (warm pages)
        self.last_receive_buffers: dict[str, int] = {}  # buffers the last receive allocated / reused
        self.last_send_buckets: dict[str, int] = {}  # the last send's buckets: sent as they lay / copied

    def send(self, metas: list[TensorMeta], tensors: Iterable[torch.Tensor]) -> None:
        """A bucket whose tensors lie back to back in one storage (a lone tensor, or adjacent
        views of one flat buffer), in the announced dtype on the transport's device, is
        broadcast from that storage: it must stay unchanged until the tensors of the bucket
        after next are asked for. Other buckets are copied before the next one is asked for."""
        it = iter(tensors)
        buffers: list[torch.Tensor | None] = [None, None]  # bucket i packs into buffers[i % 2]
        inflight = None
        copied = sent = 0
        try:
            for i, bucket in enumerate(plan_buckets(metas, self.bucket_bytes)):
                # buffers[i % 2] last held bucket i-2, whose broadcast was waited for below.
                flat, was_copied = self._pack(bucket, it, buffers, i % 2)
                copied += was_copied
                sent += 1
                if inflight is not None:
                    inflight[0].wait()
                inflight = (self.group.broadcast(flat, 0), flat)
        finally:  # also on an error: never free a buffer a broadcast still reads
            if inflight is not None:
                inflight[0].wait()
                if self.device.type == "cuda":
                    # NCCL's wait only orders the current stream after the broadcast: without
                    # this the sender's seconds (time/sync_send) would stop before the bytes moved.
                    torch.cuda.synchronize(self.device)
            self.last_send_buckets = {"as_they_lay": sent - copied, "copied": copied}

    def _pack(self, bucket: list[TensorMeta], it: Iterator[torch.Tensor], buffers: list[torch.Tensor | None],
              slot: int) -> tuple[torch.Tensor, bool]:
        """The bucket as one flat tensor in the announced dtype on the transport's device, and
        whether it was copied: a lone tensor as it is (cast, moved or made contiguous only if
        needed), tensors lying back to back in one storage as the view that spans them, others
        copied in order into `buffers[slot]`."""
        if len(bucket) == 1:
            m, t = bucket[0], next(it).detach()
            _check_shape(m, t)
            flat = t.to(device=self.device, dtype=m.torch_dtype).reshape(-1)
            return flat, flat.data_ptr() != t.data_ptr()
        n, dtype = sum(m.numel for m in bucket), bucket[0].torch_dtype
        ts = [next(it).detach() for _ in bucket]
        for m, t in zip(bucket, ts):
            _check_shape(m, t)
        span = adjacent_span(ts, dtype, self.device)
        if span is not None:
            return span, False
        buf = buffers[slot]
        if buf is None or buf.dtype != dtype or buf.numel() < n:
            buf = buffers[slot] = torch.empty(max(n, self.bucket_bytes // dtype.itemsize), dtype=dtype,
                                              device=self.device)
        flat, offset = buf[:n], 0
        for m, t in zip(bucket, ts):
            flat[offset:offset + m.numel].copy_(t.reshape(-1))
            offset += m.numel
        return flat, True

    def receive(self, metas: list[TensorMeta]) -> Iterator[tuple[str, torch.Tensor]]:
        """Each bucket lands in a buffer nothing else refers to (the engine may hold views of a
        bucket until the layer they belong to is complete, which can be in a later bucket), and
        the next `RECEIVE_AHEAD` buckets are already posted while the consumer loads this one."""
        buckets = plan_buckets(metas, self.bucket_bytes)
        buffers = self._receive_buffers
        buffers.allocated = buffers.reused = 0
        posted: collections.deque[tuple[object, torch.Tensor]] = collections.deque()
        next_post = 0

        def post_up_to(last: int) -> None:
            nonlocal next_post
            while next_post <= min(last, len(buckets) - 1):
                bucket = buckets[next_post]
                flat = buffers.take(sum(m.numel for m in bucket), bucket[0].torch_dtype)
                posted.append((self.group.broadcast(flat, 0), flat))
                next_post += 1

        try:
            for i, bucket in enumerate(buckets):
                post_up_to(i + RECEIVE_AHEAD)
                work, flat = posted.popleft()
                work.wait()
                offset = 0
                for m in bucket:
                    yield m.name, flat[offset:offset + m.numel].view(m.shape)
                    offset += m.numel
                buffers.release(flat)
        finally:  # closed early: never free a buffer a broadcast still writes into
            for work, _ in posted:
                work.wait()
            buffers.keep(RECEIVE_AHEAD + 1)
            self.last_receive_buffers = {"allocated": buffers.allocated, "reused": buffers.reused}

    def close(self) -> None:
        # Dropping the references tears the group down; there is no public destroy for an
        # unregistered group.
        self.group = None
        self._store = None
        self._receive_buffers = ReceiveBuffers(self.device)


class ReceiveBuffers:
    """A receiver's flat bucket buffers, each handed out again (its front, to a later bucket of
    the same dtype that fits: typically the next layer's twin) once nothing but this pool refers
    to its memory, i.e. the consumer dropped every view of it.

    Why: a fresh CPU tensor of the bucket's size is fresh pages, and the first touch of each
    costs a page fault; receiving a model into fresh memory took 2-3x a raw broadcast into a
    warm buffer (benchmarks/weight_sync.py). Between updates the pool keeps only its few largest
    released buffers (`keep`): the next update's first buckets land in warm memory, at a
    resident cost of a few buckets (on SmolLM2-135M fp32: the 113 MB embedding and three 16 MiB
    buckets). CPU only: a CUDA tensor comes from PyTorch's caching allocator, which already
    keeps and reuses memory, and a kernel still reading a buffer is invisible to the reference
    count checked here.
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

    def keep(self, n: int) -> None:
        """Hold on to the `n` largest released buffers only (the rest are freed once the
        consumer's views of them are gone) and forget every buffer not held."""
        self._free = sorted(self._free, key=lambda t: t.numel() * t.element_size(), reverse=True)[:n]
        self._alone = {id(t): self._alone[id(t)] for t in self._free}


Place = tuple[str, tuple[str, ...]]
"""Where a rank runs: its node's address and the GPU ids Ray assigned it there (empty: none)."""


def choose_backend(requested: str, accelerator_backend: str, sender: Place,
                   receivers: list[Place]) -> tuple[str, str]:
    """The weight-sync group's backend ("gloo" or "nccl") and why, from the configured
    `cluster.weight_sync_backend`, the learner's accelerator backend and where learner rank 0
    (`sender`) and each rollout engine (`receivers`, in engine order) were placed.

    NCCL needs a GPU on every rank, and refuses two ranks of one group on one GPU ("Duplicate
    GPU detected" at the first broadcast), which is where a learner and an engine given
    fractional `num_gpus` end up on a one-GPU machine. There `auto` takes gloo, which stages the
    weights through host memory, and an explicit `nccl` is refused (ValueError) naming the
    engines and the fix."""
    if requested == "gloo":
        return "gloo", "cluster.weight_sync_backend is gloo"
    host, gpus = sender
    bare = [i for i, (_, g) in enumerate(receivers) if not g]
    common = {i: sorted(set(g) & set(gpus)) for i, (h, g) in enumerate(receivers) if h == host}
    shared = {i: g for i, g in common.items() if g}
    obstacle = ("learner rank 0 has no GPU" if not gpus else
                f"rollout engine(s) {bare} have no GPU" if bare else
                "rollout engine(s) " + ", ".join(f"{i} (GPU {','.join(g)})" for i, g in shared.items())
                + f" share a GPU with learner rank 0 on {host}, and NCCL cannot put two ranks on one GPU"
                if shared else None)
    if requested == "nccl":
        if obstacle:
            raise ValueError(f"cluster.weight_sync_backend: nccl cannot work here: {obstacle}. Set it to auto "
                             "(gloo through host memory where NCCL cannot work) or gloo, or give the learner "
                             "and the engines GPUs of their own (learner.num_gpus: 1, rollout.num_gpus: 1)")
        return "nccl", "cluster.weight_sync_backend is nccl"
    if requested != "auto":
        raise ValueError(f"cluster.weight_sync_backend: {requested!r} is not one of auto, gloo, nccl")
    if accelerator_backend != "nccl":
        return "gloo", f"the learner's accelerator communicates over {accelerator_backend}"
    if obstacle:
        return "gloo", f"{obstacle}: gloo through host memory instead of NCCL"
    return "nccl", "learner rank 0 and every engine each on a GPU of its own"


def make_transport(host: str, port: int, rank: int, world_size: int, backend: str, device: str,
                   bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> WeightTransport:
    """Factory used by both sides so they agree on the implementation."""
    return ProcessGroupTransport(host, port, rank, world_size, backend, device, bucket_bytes)
