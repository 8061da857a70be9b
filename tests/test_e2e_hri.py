"""POLARIS with human reference injection through the real stack: a private Ray head, a vLLM
engine, a reward actor whose sq channel calls a judge HTTP server on 127.0.0.1 through judge
worker actors, two DeepSpeed ZeRO-3 ranks, a tiny random-init model, recipe B's channels.

Each group comes back with its human reference story as a last, teacher-forced member (token
ids from the engine's tokenizer, no sampler log-probs), scored by the same judge; the policy
samples' advantages ignore it; its own advantage is its reward against them times the warming
up weight (0 at step 1); the learner trains on it (and leaves it out of the log-prob mismatch)."""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e

sys.path.insert(0, str(Path(__file__).resolve().parent / "judge"))

G, PROMPTS, WEIGHT = 4, 2, 0.4
WEIGHTS = {"sq": 1.0, "rep": -1.5, "len_pen": -0.8, "blank": -1.0}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import ray
    from fake_judge_server import FakeJudgeServer
    from judge_helpers import TEST_KEY, TEST_KEY_ENV, fast_config

    from rlsys import cluster
    from rlsys.config import ClusterConfig
    from rlsys.data.polaris import write_polaris_dataset
    from rlsys.models import build_tiny_model

    root = tmp_path_factory.mktemp("hri")
    os.environ[TEST_KEY_ENV] = TEST_KEY  # the raylet started below passes it to the judge workers
    srv = FakeJudgeServer().start()
    judge_yaml = root / "judge.yaml"
    judge_yaml.write_text(yaml.safe_dump(fast_config(
        srv.base_url, api_key_env=TEST_KEY_ENV,
        workers={"min_workers": 1, "max_workers": 1, "num_cpus": 0.25}).model_dump(mode="json")))
    model_dir = build_tiny_model(root / "model", seed=0)
    data = write_polaris_dataset(root / "data", n=6, seed=0, fmt="jsonl")["train"]
    cluster.connect(ClusterConfig(num_cpus=8, object_store_gib=0.5))
    yield root, model_dir, data, judge_yaml, srv
    cluster.shutdown()
    srv.stop()
    assert not ray.is_initialized()


def zscore(x, xs, eps=1e-6):
    mean = sum(xs) / len(xs)
    return (x - mean) / (math.sqrt(sum((v - mean) ** 2 for v in xs) / len(xs)) + eps)


def test_reference_story_joins_each_group_teacher_forced(setup):
    from rlsys.config import load_config
    from rlsys.data.loading import load_for_run
    from rlsys.data.stream import PromptStream
    from rlsys.driver import GRPORun
    from rlsys.steps import grpo_step, make_pipeline

    root, model_dir, data, judge_yaml, srv = setup
    cfg = load_config(base={
        "seed": 0, "model": {"path": model_dir, "dtype": "float32"},
        "data": {"path": str(data), "format": "polaris"},
        "rollout": {"prompts_per_step": PROMPTS, "group_size": G, "max_new_tokens": 24, "max_model_len": 512,
                    "kv_cache_gib": 0.25, "temperature": 1.0, "top_p": 1.0},
        "reward": {"judge": str(judge_yaml), "weights": WEIGHTS, "aggregation": "sum_then_norm"},
        "algorithm": {"kl_coef": 0.0, "max_staleness": 0, "reference_injection": {"enabled": True, "weight": WEIGHT, "warmup_steps": 1}},
        "learner": {"num_ranks": 2, "micro_batch_size": 8, "lr": 1e-3, "gradient_checkpointing": False},
        "train": {"steps": 2, "output_dir": str(root / "run")},
    })
    examples = {e.uid: e for e in load_for_run(cfg)}
    run = GRPORun(cfg, model_dir)
    try:
        stream = PromptStream(list(examples.values()), shuffle=True, seed=cfg.seed)
        channels = cfg.reward.active_channels()
        steps = [grpo_step(run, make_pipeline(run, stream, cfg, channels), cfg, channels) for _ in range(2)]
    finally:
        run.shutdown()

    requests_before = len(srv.arrivals)
    for step, (samples, metrics) in enumerate(steps, start=1):
        groups = {}
        for s in samples:
            groups.setdefault(s["group"], []).append(s)
        assert len(groups) == PROMPTS
        for g in groups.values():
            policy, refs = [s for s in g if not s["is_reference"]], [s for s in g if s["is_reference"]]
            assert len(policy) == G and len(refs) == 1 and refs[0]["sample"] == G  # the last member
            ref = refs[0]
            story = examples[ref["prompt_uid"]].story
            assert ref["logprobs"] is None and ref["finish_reason"] == "reference_truncated"  # > 24 tokens
            assert len(ref["token_ids"]) == 24 and len(ref["text"].split()) > 5
            assert " ".join(story.split()).startswith(" ".join(ref["text"].split()))  # the story's first tokens
            assert ref["prompt_token_ids"] == policy[0]["prompt_token_ids"]
            assert ref["valid"] and math.isfinite(ref["reward_sq"])  # scored by the same judge
            assert sum(s["advantage"] for s in policy) == pytest.approx(0.0, abs=1e-6)  # its stats: policy only
            z = zscore(ref["reward"], [s["reward"] for s in policy])
            assert ref["advantage"] == pytest.approx((0.0 if step == 1 else WEIGHT) * z, rel=1e-5, abs=1e-9)
        assert metrics["reward_ref/sq"] == pytest.approx(
            sum(s["reward_sq"] for s in samples if s["is_reference"]) / PROMPTS)
        assert metrics["learner/optimizer_steps"] == 1
        assert metrics["policy/logprob_mismatch"] < 1e-3  # policy rows only: a reference row would be ~nats
    assert requests_before > 0
