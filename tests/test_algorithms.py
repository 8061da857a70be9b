"""GRPO advantages and the clipped loss, checked against values worked out by hand."""
import math

import pytest
import torch

from rlsys.algorithms import ADVANTAGE_ESTIMATORS, POLICY_LOSSES
from rlsys.algorithms.advantages import group_zscore
from rlsys.algorithms.losses import kl_penalty, masked_mean
from rlsys.batching import assign_advantages, split_for_ranks

grpo = ADVANTAGE_ESTIMATORS["grpo"]
clip_loss = POLICY_LOSSES["grpo_clip"]


def test_zscore_uses_population_std_and_eps():
    # [1, 3]: mean 2, population std 1 -> [-1, 1] (sample std would give ±0.707).
    z = group_zscore(torch.tensor([1.0, 3.0]), torch.tensor([True, True]), eps=0.0)
    assert torch.allclose(z, torch.tensor([-1.0, 1.0]))
    z = group_zscore(torch.tensor([1.0, 3.0]), torch.tensor([True, True]), eps=1.0)
    assert torch.allclose(z, torch.tensor([-0.5, 0.5]))


def test_constant_channel_contributes_zero_not_nan():
    # Channel 0 constant (all 1.0), channel 1 varies: advantages come from channel 1 only.
    r = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    a = grpo(r, torch.tensor([0.5, 0.25]))
    assert not torch.isnan(a).any()
    assert torch.allclose(a, 0.25 * torch.tensor([-1.0, 1.0, -1.0, 1.0]), atol=1e-5)


