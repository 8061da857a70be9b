"""Packed micro-batches (learner.micro_batch_tokens): sequences, or with the shared-prompt forward
prompts and responses, concatenated into one row with position ids restarting per sequence and
attention confined to each (learners/logprobs.py `Segments`, `varlen_sdpa_attention`).

Per-token log-probs, entropy and the gradient equal the per-sample (unpadded) computation within
TOL, for ragged lengths, with and without gradient checkpointing, shared prompts and LoRA; the
decoder computes no padding; micro-batches respect the token budget; the padded path is
unchanged by the attention switch. Pure torch on a tiny random Qwen3, except the last test (two
real ZeRO-3 DeepSpeed ranks, marked e2e)."""
from __future__ import annotations

import pytest
import torch

from learners.engine_setup import LogprobModule
from learners.logprobs import VARLEN_ATTENTION, enable_varlen_attention, packing_unsupported
from learners.microbatches import build_micro_batches, filler_micro_batch
from rlsys.models import build_tiny_model

from logprob_checks import objective_grads, row_logprobs

TOL = dict(atol=2e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


def _model(tiny_dir, checkpointing: bool = False):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def _batch(spec: list[tuple[int, list[int]]], seed: int = 0) -> dict:
    """Per group (prompt length, [response lengths]); rows interleaved across groups."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for gi, (p, resp_lens) in enumerate(spec):
        prompt = torch.randint(3, 500, (p,), generator=g).tolist()
        rows += [(j, gi, prompt + torch.randint(3, 500, (n,), generator=g).tolist(), p)
                 for j, n in enumerate(resp_lens)]
    rows.sort(key=lambda r: (r[0], r[1]))
    return {"input_ids": [r[2] for r in rows], "prompt_lens": [r[3] for r in rows],
            "advantages": [float(torch.randn(1, generator=g)) for _ in rows]}


# Ragged: prompts of 19, 6, 11 and 3 tokens, responses from 1 to 30 tokens, a lone sample.
SPEC = [(19, [5, 9, 1, 7]), (6, [12]), (11, [3, 30, 2]), (3, [14, 4])]


def _compare(module, packed_mbs, plain_module, batch):
    per_sample = build_micro_batches(batch, 1, 0)  # one row each: the unpadded per-sample forward
    got, want = row_logprobs(module, packed_mbs), row_logprobs(plain_module, per_sample)
    assert set(got) == set(want) and len(got) == len(batch["input_ids"])
    for key, (lp, ent, tm) in got.items():
        lp_w, ent_w, tm_w = want[key]
        assert torch.equal(tm, tm_w)
        assert torch.allclose(lp, lp_w, **TOL), (lp - lp_w).abs().max()
        assert torch.allclose(ent[tm], ent_w[tm], atol=1e-4)
        assert (lp[~tm] == 0).all()
    g_k, g_p = objective_grads(module, packed_mbs), objective_grads(plain_module, per_sample)
    assert set(g_k) == set(g_p)
    for n in g_p:
        assert torch.allclose(g_k[n], g_p[n], **TOL), (n, (g_k[n] - g_p[n]).abs().max())


@pytest.mark.parametrize("shared,checkpointing,budget,chunk", [
    (False, False, 4096, 1024), (False, True, 60, 7), (True, False, 4096, 1024), (True, True, 40, 5)])
def test_packed_forward_equals_per_sample(tiny_dir, shared, checkpointing, budget, chunk):
    """Packed (one micro-batch holding everything, or a budget that forces several and cuts the
    largest group) vs one unpadded sequence per forward: same log-probs, entropy, gradient."""
    model = _model(tiny_dir, checkpointing)
    plain = LogprobModule(model, chunk, temperature=0.7)
    module = LogprobModule(model, chunk, temperature=0.7, shared_prompt=shared)
    batch = _batch(SPEC)
    mbs = build_micro_batches(batch, 4, 0, shared_prompt=shared, token_budget=budget)
    assert all((m.shared if shared else m.packed) is not None for m in mbs)
    assert (len(mbs) == 1) == (budget == 4096)
    _compare(module, mbs, plain, batch)
    assert model.config._attn_implementation == VARLEN_ATTENTION


def test_packed_with_lora(tiny_dir):
    from learners.lora import attach_lora
    from rlsys.config import LoraConfig

    model = _model(tiny_dir, checkpointing=True)
    attach_lora(model, LoraConfig(rank=4, alpha=8.0))
    for n, p in model.named_parameters():  # B starts at 0: make the adapter do something
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    batch = _batch([(15, [4, 6, 3]), (9, [7, 2])], seed=3)
    for shared in (False, True):
        module = LogprobModule(model, 64, shared_prompt=shared)
        _compare(module, build_micro_batches(batch, 8, 0, shared_prompt=shared, token_budget=48),
                 LogprobModule(model, 64), batch)


def test_padded_path_unchanged_by_the_switch(tiny_dir):
    """A model switched to the packed-capable attention computes padded batches exactly as sdpa."""
    model = _model(tiny_dir)
    plain = LogprobModule(model, 64)
    batch = _batch(SPEC, seed=5)
    mbs = build_micro_batches(batch, 4, 0)
    before = row_logprobs(plain, mbs)
    assert packing_unsupported(model) is None
    enable_varlen_attention(model)
    assert model.config._attn_implementation == VARLEN_ATTENTION
    after = row_logprobs(plain, mbs)
    for key in before:
        assert torch.equal(before[key][0], after[key][0])
    # Not written into a saved config (vLLM and transformers read the checkpoint as before).
    assert "rlsys" not in model.config.to_json_string()


def test_unsupported_attention_is_refused(tiny_dir):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation="eager")
    assert "eager" in packing_unsupported(model)
    with pytest.raises(RuntimeError, match="micro_batch_tokens"):
        enable_varlen_attention(model)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("budget", [16, 40, 64, 1000])
def test_budget_and_no_padding(shared, budget):
    """Every row once; each micro-batch within the budget unless one unit (a sequence, or with
    shared prompts a group's prompt + one response) alone exceeds it; groups are cut only when
    they alone exceed it; no padding is computed."""
    batch = _batch(SPEC + [(8, [2, 2, 2, 2, 2, 2, 2, 2])], seed=1)
    ids, plens = batch["input_ids"], batch["prompt_lens"]
    mbs = build_micro_batches(batch, 4, 0, shared_prompt=shared, token_budget=budget)
    rows = [tuple(m.input_ids[j, :int(m.attention_mask[j].sum())].tolist()) for m in mbs for j in range(m.n_real)]
    assert sorted(rows) == sorted(tuple(x) for x in ids)
    prompt_of = {tuple(x): tuple(x[:p]) for x, p in zip(ids, plens)}
    for m in mbs:
        assert m.token_slots == m.encoded_tokens           # padding share 0
        mine = [tuple(m.input_ids[j, :int(m.attention_mask[j].sum())].tolist()) for j in range(m.n_real)]
        if shared:
            want = sum(len(p) for p in {prompt_of[r] for r in mine}) + sum(len(r) - len(prompt_of[r]) for r in mine)
            smallest_unit = min(len(r) for r in mine)  # a prompt and one response
        else:
            want = sum(len(r) for r in mine)
            smallest_unit = min(len(r) for r in mine)
        assert m.encoded_tokens == want
        assert want <= budget or m.n_real == 1 or smallest_unit > budget or \
            (shared and len({prompt_of[r] for r in mine}) == 1), (budget, want, m.n_real)
    if shared:
        per_prompt: dict[tuple, int] = {}
        for m in mbs:
            for p in {prompt_of[tuple(m.input_ids[j, :int(m.attention_mask[j].sum())].tolist())]
                      for j in range(m.n_real)}:
                per_prompt[p] = per_prompt.get(p, 0) + 1
        for p, n in per_prompt.items():  # a group fits whole -> it is in one micro-batch
            group = [r for r in ids if tuple(r[:len(p)]) == p]
            if len(p) + sum(len(r) - len(p) for r in group) <= budget:
                assert n == 1
    # A bigger budget never needs more micro-batches than the padded path with 4 rows each.
    if budget == 1000:
        assert len(mbs) == 1
    padded = build_micro_batches(batch, 4, 0, shared_prompt=shared)
    assert sum(m.token_slots for m in mbs) <= sum(m.token_slots for m in padded)


def test_keep_order_pairs():
    """Preference pairs (keep_order): rows stay in order and a pair is never split."""
    batch = _batch([(8, [3, 4]), (6, [5, 2]), (9, [1, 2]), (4, [9, 9])])
    pairs = {"input_ids": [], "prompt_lens": [], "advantages": []}
    for gi in range(4):  # group after group: (chosen, rejected) consecutive
        for k in ("input_ids", "prompt_lens", "advantages"):
            pairs[k] += [batch[k][gi], batch[k][gi + 4]]
    for shared in (False, True):
        mbs = build_micro_batches(pairs, 2, 0, keep_order=True, shared_prompt=shared, token_budget=30)
        got = [tuple(m.input_ids[j, :int(m.attention_mask[j].sum())].tolist()) for m in mbs for j in range(m.n_real)]
        assert got == [tuple(x) for x in pairs["input_ids"]]
        assert all(m.n_real % 2 == 0 for m in mbs) and len(mbs) > 1


@pytest.mark.parametrize("shared", [False, True])
def test_filler(tiny_dir, shared):
    model = _model(tiny_dir, checkpointing=True)
    module = LogprobModule(model, 16, shared_prompt=shared)
    m = filler_micro_batch(0, shared_prompt=shared, packed=True)
    assert m.layout is not None and m.n_real == 0
    lp, _ = module(m.input_ids, m.attention_mask, m.target_mask, 1, shared=m.layout)
    (lp.sum() * 0.0).backward()
    assert lp.shape == (1, 1) and float(lp.detach().abs().sum()) == 0.0


@pytest.mark.e2e
def test_two_zero3_ranks_packed(tmp_path_factory):
    """Two real ZeRO-3 DeepSpeed ranks (budget 40: several micro-batches, a filler on the rank
    with fewer), shared-prompt forward on and off: a packed step's gradient norm equals the
    padded step's and the single-process full-batch one; no padding is computed; metrics are
    identical on both ranks. (lr 1e-12: the steps leave the weights as they were; no truncated IS,
    whose weights the single-process reference does not apply.)"""
    import ray
    from learner_ranks import learner_ranks
    from test_learner import E2E_LC, KL, _e2e_batches, _reference_grad_norm
    from transformers import AutoModelForCausalLM

    from rlsys.config import AlgorithmConfig, LearnerConfig

    model_dir = build_tiny_model(tmp_path_factory.mktemp("models") / "tiny256", seed=0, hidden_size=256)
    seqs, advs, batches = _e2e_batches()
    want_norm = _reference_grad_norm(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), seqs, advs)
    got = {}
    lc, ac = LearnerConfig(**{**E2E_LC, "lr": 1e-12}), AlgorithmConfig(kl_coef=KL, ppo_epochs=1, tis_cap=None)
    with learner_ranks(model_dir, lc, ac) as r:
        for shared in (True, False):
            for budget in (None, 40):
                update = {"micro_batch_tokens": budget, "shared_prompt": shared}
                ray.get([lr.__ray_call__.remote(lambda s, u=update: setattr(s, "lc", s.lc.model_copy(update=u)))
                         for lr in r["learners"]])
                out = ray.get([lr.train_step.remote(b) for lr, b in zip(r["learners"], batches)])
                assert out[0] == out[1]
                got[shared, budget] = out[0]
    for shared in (True, False):
        packed, padded = got[shared, 40], got[shared, None]
        assert packed["learner/padding_share"] == 0.0 and padded["learner/padding_share"] > 0
        assert packed["learner/micro_batches_per_rank"] >= 2
        assert packed["policy/grad_norm"] == pytest.approx(padded["policy/grad_norm"], rel=1e-6)
        assert packed["loss/total"] == pytest.approx(padded["loss/total"], rel=1e-5, abs=1e-7)
    for m in got.values():
        assert m["policy/grad_norm"] == pytest.approx(want_norm, rel=1e-4)
