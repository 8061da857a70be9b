"""Shared-prompt group forward (learners/shared_prompt.py): per-token log-probs, entropy and the
gradient equal the per-sample computation, for groups with different prompt lengths, padding,
sliced groups, gradient checkpointing and LoRA; micro-batches and rank batches keep groups
together. Pure torch on a tiny random model, no Ray (the ZeRO-3 two-rank path runs in
tests/test_learner.py's e2e test, whose batches contain shared groups)."""
from __future__ import annotations

import pytest
import torch

from learners.engine_setup import LogprobModule
from learners.microbatches import build_micro_batches, filler_micro_batch
from rlsys.batching import split_for_ranks
from rlsys.models import build_tiny_model

from logprob_checks import objective_grads, row_logprobs

TOL = dict(atol=2e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


def _model(tiny_dir, checkpointing: bool):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def _groups(spec: list[tuple[int, list[int]]], seed: int = 0, interleave: bool = True) -> dict:
    """A rank batch: per group (prompt length, [response lengths]); rows interleaved across
    groups (so that grouping has work to do) or group after group."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for gi, (p, resp_lens) in enumerate(spec):
        prompt = torch.randint(3, 500, (p,), generator=g).tolist()
        rows += [(j, gi, prompt + torch.randint(3, 500, (n,), generator=g).tolist(), p)
                 for j, n in enumerate(resp_lens)]
    if interleave:
        rows.sort(key=lambda r: (r[0], r[1]))  # sample 0 of every group, then sample 1, ...
    return {"input_ids": [r[2] for r in rows], "prompt_lens": [r[3] for r in rows],
            "advantages": [float(torch.randn(1, generator=g)) for _ in rows]}


@pytest.mark.parametrize("checkpointing,micro,chunk", [(False, 8, 1024), (True, 3, 5)])
def test_shared_forward_equals_per_sample(tiny_dir, checkpointing, micro, chunk):
    """Groups of 3 and 1 samples with prompts of 19, 6 and 11 tokens and ragged responses; with
    micro-batches of 3 a group of 4 is cut in two. Same weights, same per-row weighting of the
    log-probs; the per-sample path puts each row in its own micro-batch, so the weighting sees
    identical [T-1] layouts per row."""
    model = _model(tiny_dir, checkpointing)
    batch = _groups([(19, [5, 9, 1, 7]), (6, [12]), (11, [3, 8, 2])])
    shared = LogprobModule(model, chunk, temperature=0.7, shared_prompt=True)
    plain = LogprobModule(model, chunk, temperature=0.7)
    mbs_shared = build_micro_batches(batch, micro, 0, shared_prompt=True)
    assert all(m.shared is not None for m in mbs_shared)
    assert sum(m.encoded_tokens for m in mbs_shared) < sum(int(m.attention_mask.sum()) for m in mbs_shared)
    got = row_logprobs(shared, mbs_shared)
    per_sample = build_micro_batches(batch, 1, 0)  # one row each: the plain per-sample forward
    want = row_logprobs(plain, per_sample)
    assert set(got) == set(want) and len(got) == len(batch["input_ids"])
    for key, (lp, ent, tm) in got.items():
        lp_w, ent_w, tm_w = want[key]
        assert torch.equal(tm, tm_w)
        assert torch.allclose(lp, lp_w, **TOL)
        assert torch.allclose(ent[tm], ent_w[tm], atol=1e-4)
        assert (lp[~tm] == 0).all()
    g_s = objective_grads(shared, mbs_shared)
    g_p = objective_grads(plain, per_sample)
    assert set(g_s) == set(g_p)
    for n in g_p:
        assert torch.allclose(g_s[n], g_p[n], **TOL), (n, (g_s[n] - g_p[n]).abs().max())


def test_shared_forward_with_lora(tiny_dir):
    """LoRA adapters inside the decoder: the two-pass forward still matches the per-sample one,
    and the adapter weights get the same gradient."""
    from learners.lora import attach_lora
    from rlsys.config import LoraConfig

    model = _model(tiny_dir, checkpointing=True)
    attach_lora(model, LoraConfig(rank=4, alpha=8.0))
    for n, p in model.named_parameters():  # B starts at 0: make the adapter do something
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    batch = _groups([(15, [4, 6, 3]), (9, [7, 2])], seed=3)
    shared = LogprobModule(model, 64, shared_prompt=True)
    plain = LogprobModule(model, 64)

    mbs = build_micro_batches(batch, 8, 0, shared_prompt=True)
    per_sample = build_micro_batches(batch, 1, 0)
    lp_s, lp_p = row_logprobs(shared, mbs), row_logprobs(plain, per_sample)
    g_s, g_p = objective_grads(shared, mbs), objective_grads(plain, per_sample)
    assert any("lora_A" in n for n in g_s) and set(g_s) == set(g_p)
    for key in lp_p:
        assert torch.allclose(lp_s[key][0], lp_p[key][0], **TOL)
    for n in g_p:
        assert torch.allclose(g_s[n], g_p[n], **TOL), n


def test_filler_runs_both_passes(tiny_dir):
    model = _model(tiny_dir, checkpointing=True)
    module = LogprobModule(model, 16, shared_prompt=True)
    m = filler_micro_batch(0, shared_prompt=True)
    lp, _ = module(m.input_ids, m.attention_mask, m.target_mask, 1, shared=m.shared)
    (lp.sum() * 0.0).backward()   # what the learner does with a filler: joins, adds nothing
    assert lp.shape == (1, 1) and float(lp.detach().abs().sum()) == 0.0


def test_micro_batches_keep_groups_together():
    batch = _groups([(10, [3, 4, 5]), (7, [2, 2]), (12, [6]), (5, [1, 1, 1, 1, 1])])
    prompt_of = {tuple(ids): tuple(ids[:p]) for ids, p in zip(batch["input_ids"], batch["prompt_lens"])}
    mbs = build_micro_batches(batch, 4, 0, shared_prompt=True)
    assert sum(m.n_real for m in mbs) == 11
    seen: dict[tuple, set[int]] = {}
    for k, m in enumerate(mbs):
        assert m.n_real <= 4
        prompts = {prompt_of[tuple(m.input_ids[j, :int(m.attention_mask[j].sum())].tolist())] for j in range(m.n_real)}
        assert m.shared.prompt_ids.shape[0] == len(prompts)   # each prompt once per micro-batch
        for pr in prompts:
            seen.setdefault(pr, set()).add(k)
    # Groups of <= 4 sit in one micro-batch; the group of 5 is cut into 4 + 1.
    assert sorted(len(v) for v in seen.values()) == [1, 1, 1, 2]
    # keep_order (preference pairs): rows stay in their order, pairs never split.
    pairs = _groups([(8, [3, 4]), (6, [5, 2]), (9, [1, 2])], interleave=False)
    order = [tuple(x) for x in pairs["input_ids"]]
    mbs = build_micro_batches(pairs, 2, 0, keep_order=True, shared_prompt=True)
    got = [tuple(m.input_ids[j, :int(m.attention_mask[j].sum())].tolist()) for m in mbs for j in range(m.n_real)]
    assert got == order


def test_loss_mask_on_prompt_is_refused():
    batch = _groups([(6, [3, 4])])
    batch["loss_mask"] = [[1.0] * len(ids) for ids in batch["input_ids"]]  # one per token: covers the prompt
    with pytest.raises(ValueError, match="shared_prompt: false"):
        build_micro_batches(batch, 4, 0, shared_prompt=True)
    assert len(build_micro_batches(batch, 4, 0)) == 1


def test_rank_split_keeps_groups():
    samples = [{"group": g, "prompt_token_ids": [g + 3] * (10 + g), "token_ids": [5] * (1 + j),
                "advantage": 0.0, "logprobs": None} for g in range(4) for j in range(3)]
    batches = split_for_ranks(samples, 2, keep_groups=True)
    by_rank = [{ids[0] for ids in b["input_ids"]} for b in batches]
    assert by_rank[0].isdisjoint(by_rank[1]) and len(by_rank[0]) == len(by_rank[1]) == 2
    assert all(b["global_sequences"] == 12 for b in batches)
    # Fewer groups than ranks: rows are spread so no rank idles.
    one = [s for s in samples if s["group"] == 0]
    assert sorted(len(b["input_ids"]) for b in split_for_ranks(one, 2, keep_groups=True)) == [1, 2]


def test_layout_counts():
    """What `learner/padding_share` and `learner/encoded_share` are computed from, by hand: two
    groups (prompts of 5 and 3 tokens; responses 2+4 and 1) in one micro-batch of 3 rows."""
    batch = _groups([(5, [2, 4]), (3, [1])], interleave=False)
    (m,) = build_micro_batches(batch, 3, 0, shared_prompt=True)
    assert m.shared.prompt_ids.shape == (2, 5) and m.shared.resp_ids.shape == (3, 4)
    assert m.token_slots == 2 * 5 + 3 * 4            # prompts once (padded to 5), responses padded to 4
    assert m.encoded_tokens == (5 + 3) + (2 + 4 + 1)  # real tokens, each prompt once
    (p,) = build_micro_batches(batch, 3, 0)
    assert p.token_slots == 3 * 9 and p.encoded_tokens == 7 + 9 + 4
