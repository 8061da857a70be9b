"""Learner: chunked log-probs, micro-batching, the loss-scaling arithmetic, and (e2e) two
DeepSpeed ZeRO-3 ranks in Ray training, broadcasting and saving a tiny model."""
from __future__ import annotations

import math
import os
import random
import threading

import pytest
import torch

import learners.logprobs as logprobs_mod
from learners.logprobs import (FusedHeadLogprob, _head_logprobs, chunked_logprobs, fused_head_ok, naive_token_logprobs,
                               num_chunks_for, token_logprobs)
from learners.microbatches import backward_scale, build_micro_batches, filler_micro_batch
from rlsys.algorithms import POLICY_LOSSES
from rlsys.models import build_tiny_model



@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)


@pytest.fixture(params=["fused", "checkpoint"])
def tiny(request, tiny_model, monkeypatch):
    """The tiny model, its log-probs through the blocked head (`FusedHeadLogprob`, what a whole
    Linear head gets) or through the per-chunk checkpointed autograd path (ZeRO-3, LoRA heads)."""
    if request.param == "checkpoint":
        monkeypatch.setattr(logprobs_mod, "fused_head_ok", lambda head: False)
    else:
        assert fused_head_ok(tiny_model.get_output_embeddings())
    return tiny_model


def _padded(lengths: list[int], vocab: int = 500, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, :n] = 1
    return ids, mask


def _grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


# ----------------------------------------------------------------------------- log-probs

@pytest.mark.parametrize("chunk_tokens,num_chunks", [(16, None), (5, None), (7, 11), (1000, None)])
def test_token_logprobs_match_full_logits(tiny, chunk_tokens, num_chunks):
    ids, mask = _padded([17, 12, 5])
    weights = torch.randn(3, 16)  # an arbitrary scalar of the log-probs, to compare gradients
    ref = naive_token_logprobs(tiny, ids, mask)
    (ref * weights).sum().backward()
    g_ref = _grads(tiny)
    lp = token_logprobs(tiny, ids, mask, chunk_tokens, num_chunks=num_chunks)
    (lp * weights).sum().backward()
    g = _grads(tiny)
    assert torch.allclose(lp, ref, atol=1e-5)
    assert (lp[mask[:, 1:] == 0] == 0).all()
    for n in g_ref:
        assert torch.allclose(g[n], g_ref[n], atol=1e-5, rtol=1e-4), n


def test_target_mask_and_entropy(tiny):
    ids, mask = _padded([9, 14])
    target = mask[:, 1:].bool().clone()
    target[:, :4] = False  # e.g. prompt positions: not computed, reported as 0
    with torch.no_grad():
        lp, ent = chunked_logprobs(tiny, ids, mask, 4, target_mask=target, with_entropy=True)
        logits = tiny(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    full = naive_token_logprobs(tiny, ids, mask)
    p = torch.softmax(logits, -1)
    want_ent = -(p * torch.log_softmax(logits, -1)).sum(-1)
    assert torch.allclose(lp[target], full[target], atol=1e-5)
    assert (lp[~target] == 0).all() and (ent[~target] == 0).all()
    assert torch.allclose(ent[target], want_ent[target], atol=1e-4)


def test_backward_keeps_no_full_vocab_tensor(tiny):
    """Per-chunk checkpointing: autograd saves no [rows, vocab] tensor outside the chunk
    being recomputed, so memory does not grow with the number of chunks."""
    ids, mask = _padded([40, 40, 40])
    vocab = tiny.config.vocab_size
    saved: list[torch.Size] = []

    def pack(t):
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp = token_logprobs(tiny, ids, mask, chunk_tokens=8)
    assert not [s for s in saved if len(s) and s[-1] == vocab and s.numel() > 8 * vocab], saved
    lp.sum().backward()  # and backward still works through the recomputation
    assert tiny.model.embed_tokens.weight.grad is not None
    tiny.zero_grad(set_to_none=True)


def _head_case(dtype: torch.dtype, vocab: int = 1000, rows: int = 37, hidden: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=g))
    head = head.to(dtype)
    h = torch.randn(rows, hidden, generator=g).to(dtype)
    y = torch.randint(0, vocab, (rows,), generator=g)
    y[:3] = torch.tensor([0, vocab - 1, 96])  # the first and last column, a block's first
    return head, h, y, torch.randn(rows, generator=g)


