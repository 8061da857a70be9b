"""DeepSpeed's buckets sized to the model (learner.zero_bucket_mib): the config ds_config builds,
its validation, and (e2e) two real ZeRO-3 ranks whose reduce bucket is bounded by it and whose
gradient is still the full-batch one when the bucket is smaller than a parameter."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from rlsys.config import ConfigError, LearnerConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


def _zero(**kw) -> dict:
    from learners.engine_setup import ds_config
    model_numel = kw.pop("model_numel", None)
    dtype = kw.pop("dtype", torch.float32)
    return ds_config(LearnerConfig(**kw), dtype, train=True, model_numel=model_numel)["zero_optimization"]


def test_auto_buckets_follow_the_model_and_are_capped():
    # SmolLM2-135M in fp32 (538 MB): 1/8 of it is above the 64 MiB cap.
    z = _zero(model_numel=134_515_008)
    e = 64 * MIB // 4
    assert z["reduce_bucket_size"] == e and z["stage3_prefetch_bucket_size"] == e
    assert z["stage3_max_live_parameters"] == 2 * e and z["stage3_max_reuse_distance"] == e
    # DeepSpeed's defaults were 5e8 / 5e7 / 1e9 / 1e9 elements.
    assert z["reduce_bucket_size"] < 5e8 / 20
    # A 200 MiB model: 25 MiB buckets; a tiny one: the 4 MiB floor; unknown size: the cap.
    assert _zero(model_numel=200 * MIB // 4)["reduce_bucket_size"] == 25 * MIB // 4
    assert _zero(model_numel=1_000_000)["reduce_bucket_size"] == 4 * MIB // 4
    assert _zero()["reduce_bucket_size"] == 64 * MIB // 4


def test_explicit_bucket_mib_in_elements_of_the_weights_dtype():
    assert _zero(zero_bucket_mib=16, model_numel=10**9, dtype=torch.bfloat16)["reduce_bucket_size"] == 8 * MIB
    assert _zero(zero_bucket_mib=16, model_numel=10, dtype=torch.float32)["reduce_bucket_size"] == 4 * MIB
    assert _zero(zero_bucket_mib=0.5)["stage3_prefetch_bucket_size"] == MIB // 8


def test_lower_stages():
    z2 = _zero(zero_stage=2, zero_bucket_mib=8)
    assert z2["reduce_bucket_size"] == z2["allgather_bucket_size"] == 2 * MIB
    assert not any(k.startswith("stage3_") for k in z2)
    z0 = _zero(zero_stage=0)
    assert z0 == {"stage": 0}


def test_reference_engine_config_has_the_same_buckets():
    from learners.engine_setup import BUCKET_KEYS, ds_config
    lc = LearnerConfig(zero_bucket_mib=8)
    train = ds_config(lc, torch.float32, train=True, model_numel=10**8)["zero_optimization"]
    ref = ds_config(lc, torch.float32, train=False, model_numel=10**8)["zero_optimization"]
    assert {k: train[k] for k in BUCKET_KEYS if k in train} == {k: ref[k] for k in BUCKET_KEYS if k in ref}
    assert set(BUCKET_KEYS) >= {k for k in train if k != "stage" and not k.endswith("_on_model_save")}


def test_deepspeed_reads_the_keys():
    """The names are DeepSpeed's (a misspelt key would be rejected or ignored)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    z = DeepSpeedZeroConfig(**_zero(zero_bucket_mib=2, model_numel=10**8))
    assert z.reduce_bucket_size == z.prefetch_bucket_size == z.max_reuse_distance == MIB // 2
    assert z.max_live_parameters == MIB


def test_heap_retention_limit(monkeypatch):
    from learners.engine_setup import limit_heap_retention
    if sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION"):
        assert limit_heap_retention() is True
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")   # the user's own setting wins
    assert limit_heap_retention() is False


@pytest.mark.parametrize("value", ["0", "-1", "big", "100000"])
def test_bad_bucket_size_names_the_key(base, value):
    with pytest.raises(ConfigError) as e:
        load_config(base=base, overrides=[f"learner.zero_bucket_mib={value}"])
    assert "learner.zero_bucket_mib" in str(e.value), str(e.value)


def test_bucket_size_default_and_override(base):
    assert load_config(base=base).learner.zero_bucket_mib is None
    assert load_config(base=base, overrides=["learner.zero_bucket_mib=32"]).learner.zero_bucket_mib == 32.0


# ----------------------------------------------------------------------------- e2e

BUCKET_MIB = 0.25      # 65,536 fp32 elements: below the tied embedding (512 x 256 = 131,072)
SEQS = [(20, 8), (13, 5), (30, 10), (9, 4)]   # (length, prompt length)
ADVS = [1.0, -0.5, 0.3, -1.2]


