"""The learning signal's pure parts: the clipped gradient against its formula, mini-batch
splitting, the group screen (non-finite rewards, < 2 valid, zero variance), and the prompt
stream. No Ray, vLLM or DeepSpeed."""
from __future__ import annotations

import math
import random

import pytest
import torch

from rlsys.algorithms import POLICY_LOSSES
from rlsys.batching import (assign_advantages, group_is_constant, mask_nonfinite, screen_groups,
                            split_for_ranks, split_mini_batches)
from rlsys.data.stream import PromptStream

clip_loss = POLICY_LOSSES["grpo_clip"]


def test_clipped_gradient_is_the_formula():
    """d loss / d logp_t for token-mean PPO-clip with denominator D: -A * ratio / D where the
    unclipped term is the one min() takes, 0 where the clipped one is (ratio out of bounds on
    the side the advantage pushes)."""
    lo, hi, D = 0.2, 0.28, 10.0
    ratios = [1.5, 1.1, 0.5, 0.5, 1.5, 0.9]
    advs = [1.0, 1.0, 1.0, -2.0, -2.0, -2.0]
    old = torch.zeros(6, 1)
    lp = torch.tensor([[math.log(r)] for r in ratios], requires_grad=True)
    loss, m = clip_loss(lp, old, torch.tensor(advs), torch.ones(6, 1), clip_low=lo, clip_high=hi,
                        denominator=D)
    loss.backward()
    clipped = [r > 1 + hi if a > 0 else r < 1 - lo for r, a in zip(ratios, advs)]
    assert clipped == [True, False, False, True, False, False]
    want = [0.0 if c else -a * r / D for r, a, c in zip(ratios, advs, clipped)]
    assert lp.grad[:, 0].tolist() == pytest.approx(want, rel=1e-6)
    assert m["clip_frac"] == pytest.approx(2 / 6)
    want_loss = sum(-min(r * a, min(max(r, 1 - lo), 1 + hi) * a) for r, a in zip(ratios, advs)) / D
    assert loss.item() == pytest.approx(want_loss, rel=1e-6)


def _samples(group_sizes, seed=0):
    rng = random.Random(seed)
    out = []
    for g, n in enumerate(group_sizes):
        plen = rng.randint(3, 9)
        for j in range(n):
            k = rng.randint(1, 12)
            out.append({"group": g, "prompt_uid": f"p{g}", "prompt_token_ids": [1] * plen, "token_ids": [2] * k,
                        "logprobs": [-0.5] * k, "advantage": rng.uniform(-1, 1)})
    return out


def test_mini_batches_keep_groups_whole_and_cover_everything():
    samples = _samples([4, 4, 3, 4, 2])
    parts = split_mini_batches(samples, 2, random.Random(0))
    assert len(parts) == 2 and sorted(len(p) for p in parts) == [8, 9]
    assert sorted(id(s) for p in parts for s in p) == sorted(id(s) for s in samples)
    for p in parts:
        for g in {s["group"] for s in p}:
            assert sum(s["group"] == g for s in p) == sum(s["group"] == g for s in samples)
    # Capped at one group per mini-batch; seeded.
    assert len(split_mini_batches(samples, 9, random.Random(0))) == 5
    assert [len(p) for p in split_mini_batches(samples, 3, random.Random(4))] == \
           [len(p) for p in split_mini_batches(samples, 3, random.Random(4))]
    # Each mini-batch carries its own global totals (its exact token-mean), per rank.
    for p in parts:
        per_rank = split_for_ranks(p, 2)
        assert all(b["global_tokens"] == sum(len(s["token_ids"]) for s in p) for b in per_rank)