def _run_head(fn, head, h, y, upstream):
    h = h.clone().requires_grad_()
    head.weight.grad = None
    lp, ent = fn(h)
    (lp * upstream).sum().backward()
    return lp.detach(), ent, h.grad.clone(), head.weight.grad.clone()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_head_equals_autograd_head(temperature):
    """Blocks of 96 columns over a 1000-token vocabulary (the last one partial): log-probs,
    entropy and both gradients equal autograd's through the full logits, in fp32."""
    head, h, y, up = _head_case(torch.float32)
    got = _run_head(lambda x: FusedHeadLogprob.apply(x, head.weight, y, temperature, True, 96), head, h, y, up)
    want = _run_head(lambda x: _head_logprobs(head, x, y, True, temperature), head, h, y, up)
    for name, a, b in zip(("logp", "entropy", "grad hidden", "grad weight"), got, want):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (name, float((a - b).abs().max()))
    assert float(got[2].abs().sum()) > 0 and float(got[3].abs().sum()) > 0


def test_fused_head_bf16_as_close_to_exact_as_the_autograd_head():
    """bf16 (logits rounded like nn.Linear's): each path's error against an fp64 computation
    from the same bf16 inputs; the blocked one must be no worse (it collects the logit
    gradient and multiplies once, as nn.Linear's backward does)."""
    head, h, y, up = _head_case(torch.bfloat16, vocab=4000, rows=64, hidden=64)
    fused = _run_head(lambda x: FusedHeadLogprob.apply(x, head.weight, y, 0.7, False, 512), head, h, y, up)
    plain = _run_head(lambda x: _head_logprobs(head, x, y, False, 0.7), head, h, y, up)
    h64 = h.double().requires_grad_()
    w64 = head.weight.detach().double().requires_grad_()
    lp64 = ((h64 @ w64.t()) / 0.7).log_softmax(-1).gather(1, y[:, None])[:, 0]
    (lp64 * up.double()).sum().backward()
    for i, exact in ((0, lp64.detach()), (2, h64.grad), (3, w64.grad)):
        err = lambda r: float((r[i].double() - exact).norm() / exact.norm())
        assert err(fused) <= err(plain) * 1.05 + 1e-6, (i, err(fused), err(plain))


def test_fused_head_only_for_a_bias_free_linear_and_runs_as_its_forward():
    head = torch.nn.Linear(8, 50, bias=False)
    assert fused_head_ok(head)
    assert not fused_head_ok(torch.nn.Linear(8, 50, bias=True))
    assert not fused_head_ok(torch.nn.Sequential(head))       # e.g. a LoRA wrapper
    # The module's hooks run around it (ZeRO-3 gathers the weight in them), and its own forward
    # is back afterwards.
    seen = []
    pre = head.register_forward_pre_hook(lambda m, args: seen.append("pre"))
    post = head.register_forward_hook(lambda m, args, out: seen.append("post"))
    try:
        lp, _ = logprobs_mod.head_logprobs(head, torch.randn(5, 8), torch.arange(5), torch.arange(5), 2)
    finally:
        pre.remove()
        post.remove()
    assert seen == ["pre", "post"] * 3 and lp.shape == (5,)
    assert "forward" not in head.__dict__ and head(torch.randn(2, 8)).shape == (2, 50)


def test_rejects_too_few_chunks(tiny):
    ids, mask = _padded([20])
    with pytest.raises(ValueError, match="num_chunks"):
        token_logprobs(tiny, ids, mask, 4, num_chunks=2)


# ----------------------------------------------------------------------------- micro-batches

def test_micro_batches_masks_and_alignment():
    batch = {"input_ids": [[5, 6, 7, 8, 9], [1, 2, 3], [4, 4, 4, 4]], "prompt_lens": [2, 1, 3],
             "advantages": [1.0, -1.0, 0.5],
             # per token of input_ids for seq 0, per response token for seqs 1 and 2
             "loss_mask": [[0, 0, 1, 0, 1], [1, 1], None],
             "behaviour_logprobs": [[-1.0, -2.0, -3.0], [-4.0, -5.0], [-6.0]]}
    mbs = build_micro_batches(batch, micro_batch_size=2, pad_id=0)
    assert [m.n_real for m in mbs] == [2, 1]
    a, b = mbs
    # longest first: [seq0 (5 tokens), seq2 (4 tokens)], then [seq1]
    assert a.input_ids.tolist() == [[5, 6, 7, 8, 9], [4, 4, 4, 4, 0]]
    assert a.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert a.loss_mask.tolist() == [[0, 1, 0, 1], [0, 0, 1, 0]]
    assert a.behaviour.tolist() == [[0, -1, -2, -3], [0, 0, -6, 0]]
    assert a.behaviour_mask.tolist() == [[False, True, True, True], [False, False, True, False]]
    assert a.advantages.tolist() == [1.0, 0.5] and a.n_tokens == 3
    assert b.loss_mask.tolist() == [[1, 1]] and b.target_mask.tolist() == [[True, True]]
    f = filler_micro_batch(0)
    assert f.n_real == 0 and f.n_tokens == 0 and f.input_ids.shape == (1, 2)
    # A rank may get no sequences at all; the learner then runs fillers only.
    assert build_micro_batches({"input_ids": [], "prompt_lens": [], "advantages": []}, 2, 0) == []


