"""One learner rank at ZeRO stage 0 (what `zero_stage: auto` picks for one rank): the paths
that differ from ZeRO-3 (plain parameters, no partition gathers) train, broadcast, save and
resume exactly. A module of its own: its private Ray cannot share a module with test_learner's."""
from __future__ import annotations

import threading

import pytest
import torch

from rlsys.models import build_tiny_model
from test_learner import E2E_LC, KL, _e2e_batches, _rank_batches, _reference_grad_norm


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny256", seed=0, hidden_size=256)


@pytest.fixture(scope="module")
def one_rank(model_dir):
    from learner_ranks import learner_ranks

    from rlsys.config import AlgorithmConfig, LearnerConfig

    ac = AlgorithmConfig(kl_coef=KL, ppo_epochs=1, max_staleness=0)
    # Packed micro-batches of 64 tokens: the 5 sequences need 2 of them.
    lc = LearnerConfig(**{**E2E_LC, "num_ranks": 1, "zero_stage": "auto", "micro_batch_tokens": 64})
    assert lc.zero_stage == 0 and lc.heap_mmap_threshold_mib is None
    with learner_ranks(model_dir, lc, ac, world=1) as r:
        yield r


@pytest.mark.e2e
def test_one_zero0_rank_trains_broadcasts_saves_and_resumes(one_rank, model_dir, tmp_path):
    import ray
    from transformers import AutoModelForCausalLM

    from learners.zero_params import digest
    from rlsys.weight_sync import TensorMeta

    learner = one_rank["learners"][0]
    seqs, advs, _ = _e2e_batches()
    batch = _rank_batches(seqs, advs, [len(seqs)])[0]
    want_norm = _reference_grad_norm(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), seqs, advs)

    assert ray.get(learner.__ray_call__.remote(lambda s: (s.zero3, s.engine.zero_optimization_stage()))) == (False, 0)
    metas = [TensorMeta(n, tuple(s), d) for n, s, d in ray.get(learner.weight_metadata.remote())]
    before = ray.get(learner.gathered_digest.remote())
    assert set(before) == {m.name for m in metas}

    m = ray.get(learner.train_step.remote(batch))
    assert m["policy/grad_norm"] == pytest.approx(want_norm, rel=1e-4)  # the exact gradient, packed
    assert m["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-6) and m["learner/optimizer_steps"] == 1
    assert m["learner/micro_batches_per_rank"] == 2
    after = ray.get(learner.gathered_digest.remote())
    assert all(after[n] != before[n] for n in before)

    # Broadcast: what arrives equals the learner's weights.
    got: dict[str, list[float]] = {}
    th = threading.Thread(target=lambda: got.update({n: digest(t.clone()) for n, t in one_rank["transport"].receive(metas)}))
    th.start()
    ray.get(learner.broadcast_weights.remote())
    th.join(60)
    assert got == after
    # ... sent from the parameters themselves: packed into one buffer, no bucket copied.
    packed, sent = ray.get(learner.__ray_call__.remote(lambda s: (s.packed_bytes, s.transport.last_send_buckets)))
    assert packed == sum(m.numel * m.torch_dtype.itemsize for m in metas)
    assert sent["copied"] == 0 and sent["as_they_lay"] > 0, sent

    # save_hf: a Hugging Face directory with exactly these weights.
    out = ray.get(learner.save_hf.remote(str(tmp_path / "hf")))
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert {n: digest(p.detach()) for n, p in saved.named_parameters()} == after

    # DeepSpeed checkpoint: weights and optimizer state come back (the step after loading repeats
    # the step after saving, Adam moments included).
    ckpt = str(tmp_path / "ds")
    ray.get(learner.save_checkpoint.remote(ckpt))
    redo = []
    for _ in range(2):
        redo.append(ray.get(learner.train_step.remote(batch)))
        assert ray.get(learner.gathered_digest.remote()) != after
        ray.get(learner.load_checkpoint.remote(ckpt))
        assert ray.get(learner.gathered_digest.remote()) == after
    for k in ("loss/total", "loss/kl", "policy/grad_norm", "policy/ratio_mean"):
        assert redo[0][k] == pytest.approx(redo[1][k], rel=1e-6), k
    assert redo[0]["loss/kl"] > 0