def _mb_grads(tiny, samples, parts, world, micro):
    """Gradient per mini-batch: (a) single process over the whole mini-batch, (b) what the
    learner does: split over ranks and micro-batches, scaled, averaged over ranks."""
    from learners.logprobs import token_logprobs
    from learners.microbatches import backward_scale, build_micro_batches, filler_micro_batch

    def loss_of(mb, denominator):
        lp = token_logprobs(tiny, mb.input_ids, mb.attention_mask, 6, target_mask=mb.target_mask,
                            temperature=0.7)
        old = lp.detach() + 0.3 * torch.sin(mb.input_ids[:, 1:].float())
        return clip_loss(lp, old, mb.advantages, mb.loss_mask, None, denominator=denominator)[0]

    def grads():
        out = {n: p.grad.clone() for n, p in tiny.named_parameters()}
        tiny.zero_grad(set_to_none=True)
        return out

    results = []
    for part in parts:
        whole = build_micro_batches(split_for_ranks(part, 1)[0], 100, 0)[0]
        loss_of(whole, whole.n_tokens).backward()
        want = grads()
        per_rank = [build_micro_batches(b, micro, 0) for b in split_for_ranks(part, world)]
        k = max(len(m) for m in per_rank)
        denominator = split_for_ranks(part, world)[0]["global_tokens"]
        got = None
        for mbs in per_rank:
            for mb in mbs + [filler_micro_batch(0)] * (k - len(mbs)):
                (loss_of(mb, denominator) * backward_scale(world)).backward()
            g = grads()
            got = g if got is None else {n: got[n] + g[n] for n in g}
        results.append((want, {n: v / world for n, v in got.items()}))
    return results


def test_mini_batch_token_mean_exact_across_ranks_and_micro_batches(tmp_path):
    from transformers import AutoModelForCausalLM

    from rlsys.models import build_tiny_model

    tiny = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "tiny", seed=0), dtype=torch.float32)
    samples = _samples([3, 2, 4, 3], seed=2)
    for s in samples:
        s["token_ids"] = [random.Random(len(s["token_ids"])).randint(3, 400) for _ in s["token_ids"]]
    parts = split_mini_batches(samples, 2, random.Random(1))
    for want, got in _mb_grads(tiny, samples, parts, world=2, micro=2):
        for n in want:
            assert torch.allclose(got[n], want[n], atol=1e-6, rtol=1e-4), n


def _g(*rows, valid=None):
    return [{"reward_a": a, "reward_b": b, "valid": True if valid is None else valid[i]}
            for i, (a, b) in enumerate(rows)]


def test_nonfinite_rewards_are_masked_never_propagated():
    groups = [_g((1.0, 0.0), (float("nan"), 1.0), (0.0, 1.0)),
              _g((1.0, float("inf")), (None, 1.0), (0.5, 0.5)),
              _g((0.0, 0.0), (1.0, 1.0))]
    kept, counts = screen_groups(groups, ["a", "b"])
    assert counts["masked_nonfinite"] == 3 and counts["dropped_groups"] == 1  # group 2: one valid left
    assert len(kept) == 2
    bad = groups[0][1]
    assert not bad["valid"] and "a=nan" in bad["mask_reason"]
    assign_advantages(kept, {"a": 1.0, "b": 1.0})
    for g in kept:
        for s in g:
            assert math.isfinite(s["advantage"])
            assert s["advantage"] == 0.0 or s["valid"]
    # Only valid samples enter the statistics: the two valid ones of group 0 are z-scored ±.
    adv = [s["advantage"] for s in kept[0]]
    assert adv[1] == 0.0 and adv[0] == pytest.approx(-adv[2])
    # Overflowing rewards: the advantage would be NaN; the sample is masked instead.
    huge = [_g((1e308, 0.0), (-1e308, 0.0), (0.0, 0.0))]
    assign_advantages(huge, {"a": 1.0})
    assert all(math.isfinite(s["advantage"]) for s in huge[0])
    assert mask_nonfinite([{"reward_a": "x", "valid": True}], ["a"]) == 1


def test_zero_variance_filter():
    const = _g((1.0, 0.5), (1.0, 0.5), (1.0, 0.5))
    varied = _g((1.0, 0.5), (1.0, 0.5), (0.0, 0.5))
    masked_rest = _g((1.0, 0.5), (1.0, 0.5), (0.0, 0.0), valid=[True, True, False])
    assert group_is_constant(const, ["a", "b"], 1e-6) and not group_is_constant(varied, ["a", "b"], 1e-6)
    assert group_is_constant(masked_rest, ["a", "b"], 1e-6)  # the only variance is a masked sample
    kept, counts = screen_groups([const, varied, masked_rest], ["a", "b"])
    assert len(kept) == 3 and counts["filtered_groups"] == 0  # off by default
    kept, counts = screen_groups([const, varied, masked_rest], ["a", "b"], filter_constant=True, std_threshold=1e-6)
    assert kept == [varied] and counts["filtered_groups"] == 2
    # A threshold above the spread filters it too.
    assert screen_groups([varied], ["a", "b"], filter_constant=True, std_threshold=0.5)[1]["filtered_groups"] == 1


