"""Recipe C's learning side: the DPO loss against hand-computed values, the pair builder on
hand-written groups, and (e2e) two DeepSpeed ZeRO-3 ranks training a LoRA adapter with DPO:
the engines receive merged weights, the policy moves towards the chosen responses (checked on
the saved model, outside the learner), and the checkpoint is both the adapter and a merged model."""
from __future__ import annotations

import math
import threading

import pytest
import torch

from rlsys.algorithms import PREFERENCE_LOSSES
from rlsys.batching import build_pairs, split_pairs_for_ranks
from rlsys.models import build_tiny_model



def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_dpo_loss_matches_hand_computed_values():
    dpo = PREFERENCE_LOSSES["dpo"]
    chosen, rejected = torch.tensor([-10.0, -20.0]), torch.tensor([-12.0, -15.0])
    ref_c, ref_r = torch.tensor([-11.0, -20.0]), torch.tensor([-11.0, -16.0])
    loss, met = dpo(chosen, rejected, ref_c, ref_r, beta=0.1)
    # pair 0: 0.1 * ((-10 + 11) - (-12 + 11)) = 0.2; pair 1: 0.1 * ((0) - (1)) = -0.1
    want = [-_log_sigmoid(0.2), -_log_sigmoid(-0.1)]
    assert float(loss) == pytest.approx(sum(want) / 2, rel=1e-6)
    assert met["accuracy_sum"] == 1.0 and met["margin_sum"] == pytest.approx(0.1, rel=1e-6)
    assert met["chosen_reward_sum"] == pytest.approx(0.1) and met["rejected_reward_sum"] == pytest.approx(0.0, abs=1e-7)
    # Policy == reference: every logit 0, loss ln 2 per pair, whatever beta.
    same, _ = dpo(chosen, rejected, chosen, rejected, beta=0.7, denominator=4)
    assert float(same) == pytest.approx(2 * math.log(2) / 4)
    smooth, _ = dpo(chosen, rejected, ref_c, ref_r, beta=0.1, label_smoothing=0.2)
    want_s = [0.8 * w - 0.2 * _log_sigmoid(-x) for w, x in zip(want, (0.2, -0.1))]
    assert float(smooth) == pytest.approx(sum(want_s) / 2, rel=1e-6)
    # The gradient raises the chosen log-prob and lowers the rejected one.
    c, r = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
    dpo(c, r, ref_c, ref_r, beta=0.1)[0].backward()
    assert (c.grad < 0).all() and (r.grad > 0).all()


def s(r_a, r_b=0.0, valid=True, n=3):
    return {"reward_a": r_a, "reward_b": r_b, "valid": valid, "prompt_token_ids": [1, 2], "token_ids": [5] * n}


def test_pairs_take_best_and_worst_by_weighted_reward():
    g1 = [s(0.2, 1.0), s(0.9, 0.0), s(0.5, 0.5), s(5.0, 0.0, valid=False)]  # weighted: 0.7, 0.9, 0.75
    g2 = [s(0.3), s(0.3)]                                                      # tie: no pair
    g3 = [s(0.1), s(0.4, valid=False)]                                         # one valid: none
    g4 = [s(0.0, 1.0), s(0.1, 0.0)]                                            # 0.5 vs 0.1
    pairs, counts = build_pairs([g1, g2, g3, g4], {"a": 1.0, "b": 0.5, "c": 0.0})
    assert len(pairs) == 2 and counts["tied_groups"] == 1 and counts["dropped_groups"] == 1
    (c1, r1), (c2, r2) = pairs
    assert c1 is g1[1] and r1 is g1[0] and c1["reward"] == pytest.approx(0.9) and r1["reward"] == pytest.approx(0.7)
    assert c2 is g4[0] and r2 is g4[1] and (c1["pair"], c2["pair"]) == (0, 1) and c1["chosen"] and not r1["chosen"]
    assert math.isnan(g1[3]["reward"])  # masked: no reward, never chosen
    assert build_pairs([g4], {"a": 1.0, "b": 0.5}, min_margin=0.5)[1]["tied_groups"] == 1
    batches = split_pairs_for_ranks(pairs, 2)
    assert [len(b["input_ids"]) for b in batches] == [2, 2] and all(b["global_pairs"] == 2 for b in batches)
    assert batches[0]["input_ids"][0] == [1, 2, 5, 5, 5] and batches[0]["prompt_lens"] == [2, 2]


# ----------------------------------------------------------------------------- e2e: LoRA + DPO

