"""rlsys.weight_sync without an engine: two processes on 127.0.0.1 over gloo, the transport's
pipelined buckets (sender packs bucket k+1 while k is on the wire, receiver keeps the next
buckets posted while it yields k, into buffers kept across updates) delivering every tensor bit
for bit, across dtypes, bucket sizes and a tensor larger than a bucket, over several updates of
different values, whether the consumer copies each tensor out at once or keeps every view until
the update is complete (as vLLM does per layer), and whether the sender holds its tensors apart
(buckets copied) or packed in one buffer per dtype as the ZeRO-0 learner does (buckets sent as
they lie, no copy)."""
from __future__ import annotations

import pytest
import torch

from rlsys.weight_sync import RECEIVE_AHEAD, TensorMeta, plan_buckets

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


def _sent_tensors(update: int, packed: bool) -> list[torch.Tensor]:
    """The sender's tensors: each in its own allocation, or (`packed`) as the ZeRO-0 learner
    holds its parameters, consecutive views of one buffer per dtype (pack_parameters)."""
    ts = _tensors(SENT, seed=update)
    if not packed:
        return ts
    from torch import nn

    from learners.zero_params import pack_parameters

    module = nn.ParameterList([nn.Parameter(t, requires_grad=False) for t in ts])
    assert pack_parameters(module) == sum(t.numel() * t.element_size() for t in ts)
    assert all(torch.equal(p, t) for p, t in zip(module, ts))  # values kept
    return [p.detach() for p in module]


def _rank(rank: int, port: int, bucket_bytes: int, hold_views: bool, packed: bool, queue) -> None:
    from rlsys.weight_sync import make_transport

    t = make_transport("127.0.0.1", port, rank, 2, "gloo", "cpu", bucket_bytes)
    try:
        for update in range(3):  # the group stays in step across updates
            if rank == 0:
                t.send(SENT, iter(_sent_tensors(update, packed)))
                queue.put(("sent", update, t.last_send_buckets))
            elif hold_views:  # an engine that keeps every view until the update is complete
                got = list(t.receive(SENT))
                queue.put(("got", update, ([(n, x.tolist(), str(x.dtype)) for n, x in got], t.last_receive_buffers)))
            else:  # one that copies each tensor out at once
                got = [(n, x.clone()) for n, x in t.receive(SENT)]
                queue.put(("got", update, ([(n, x.tolist(), str(x.dtype)) for n, x in got], t.last_receive_buffers)))
    finally:
        t.close()


@pytest.mark.parametrize("bucket_bytes,hold_views,packed", [(64, False, False), (200, True, False),
                                                            (200, False, False), (200, False, True),
                                                            (1 << 20, False, False), (1 << 20, True, True)])
def test_transport_delivers_every_tensor_exactly(bucket_bytes, hold_views, packed):
    import torch.multiprocessing as mp

    from rlsys.cluster import free_port

    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, bucket_bytes, hold_views, packed, queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    reports = [queue.get(timeout=120) for _ in range(6)]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    buckets = plan_buckets(SENT, bucket_bytes)
    for _, _, sent in (r for r in reports if r[0] == "sent"):
        # A bucket of several tensors is copied into a send buffer unless they lie back to back.
        assert sent == {"as_they_lay": len(buckets) - (0 if packed else sum(len(b) > 1 for b in buckets)),
                        "copied": 0 if packed else sum(len(b) > 1 for b in buckets)}, sent
    results = [r[2] for r in sorted((r for r in reports if r[0] == "got"), key=lambda r: r[1])]
    for update, (got, buffers) in enumerate(results):
        # Buffers are reused once the consumer dropped its views (the six same-size layers), never
        # while it holds them: a consumer holding every view of the update reuses at most the
        # buffers kept from updates before it whose views it has dropped; either way every value
        # arrives exact.
        assert buffers["allocated"] + buffers["reused"] == len(buckets)
        if hold_views:
            assert buffers["reused"] <= (0 if update < 2 else RECEIVE_AHEAD + 1), buffers
        else:
            assert buffers["reused"] > 0 or bucket_bytes > 1000, buffers
        if update and not hold_views:  # the pool kept warm buffers for the next update's first buckets
            assert buffers["allocated"] < results[0][1]["allocated"], buffers
        want = _tensors(SENT, seed=update)
        assert [n for n, _, _ in got] == [m.name for m in SENT]
        for (n, values, dtype), w in zip(got, want):
            assert dtype == str(w.dtype) and torch.equal(torch.tensor(values, dtype=w.dtype), w), (update, n)


def test_adjacent_span_only_for_back_to_back_views_in_order():
    from rlsys.weight_sync import adjacent_span

    flat = torch.arange(20, dtype=torch.float32)
    a, b, c = flat[0:6].view(2, 3), flat[6:10], flat[10:20].view(5, 2)
    cpu = torch.device("cpu")
    span = adjacent_span([a, b, c], torch.float32, cpu)
    assert span is not None and span.data_ptr() == flat.data_ptr() and torch.equal(span, flat)
    assert torch.equal(adjacent_span([b, c], torch.float32, cpu), flat[6:20])  # from an offset
    assert adjacent_span([a, c], torch.float32, cpu) is None  # a gap
    assert adjacent_span([b, a], torch.float32, cpu) is None  # out of order
    assert adjacent_span([a, b.clone()], torch.float32, cpu) is None  # another storage
    assert adjacent_span([a, b], torch.bfloat16, cpu) is None  # not the announced dtype
    assert adjacent_span([flat[0:6].view(3, 2).t(), b], torch.float32, cpu) is None  # not contiguous


def test_pack_parameters_keeps_values_ties_and_training():
    from torch import nn
    from transformers import LlamaConfig, LlamaForCausalLM

    from learners.zero_params import pack_parameters

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = {n: id(p) for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    nbytes = pack_parameters(model)
    params = dict(model.named_parameters())
    assert nbytes == sum(p.numel() * 4 for p in params.values())
    assert {n: id(p) for n, p in params.items()} == ids  # the same Parameter objects
    assert all(torch.equal(p, before[n]) for n, p in params.items())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    # Consecutive views of one buffer, in named_parameters order: the broadcast's spans.
    from rlsys.weight_sync import adjacent_span
    span = adjacent_span([p.detach() for p in params.values()], torch.float32, torch.device("cpu"))
    assert span is not None and span.numel() == nbytes // 4
    # Trains as before: gradients reach every packed parameter and the step moves them in place.
    model(torch.randint(0, 64, (2, 8)), labels=torch.randint(0, 64, (2, 8))).loss.backward()
    opt.step()
    assert all(p.grad is not None for p in params.values())
    assert all(not torch.equal(p, before[n]) for n, p in params.items() if "norm" not in n)
    assert torch.equal(span, torch.cat([p.detach().reshape(-1) for p in params.values()]))
    assert pack_parameters(model) == 0  # already packed: left alone
    assert pack_parameters(nn.Linear(2, 2).to(torch.bfloat16)) == 2 * 2 * 2 + 2 * 2