def test_prompt_stream_crosses_epochs_and_resumes():
    s = PromptStream(list(range(5)), shuffle=True, seed=3)
    first = s.take(3) + s.take(3) + s.take(4)
    assert sorted(first[:5]) == list(range(5)) and sorted(first[5:]) == list(range(5))
    assert first[:5] != first[5:]  # a fresh permutation each epoch
    assert s.state() == {"epoch": 1, "index": 5}
    again = PromptStream(list(range(5)), shuffle=True, seed=3, epoch=1, index=2)
    assert again.take(3) == first[7:10]
    assert PromptStream([1, 2], shuffle=False, seed=0).take(5) == [1, 2, 1, 2, 1]
    with pytest.raises(ValueError):
        PromptStream([], shuffle=False, seed=0)


class _FakeRun:
    """generate_and_score of a GRPORun, scripted: each prompt's group is constant (filtered)
    when its value is even, varied otherwise."""

    def __init__(self):
        self.asked = []

    def generate_and_score(self, examples, seed_round=None):
        self.asked.append(list(examples))
        groups = [[{"reward_a": float(e % 2) * j, "valid": True, "token_ids": [1] * 3, "prompt_uid": e}
                   for j in range(3)] for e in examples]
        return groups, {"time/generate": 1.0, "time/reward_wait": 0.5, "rollout/generated_tokens": 9.0 * len(examples)}


def _cfg(**filter_groups):
    from rlsys.config import RunConfig
    return RunConfig.model_construct(
        rollout=type("R", (), {"prompts_per_step": 4})(),
        algorithm=type("A", (), {"filter_groups": type("F", (), {"enabled": True, "std_threshold": 1e-6,
                                                                  "refill": False, "max_refill_rounds": 3,
                                                                  **filter_groups})()})())


def test_refill_samples_more_prompts_until_the_step_is_full():
    from rlsys.steps import collect_groups

    run = _FakeRun()
    groups, m = collect_groups(run, PromptStream(list(range(20)), shuffle=False, seed=0), _cfg(refill=True), ["a"], 1)
    # Prompts 0..3 keep 1 and 3; then 2 more asked (4, 5 -> keeps 5); then 1 (6 -> none); then 1 (7).
    assert [len(a) for a in run.asked] == [4, 2, 1, 1]
    assert [g[0]["prompt_uid"] for g in groups] == [1, 3, 5, 7]
    assert [s["group"] for g in groups for s in g][::3] == [0, 1, 2, 3]
    assert m["rollout/filtered_groups"] == 4 and m["rollout/refill_rounds"] == 3 and m["rollout/groups"] == 4
    assert m["time/generate"] == 4.0 and m["perf/gen_tokens_per_s"] == pytest.approx(72 / 4.0)

    # Bounded: no more than max_refill_rounds extra rounds, then the step goes on short.
    run = _FakeRun()
    groups, m = collect_groups(run, PromptStream([0, 2, 4, 6, 8, 10, 12, 14, 1], shuffle=False, seed=0),
                               _cfg(refill=True, max_refill_rounds=1), ["a"], 1)
    assert len(run.asked) == 2 and m["rollout/refill_rounds"] == 1 and groups == []
    # Without refill one round only; filter off keeps everything.
    run = _FakeRun()
    groups, m = collect_groups(run, PromptStream(list(range(8)), shuffle=False, seed=0), _cfg(), ["a"], 1)
    assert len(run.asked) == 1 and len(groups) == 2
    groups, m = collect_groups(_FakeRun(), PromptStream(list(range(8)), shuffle=False, seed=0), _cfg(enabled=False), ["a"], 1)
    assert len(groups) == 4 and m["rollout/filtered_groups"] == 0