@pytest.mark.parametrize("bad", [{"prompt_lens": [0]}, {"prompt_lens": [3]}, {"advantages": []},
                                 {"loss_mask": [[1]]}])
def test_micro_batches_reject_bad_input(bad):
    batch = {"input_ids": [[1, 2, 3]], "prompt_lens": [1], "advantages": [1.0], **bad}
    with pytest.raises(ValueError):
        build_micro_batches(batch, 2, 0)


# ----------------------------------------------------------------------------- loss scaling

def _rank_batches(seqs, advs, split):
    out, start = [], 0
    for n in split:
        rows = range(start, start + n)
        out.append({"input_ids": [seqs[i][0] for i in rows], "prompt_lens": [seqs[i][1] for i in rows],
                    "advantages": [advs[i] for i in rows]})
        start += n
    return out


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean"])
def test_split_gradient_equals_full_batch_gradient(tiny, loss_agg):
    """What the learner does on W ranks x k micro-batches, followed by what DeepSpeed does
    (sum micro-batch gradients per rank, average over ranks), equals the gradient of the
    single-process full-batch loss. Rank 1 has fewer sequences and runs a filler micro-batch."""
    g = torch.Generator().manual_seed(1)
    lens = [(20, 8), (13, 5), (30, 10), (9, 4), (25, 20)]
    seqs = [(torch.randint(3, 500, (n,), generator=g).tolist(), p) for n, p in lens]
    advs = [1.0, -0.5, 0.3, -1.2, 0.4]
    loss_fn = POLICY_LOSSES["grpo_clip"]

    def loss_of(mb, denominator):
        lp = token_logprobs(tiny, mb.input_ids, mb.attention_mask, 6, target_mask=mb.target_mask)
        # old != new so that some ratios clip; a function of the token, not of its place in
        # the micro-batch, so the full batch and the split see the same values.
        old = lp.detach() + 0.3 * torch.sin(mb.input_ids[:, 1:].float())
        return loss_fn(lp, old, mb.advantages, mb.loss_mask, None,
                       loss_agg=loss_agg, denominator=denominator)[0]

    full = build_micro_batches(_rank_batches(seqs, advs, [5])[0], 5, 0)
    n_tok = sum(m.n_tokens for m in full)
    loss_of(full[0], n_tok if loss_agg == "token_mean" else 5).backward()
    want = _grads(tiny)

    world = 2
    per_rank = [build_micro_batches(b, 2, 0) for b in _rank_batches(seqs, advs, [3, 2])]
    k = max(len(m) for m in per_rank)
    per_rank = [m + [filler_micro_batch(0)] * (k - len(m)) for m in per_rank]
    denominator = n_tok if loss_agg == "token_mean" else 5
    rank_grads = []
    for mbs in per_rank:
        for mb in mbs:  # gradients accumulate over the rank's micro-batches
            (loss_of(mb, denominator) * backward_scale(world)).backward()
        rank_grads.append(_grads(tiny))
    for n, w in want.items():
        got = sum(r[n] for r in rank_grads) / world  # DeepSpeed's data-parallel average
        assert torch.allclose(got, w, atol=1e-6, rtol=1e-4), n


# ----------------------------------------------------------------------------- e2e

# Padded micro-batches of 2 here (the packed default is checked against them in test_packing).
E2E_LC = dict(num_ranks=2, zero_stage=3, lr=1e-3, micro_batch_size=2, micro_batch_tokens=None, logprob_chunk_tokens=16)
KL = 0.05


