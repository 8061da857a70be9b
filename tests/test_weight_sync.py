"""rlsys.weight_sync without an engine: two processes on 127.0.0.1 over gloo, the transport's
pipelined buckets (sender packs bucket k+1 while k is on the wire, receiver posts k+1 before
yielding k) delivering every tensor bit for bit, across dtypes, bucket sizes and a tensor larger
than a bucket, over several updates of different values, whether the consumer copies each tensor
out at once or keeps every view until the update is complete (as vLLM does per layer)."""
from __future__ import annotations

import pytest
import torch

from rlsys.weight_sync import TensorMeta, plan_buckets

METAS = [TensorMeta("a", (3, 5), "float32"), TensorMeta("b", (7,), "float32"), TensorMeta("big", (40, 10), "float32"),
         TensorMeta("c", (2, 2), "bfloat16"), TensorMeta("d", (9,), "bfloat16"), TensorMeta("e", (1,), "float32"),
         TensorMeta("f", (6, 6), "float32")]
# Same-size tensors in a row, like a model's layers: consecutive buckets of one size, so a
# receive buffer reused while its bucket is still in flight or being read would be caught.
SENT = METAS + [TensorMeta(f"layer{i}", (4, 8), "float32") for i in range(6)]


def _tensors(metas, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(m.shape, generator=gen, dtype=torch.float32).to(m.torch_dtype) for m in metas]


def test_plan_buckets_split_on_dtype_and_size():
    buckets = plan_buckets(METAS, bucket_bytes=128)
    assert [[m.name for m in b] for b in buckets] == [["a", "b"], ["big"], ["c", "d"], ["e"], ["f"]]
    assert [m for b in buckets for m in b] == METAS   # order kept
    assert len(plan_buckets(METAS, bucket_bytes=1 << 20)) == 3   # only the dtype changes split


def _rank(rank: int, port: int, bucket_bytes: int, hold_views: bool, queue) -> None:
    from rlsys.weight_sync import make_transport

    t = make_transport("127.0.0.1", port, rank, 2, "gloo", "cpu", bucket_bytes)
    try:
        for update in range(3):  # the group stays in step across updates
            if rank == 0:
                t.send(SENT, iter(_tensors(SENT, seed=update)))  # private tensors, as the learner's
            elif hold_views:  # an engine that keeps every view until the update is complete
                got = list(t.receive(SENT))
                queue.put(([(n, x.tolist(), str(x.dtype)) for n, x in got], t.last_receive_buffers))
            else:  # one that copies each tensor out at once
                got = [(n, x.clone()) for n, x in t.receive(SENT)]
                queue.put(([(n, x.tolist(), str(x.dtype)) for n, x in got], t.last_receive_buffers))
    finally:
        t.close()


@pytest.mark.parametrize("bucket_bytes,hold_views", [(64, False), (200, True), (200, False), (1 << 20, False)])
def test_transport_delivers_every_tensor_exactly(bucket_bytes, hold_views):
    import torch.multiprocessing as mp

    from rlsys.cluster import free_port

    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, bucket_bytes, hold_views, queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in range(3)]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    for update, (got, buffers) in enumerate(results):
        # Buffers are reused once the consumer dropped its views (the six same-size layers), never
        # while it holds them; either way every value arrives exact.
        n_buckets = len(plan_buckets(SENT, bucket_bytes))
        assert buffers["allocated"] + buffers["reused"] == n_buckets
        assert (buffers["reused"] == 0) if hold_views else (buffers["reused"] > 0 or bucket_bytes > 1000), buffers
        want = _tensors(SENT, seed=update)
        assert [n for n, _, _ in got] == [m.name for m in SENT]
        for (n, values, dtype), w in zip(got, want):
            assert dtype == str(w.dtype) and torch.equal(torch.tensor(values, dtype=w.dtype), w), (update, n)