def _seqs() -> list[tuple[list[int], int]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randint(3, 500, (n,), generator=g).tolist(), p) for n, p in SEQS]


def _rank_main(rank: int, port: int, model_dir: str, out: str) -> None:
    """One of two ZeRO-3 ranks (a subprocess of the test): a train step, then what it saw."""
    from learners.deepspeed_learner import DeepSpeedLearner
    from rlsys.config import AlgorithmConfig
    lc = LearnerConfig(num_ranks=2, zero_stage=3, lr=1e-3, micro_batch_size=2, logprob_chunk_tokens=16,
                       zero_bucket_mib=BUCKET_MIB)
    learner = DeepSpeedLearner(rank, 2, "127.0.0.1", port, model_dir, lc, AlgorithmConfig(kl_coef=0.0, ppo_epochs=1), 0)
    seqs = _seqs()
    mine = [i for i in range(len(seqs)) if i % 2 == rank]
    batch = {"input_ids": [seqs[i][0] for i in mine], "prompt_lens": [seqs[i][1] for i in mine],
             "advantages": [ADVS[i] for i in mine], "global_tokens": sum(n - p for n, p in SEQS),
             "global_sequences": len(SEQS)}
    opt = learner.engine.optimizer
    buffers = [b.buffer.numel() for b in opt.ipg_buckets.values() if b.buffer is not None]
    from learners.engine_setup import zero3_module_stack
    depth = len(zero3_module_stack())
    metrics = learner.train_step(batch)
    seen = {"module_stack": [depth, len(zero3_module_stack())], "buffers": buffers,
            "reduce_bucket_size": opt.reduce_bucket_size, "prefetch": opt.prefetch_elements,
            "largest_param": max(int(p.ds_numel) for p in learner.engine.module.parameters()),
            "grad_norm": metrics["policy/grad_norm"]}
    engine = weakref.ref(learner.engine)
    del opt   # the test's own reference; what may remain is the learner's
    learner.shutdown()
    # The results are written only once shutdown returned, with whether it released the engine.
    Path(out).write_text(json.dumps({**seen, "engine_released": engine() is None}))


def _reference_grad_norm(model_dir: str) -> float:
    """Single process, whole batch: the first step's gradient norm (old = policy, no KL)."""
    from transformers import AutoModelForCausalLM

    from learners.logprobs import token_logprobs
    from learners.microbatches import build_micro_batches
    from rlsys.algorithms import POLICY_LOSSES
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    seqs = _seqs()
    full = build_micro_batches({"input_ids": [s for s, _ in seqs], "prompt_lens": [p for _, p in seqs],
                                "advantages": ADVS}, len(seqs), 0)[0]
    lp = token_logprobs(model, full.input_ids, full.attention_mask, 16, target_mask=full.target_mask)
    loss, _ = POLICY_LOSSES["grpo_clip"](lp, lp.detach(), full.advantages, full.loss_mask, None,
                                         kl_coef=0.0, denominator=full.n_tokens)
    loss.backward()
    return torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())).item()


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_zero3_reduce_bucket_is_bounded_and_gradients_stay_exact(tmp_path):
    from rlsys.cluster import free_port
    from rlsys.models import build_tiny_model
    model_dir = build_tiny_model(tmp_path / "tiny256", seed=0, hidden_size=256)
    port = free_port()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": os.path.expanduser("~/.cache/rlsys/torch_extensions")}
    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    procs = [subprocess.Popen([sys.executable, __file__, str(r), str(port), model_dir, str(outs[r])], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    try:
        logs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    got = [json.loads(o.read_text()) for o in outs]
    elements = int(BUCKET_MIB * MIB) // 4
    for g in got:
        # DeepSpeed's default would allocate 5e8 elements (2 GB) here.
        assert g["buffers"] and max(g["buffers"]) <= elements, g
        assert g["reduce_bucket_size"] == g["prefetch"] == elements
        assert g["largest_param"] > elements   # a parameter bigger than the bucket took its own path
        assert g["engine_released"], "shutdown left the DeepSpeed engine alive past the process group"
        # Gradient checkpointing's recompute stops early, inside the layers' ZeRO-3 hooks.
        assert g["module_stack"][0] == g["module_stack"][1] > 0, g["module_stack"]
    want = _reference_grad_norm(model_dir)
    assert got[0]["grad_norm"] == pytest.approx(want, rel=1e-4), (got, want)


if __name__ == "__main__":   # a rank of the e2e test above
    sys.path[:0] = [str(ROOT)]
    _rank_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