LORA = dict(enabled=True, rank=8, alpha=16.0, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
LC = dict(num_ranks=2, zero_stage=3, lr=5e-3, micro_batch_size=2, logprob_chunk_tokens=16,
          gradient_checkpointing=False, lora=LORA)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny256", seed=0, hidden_size=256)


@pytest.fixture(scope="module", params=[2, 1], ids=["zero3x2", "zero0x1"])
def ranks(model_dir, request):
    """DeepSpeedLearner actors (LoRA, DPO, gloo) and a weight-sync receiver here: two ZeRO-3
    ranks, or one whole ZeRO-0 rank (its parameters, adapters included, packed in one buffer)."""
    from learner_ranks import learner_ranks

    from rlsys.config import AlgorithmConfig, LearnerConfig

    lc = LearnerConfig(**{**LC, "num_ranks": request.param, "zero_stage": 3 if request.param > 1 else 0})
    with learner_ranks(model_dir, lc, AlgorithmConfig(loss="dpo", kl_coef=0.0, ppo_epochs=1),
                       prefix="rlsys-dpo-", world=request.param) as r:
        yield r


def _pairs(seed: int = 0) -> list[tuple[dict, dict]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(4):
        prompt = torch.randint(3, 500, (5 + i,), generator=g).tolist()
        chosen = torch.randint(3, 500, (6,), generator=g).tolist()
        rejected = torch.randint(3, 500, (4 + i,), generator=g).tolist()
        out.append(({"prompt_token_ids": prompt, "token_ids": chosen},
                    {"prompt_token_ids": prompt, "token_ids": rejected}))
    return out


def _sequence_logprob(model, prompt: list[int], response: list[int]) -> float:
    from learners.logprobs import naive_token_logprobs
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        lp = naive_token_logprobs(model, ids, torch.ones_like(ids))
    return float(lp[0, len(prompt) - 1:].sum())


@pytest.mark.e2e
def test_lora_dpo(ranks, model_dir, tmp_path):
    import ray
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from learners.zero_params import digest
    from rlsys.weight_sync import TensorMeta

    learners = ranks["learners"]
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    base_digest = {n: digest(p.detach()) for n, p in base.named_parameters()}
    metas = [TensorMeta(n, tuple(sh), d) for n, sh, d in ray.get(learners[0].weight_metadata.remote())]
    names = [m.name for m in metas]
    assert set(names) == set(base_digest)  # the engines' names and shapes: the base model's
    assert all(tuple(base.get_parameter(m.name).shape) == m.shape for m in metas)
    trainable = ray.get(learners[0].__ray_call__.remote(
        lambda s: sorted({n.split(".")[-2] for n, p in s.hf_model.named_parameters() if p.requires_grad})))
    assert trainable == ["default"]  # adapters only (lora_A.default / lora_B.default)
    # B = 0 at the start: the served (merged) weights are exactly the base.
    assert ray.get([lr.gathered_digest.remote() for lr in learners])[0] == base_digest

    pairs = _pairs()
    batches = split_pairs_for_ranks(pairs, len(learners))
    history = [ray.get([lr.train_step.remote({"mini_batches": [b]}) for lr, b in zip(learners, batches)])
               for _ in range(6)]
    for ms in history:
        assert all(m == ms[0] for m in ms) and ms[0]["learner/pairs"] == 4 and ms[0]["learner/optimizer_steps"] == 1
    first, last = history[0][0], history[-1][0]
    assert first["loss/total"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at first
    assert first["dpo/margin"] == pytest.approx(0.0, abs=1e-5) and first["policy/grad_norm"] > 0
    assert last["loss/total"] < first["loss/total"] - 0.05 and last["dpo/accuracy"] == 1.0 and last["dpo/margin"] > 0

    after = ray.get([lr.gathered_digest.remote() for lr in learners])[0]
    adapted = [n for n in names if any(f".{t}." in n for t in LORA["target_modules"])]
    assert adapted and all(after[n] != base_digest[n] for n in adapted)
    assert all(after[n] == base_digest[n] for n in names if n not in adapted)  # base frozen elsewhere

    # Broadcast: the engines receive the merged weights.
    got: dict[str, list[float]] = {}
    th = threading.Thread(target=lambda: got.update(
        {n: digest(t.clone()) for n, t in ranks["transport"].receive(metas)}))
    th.start()
    ray.get([lr.broadcast_weights.remote() for lr in learners])
    th.join(60)
    assert got == after
    if len(learners) == 1:  # ZeRO-0: packed parameters; buckets holding a merged weight are copied
        packed, sent = ray.get(learners[0].__ray_call__.remote(lambda s: (s.packed_bytes, s.transport.last_send_buckets)))
        assert packed > 0 and sent["copied"] > 0, sent

    # Checkpoint: a merged HF model and the adapter; base + adapter == merged.
    out = tmp_path / "hf"
    ray.get([lr.save_hf.remote(str(out)) for lr in learners])
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert {n: digest(p.detach()) for n, p in merged.named_parameters()} == after
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "adapter" / "adapter_model.safetensors").is_file()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                             str(out / "adapter"))
    ids = torch.tensor([pairs[0][0]["prompt_token_ids"] + pairs[0][0]["token_ids"]])
    with torch.no_grad():
        assert torch.allclose(with_adapter(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4)

    # The direction, measured outside the learner: on the saved model each chosen response
    # gained log-probability relative to its rejected one, against the base.
    for c, r in pairs:
        gain = (_sequence_logprob(merged, c["prompt_token_ids"], c["token_ids"])
                - _sequence_logprob(base, c["prompt_token_ids"], c["token_ids"])) \
            - (_sequence_logprob(merged, r["prompt_token_ids"], r["token_ids"])
               - _sequence_logprob(base, r["prompt_token_ids"], r["token_ids"]))
        assert gain > 0, gain