def _e2e_batches() -> tuple[list[tuple[list[int], int]], list[float], list[dict]]:
    g = torch.Generator().manual_seed(1)
    lens = [(20, 8), (13, 5), (30, 10), (9, 4), (25, 20)]
    seqs = [(torch.randint(3, 500, (n,), generator=g).tolist(), p) for n, p in lens]
    # Two groups share a prompt (one per rank): the shared-prompt forward (on by default)
    # encodes it once, under ZeRO-3, next to single-sample groups and a filler micro-batch.
    seqs[1] = (seqs[0][0][:8] + seqs[1][0][5:], 8)
    seqs[4] = (seqs[3][0][:4] + seqs[4][0][20:], 4)
    advs = [1.0, -0.5, 0.3, -1.2, 0.4]
    n_tok = sum(len(s) - p for s, p in seqs)
    batches = _rank_batches(seqs, advs, [3, 2])  # unequal split: rank 1 runs a filler micro-batch
    for b, rows in zip(batches, ([0, 1, 2], [3, 4])):
        b.update(global_tokens=n_tok, global_sequences=5,
                 behaviour_logprobs=[[-6.0] * (len(seqs[i][0]) - seqs[i][1]) for i in rows])
    return seqs, advs, batches


def _reference_grad_norm(model, seqs, advs) -> float:
    """Single process, whole batch at once: the first step's gradient norm (old = ref = policy)."""
    full = build_micro_batches(_rank_batches(seqs, advs, [len(seqs)])[0], len(seqs), 0)[0]
    lp = token_logprobs(model, full.input_ids, full.attention_mask, 16, target_mask=full.target_mask)
    loss, _ = POLICY_LOSSES["grpo_clip"](lp, lp.detach(), full.advantages, full.loss_mask, lp.detach(),
                                         kl_coef=KL, denominator=full.n_tokens)
    loss.backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())).item()
    model.zero_grad(set_to_none=True)
    return norm


@pytest.fixture(scope="module")
def e2e_model_dir(tmp_path_factory) -> str:
    # hidden 256: the (tied) embedding and the MLPs exceed ZeRO-3's persistence threshold (1e5
    # elements) and are really partitioned; the attention projections stay whole. Both kinds.
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny256", seed=0, hidden_size=256)


@pytest.fixture(scope="module")
def ranks(e2e_model_dir):
    """A private local Ray with two DeepSpeedLearner actors (ZeRO-3, gloo) and a weight-sync
    receiver in this process (its transport in the returned dict)."""
    from learner_ranks import learner_ranks

    from rlsys.config import AlgorithmConfig, LearnerConfig

    # Synchronous (so no truncated importance sampling): the single-process reference gradient
    # below has no importance weights, and the batches carry sampler log-probs of -6.
    ac = AlgorithmConfig(kl_coef=KL, ppo_epochs=1, max_staleness=0)
    with learner_ranks(e2e_model_dir, LearnerConfig(**E2E_LC), ac) as r:
        yield r


def _all(learners, method: str, *args):
    import ray
    return ray.get([getattr(lr, method).remote(*args) for lr in learners])