def test_per_channel_differs_from_sum_then_norm():
    # Channel scales differ: per-channel normalisation equalises them, sum-then-norm does not.
    r = torch.tensor([[10.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    w = torch.tensor([1.0, 1.0])
    per = grpo(r, w, aggregation="per_channel")
    summed = grpo(r, w, aggregation="sum_then_norm")
    # sum-then-norm on totals [10, 1, 0]: mean 11/3.
    tot = torch.tensor([10.0, 1.0, 0.0])
    expect = (tot - tot.mean()) / (tot.std(unbiased=False) + 1e-6)
    assert torch.allclose(summed, expect, atol=1e-5)
    assert not torch.allclose(per, summed, atol=1e-2)
    # per-channel: channel 0 z = [1.414, -0.707, -0.707], channel 1 z = [-0.707, 1.414, -0.707].
    assert torch.allclose(per, torch.tensor([0.7071, 0.7071, -1.4142]), atol=1e-3)


def test_invalid_samples_excluded_from_stats():
    r = torch.tensor([[0.0], [1.0], [100.0]])
    valid = torch.tensor([True, True, False])
    a = grpo(r, torch.tensor([1.0]), valid)
    assert a[2] == 0
    assert torch.allclose(a[:2], torch.tensor([-1.0, 1.0]), atol=1e-5)
    # fewer than 2 valid: nothing to compare against
    assert torch.all(grpo(r, torch.tensor([1.0]), torch.tensor([True, False, False])) == 0)


def test_clip_bounds_are_decoupled():
    # ratio = e^0.5 = 1.6487 with positive advantage: clipped at 1 + 0.28 -> loss -1.28.
    lp, old = torch.tensor([[0.5]]), torch.tensor([[0.0]])
    mask = torch.ones(1, 1)
    loss, m = clip_loss(lp, old, torch.tensor([1.0]), mask, clip_low=0.2, clip_high=0.28)
    assert math.isclose(loss.item(), -1.28, rel_tol=1e-5)
    assert m["clip_frac"] == 1.0
    # ratio = e^-0.5 = 0.6065 with negative advantage: clipped at 1 - 0.2 -> loss +0.8.
    loss, _ = clip_loss(-lp, old, torch.tensor([-1.0]), mask, clip_low=0.2, clip_high=0.28)
    assert math.isclose(loss.item(), 0.8, rel_tol=1e-5)
    # ratio below 1 - clip_low with positive advantage is NOT clipped (pessimistic min).
    loss, _ = clip_loss(-lp, old, torch.tensor([1.0]), mask, clip_low=0.2, clip_high=0.28)
    assert math.isclose(loss.item(), -math.exp(-0.5), rel_tol=1e-5)


def test_gradient_zero_when_clipped_and_nonzero_inside():
    old = torch.zeros(1, 2)
    lp = torch.tensor([[0.5, 0.01]], requires_grad=True)
    loss, _ = clip_loss(lp, old, torch.tensor([1.0]), torch.ones(1, 2), clip_low=0.2, clip_high=0.28)
    loss.backward()
    assert lp.grad[0, 0] == 0            # clipped token: no gradient
    assert lp.grad[0, 1] < 0             # inside the trust region: pushes logprob up


def test_token_mean_aggregation_and_mask():
    x = torch.tensor([[1.0, 1.0, 1.0, 9.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert masked_mean(x, mask, "token_mean").item() == pytest.approx(7.0 / 4)
    assert masked_mean(x, mask, "seq_mean_token_mean").item() == pytest.approx((1.0 + 4.0) / 2)
    # A micro-batch of a larger batch divides by the whole batch's token count.
    assert masked_mean(x, mask, "token_mean", denominator=14.0).item() == pytest.approx(0.5)


def test_kl_k3_matches_formula_and_is_nonnegative():
    lp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -1.0, -0.5])
    k3 = kl_penalty(lp, ref, "k3")
    d = ref - lp
    assert torch.allclose(k3, torch.exp(d) - d - 1)
    assert torch.all(k3 >= 0) and k3[2] == 0
    loss, m = clip_loss(lp[None], lp[None], torch.tensor([0.0]), torch.ones(1, 3), ref[None], kl_coef=0.1)
    assert m["kl"] == pytest.approx(k3.mean().item(), rel=1e-5)
    assert loss.item() == pytest.approx(0.1 * k3.mean().item(), rel=1e-5)


def _sample(n_prompt, n_resp, **rewards):
    return {"prompt_token_ids": [1] * n_prompt, "token_ids": [2] * n_resp, "logprobs": [-0.1] * n_resp,
            **{f"reward_{k}": v for k, v in rewards.items()}}


def test_assign_advantages_and_rank_split():
    groups = [[_sample(5, 3, fmt=1.0, acc=0.0), _sample(5, 7, fmt=0.0, acc=0.0)],
              [_sample(9, 2, fmt=1.0, acc=1.0), _sample(9, 4, fmt=1.0, acc=0.0), _sample(9, 1, fmt=1.0, acc=1.0)]]
    assign_advantages(groups, {"fmt": 1.0, "acc": 2.0})
    assert groups[0][0]["advantage"] == pytest.approx(1.0, abs=1e-4)
    assert groups[0][1]["advantage"] == pytest.approx(-1.0, abs=1e-4)
    # group 2: fmt constant -> 0; acc [1,0,1] z = [0.707, -1.414, 0.707] times 2
    assert groups[1][1]["advantage"] == pytest.approx(-2 * 1.4142, abs=1e-3)
    assert groups[1][0]["reward"] == pytest.approx(3.0)
    samples = [s for g in groups for s in g]
    batches = split_for_ranks(samples, 2)
    assert sorted(len(b["input_ids"]) for b in batches) == [2, 3]
    assert all(b["global_tokens"] == 17 and b["global_sequences"] == 5 for b in batches)
    got = sorted(a for b in batches for a in b["advantages"])
    assert got == pytest.approx(sorted(s["advantage"] for s in samples))
    for b in batches:
        for ids, plen in zip(b["input_ids"], b["prompt_lens"]):
            assert ids[:plen] == [1] * plen and set(ids[plen:]) == {2}


def test_mean_baseline_estimator_subtracts_group_mean_only():
    # weighted totals [3, 1, 2] (w = 1, 2): mean 2 -> [1, -1, 0]; no std scaling; invalid -> 0.
    r = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [9.0, 9.0]])
    a = ADVANTAGE_ESTIMATORS["reinforce_mean"](r, torch.tensor([1.0, 2.0]), torch.tensor([True, True, True, False]))
    assert torch.allclose(a, torch.tensor([1.0, -1.0, 0.0, 0.0]))


def test_truncated_is_weights_and_their_effect_on_the_loss():
    """min(pi_old / mu, cap) per token, 1 where the sampler gave no log-prob; the weights scale
    each token's policy-gradient term (and its gradient), not the KL."""
    from rlsys.algorithms.losses import truncated_is_weights

    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]])
    beh = torch.tensor([[-1.0, -1.0, -2.0], [0.0, 0.0, 0.0]])
    has = torch.tensor([[True, True, True], [False, False, False]])
    w, truncated = truncated_is_weights(old, beh, has, cap=2.0)
    want = torch.tensor([[1.0, math.exp(-1.0), 2.0], [1.0, 1.0, 1.0]])   # exp(1.5) = 4.48 -> capped at 2
    assert torch.allclose(w, want) and truncated.tolist() == [[False, False, True], [False, False, False]]

    loss_fn = POLICY_LOSSES["grpo_clip"]
    mask = torch.ones(2, 3)
    adv = torch.tensor([1.0, -0.5])
    lp = old.clone().requires_grad_(True)
    loss, _ = loss_fn(lp, old, adv, mask, is_weights=w)
    loss.backward()
    # At ratio 1 the surrogate's gradient per token is -A / n_tokens, now times w.
    assert torch.allclose(lp.grad, -(adv[:, None] * want) / 6.0)
    plain, _ = loss_fn(old.clone(), old, adv, mask)
    assert float(loss.detach()) == pytest.approx(float(-(adv[:, None] * want).sum() / 6.0))
    assert float(plain) == pytest.approx(float(-(adv[:, None] * torch.ones(2, 3)).sum() / 6.0))