@pytest.mark.e2e
def test_two_zero3_ranks_train_broadcast_and_save(ranks, e2e_model_dir, tmp_path):
    import ray
    from transformers import AutoModelForCausalLM

    from learners.zero_params import digest
    from rlsys.weight_sync import TensorMeta

    learners = ranks["learners"]
    tiny = AutoModelForCausalLM.from_pretrained(e2e_model_dir, dtype=torch.float32)
    seqs, advs, batches = _e2e_batches()
    n_tok = batches[0]["global_tokens"]
    want_norm = _reference_grad_norm(tiny, seqs, advs)

    partitioned = ray.get(learners[0].__ray_call__.remote(
        lambda s: {n: not p.ds_persist for n, p in s.hf_model.named_parameters()}))
    assert partitioned["model.embed_tokens.weight"] and not partitioned["model.norm.weight"]
    metas = [TensorMeta(n, tuple(s), d) for n, s, d in ray.get(learners[0].weight_metadata.remote())]
    names = [m.name for m in metas]
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names  # tied

    def train_step():
        return ray.get([lr.train_step.remote(b) for lr, b in zip(learners, batches)])

    before = _all(learners, "gathered_digest")
    assert before[1] == {} and set(before[0]) == set(names)
    steps = [train_step()]
    # Second step with two epochs: the second epoch's old log-probs are the first epoch's
    # detached forward (no separate no-grad pass for a single mini-batch) and its ratio moves.
    ray.get([lr.__ray_call__.remote(lambda s: setattr(s, "ac", s.ac.model_copy(update={"ppo_epochs": 2})))
             for lr in learners])
    steps.append(train_step())
    for metrics in steps:
        assert metrics[0] == metrics[1]  # reduced over ranks
        m = metrics[0]
        assert all(torch.isfinite(torch.tensor(v)) for v in m.values()), m
        assert m["learner/response_tokens"] == n_tok and m["learner/sequences"] == 5
        assert m["learner/micro_batches_per_rank"] == 2
        assert m["policy/logprob_mismatch"] > 0 and m["policy/entropy"] > 0 and m["time/learner_step"] > 0
    first, second = steps[0][0], steps[1][0]
    assert first["policy/grad_norm"] == pytest.approx(want_norm, rel=1e-4)
    assert first["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert first["loss/kl"] == pytest.approx(0.0, abs=1e-6)
    assert "time/learner_old_logprobs" not in second and "time/learner_old_logprobs" not in first
    assert second["policy/ratio_mean"] != 1.0 and second["loss/kl"] > 0
    # PPO mini-batches (two epochs x two mini-batches = four optimizer steps), split as the driver
    # does: every update after the first is against the policy before the first, so the ratio
    # leaves 1; in the second epoch the tokens just pushed in their advantage's direction
    # overshoot the trust region and clipping engages.
    from rlsys.batching import split_for_ranks, split_mini_batches
    ray.get([lr.__ray_call__.remote(lambda s: setattr(s, "ac", s.ac.model_copy(update={"ppo_epochs": 2})))
             for lr in learners])
    samples = [{"group": i, "prompt_token_ids": ids[:p], "token_ids": ids[p:], "advantage": a,
                "logprobs": [-6.0] * (len(ids) - p)} for i, ((ids, p), a) in enumerate(zip(seqs, advs))]
    parts = [split_for_ranks(part, 2) for part in split_mini_batches(samples, 2, random.Random(0))]
    mb = ray.get([lr.train_step.remote({"mini_batches": [pp[r] for pp in parts]}) for r, lr in enumerate(learners)])
    assert mb[0] == mb[1]
    mb = mb[0]
    assert mb["learner/optimizer_steps"] == 4 and "time/learner_old_logprobs" in mb
    assert mb["learner/response_tokens"] == n_tok and math.isfinite(mb["loss/total"])
    assert mb["policy/clip_frac"] > 0 and mb["policy/ratio_mean"] != 1.0, mb
    assert steps[0][0]["policy/clip_frac"] == 0.0 and steps[0][0]["learner/optimizer_steps"] == 1

    after = _all(learners, "gathered_digest")[0]
    assert all(after[n] != before[0][n] for n in names)

    # Broadcast: what arrives equals the learner's gathered weights.
    got: dict[str, list[float]] = {}
    th = threading.Thread(target=lambda: got.update(
        {n: digest(t.clone()) for n, t in ranks["transport"].receive(metas)}))
    th.start()
    info = _all(learners, "broadcast_weights")[0]
    th.join(60)
    assert got == after and info["bytes"] == sum(m.numel * 4 for m in metas)

    # save_hf: loads with transformers; same weights and same log-probs as the learner.
    out = str(tmp_path / "hf")
    assert _all(learners, "save_hf", out) == [out, out]
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert {n: digest(p.detach()) for n, p in saved.named_parameters()} == after
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    assert saved.config.use_cache == tiny.config.use_cache
    ids, mask = _padded([17, 12], seed=3)

    def learner_logprobs(self, ids, mask):  # runs in every actor: a ZeRO-3 forward is collective
        with torch.no_grad():
            k = num_chunks_for(int(mask[:, 1:].sum()), self.lc.logprob_chunk_tokens)
            return self.engine(ids, mask, mask[:, 1:].bool(), k)[0].cpu()

    want = ray.get([lr.__ray_call__.remote(learner_logprobs, ids, mask) for lr in learners])[0]
    with torch.no_grad():
        assert torch.allclose(naive_token_logprobs(saved, ids, mask), want, atol=1e-5)

    # DeepSpeed checkpoint: a step after load_checkpoint repeats the step after saving.
    ckpt = str(tmp_path / "ds")
    _all(learners, "save_checkpoint", ckpt)
    redo = []
    for _ in range(2):
        redo.append(train_step()[0])
        _all(learners, "load_checkpoint", ckpt)
    for k in ("loss/total", "loss/kl", "policy/grad_norm", "policy/ratio_mean"):
        assert redo[0][k] == pytest.approx(redo[1][k], rel=1e-6), k
