"""`rlsys demo`: one command per recipe. The rule-based stand-in judge (its rules, and a real
JudgeScorer scoring through it over HTTP on 127.0.0.1), the command's argument handling, and
(e2e) `rlsys demo polaris` with no API key: it makes its data, starts the stand-in, says so, and
runs POLARIS with human reference injection through the real stack on a tiny model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rewards.judge_rubric import POLARIS_RUBRIC, compute_overall
from rlsys.judge.standin import StandinJudge, standin_verdict

ROOT = Path(__file__).resolve().parents[1]
VARIED = " ".join(f"The keeper{i % 97} watched wave{i % 89} under lamp{i % 83}." for i in range(80))


def overall(story: str) -> float:
    v = standin_verdict(story)
    return compute_overall(POLARIS_RUBRIC, v["positive"], v["negative"], v["bonus"], v["penalty"])


def test_standin_rules_prefer_long_varied_stories_over_short_or_looping_ones():
    short = "The lamp went out. The sea was calm. Nobody came."
    loop = "The bell rang again. " * 120
    assert overall(VARIED) > overall(short) > 0 and overall(VARIED) > overall(loop)
    v = standin_verdict(loop)
    assert v["negative"]["repetition"] > 0 and all(x == 0 for k, x in v["negative"].items() if k != "repetition")
    for d in POLARIS_RUBRIC.positive:  # within the rubric's ranges, whatever the input
        assert 0 <= standin_verdict(VARIED)["positive"][d.name] <= d.max_points
    assert overall("") == 0.0


def test_judge_scorer_scores_through_the_standin_over_http():
    from rlsys.judge import JudgeScorer
    from rlsys.judge.config import judge_config_from_dict

    with StandinJudge() as standin:
        cfg = judge_config_from_dict({"name": "standin", "base_url": standin.base_url, "model": "standin",
                                      "api_key_env": None, "timeout_s": 10, "requests_per_minute": 6000})
        with JudgeScorer(cfg) as scorer:
            res = scorer.score_items([{"prompt": "Write a story, approximately 300 words long.",
                                       "story": f"<think>plan</think>{VARIED}"},
                                      {"prompt": "Write.", "story": "Short one. Two. Three."}])
    assert [r["masked"] for r in res] == [False, False]
    assert res[0]["score"] == pytest.approx(overall(VARIED) / 100) and res[0]["score"] > res[1]["score"]


def test_demo_rejects_an_unknown_recipe(capsys):
    from rlsys.cli import main

    assert main(["demo", "grpo-of-my-dreams"]) == 2


@pytest.mark.e2e
def test_demo_polaris_without_a_key_uses_the_standin_judge(tmp_path):
    from rlsys.models import build_tiny_model
    from rlsys.tracking import read_metrics

    model = build_tiny_model(tmp_path / "model", seed=0)
    data, out = tmp_path / "polaris" / "train.parquet", tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "GEMINI_API_KEY"}
    proc = subprocess.run(
        [sys.executable, "-m", "rlsys.cli", "demo", "polaris", f"model.path={model}", "model.dtype=float32",
         f"data.path={data}", f"train.output_dir={out}", "rollout.prompts_per_step=2", "rollout.group_size=3",
         "rollout.max_new_tokens=24", "rollout.max_model_len=1024", "rollout.kv_cache_gib=0.25",
         "learner.gradient_checkpointing=false", "cluster.num_cpus=8", "cluster.object_store_gib=0.5",
         "train.steps=2"],
        cwd=ROOT, env=dict(env, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "STAND-IN judge at http://127.0.0.1:" in proc.stderr and data.is_file()  # said so; made its data
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["judge/requests"] > 0 and "reward/sq" in m and "reward_ref/sq" in m  # HRI: the reference too
        assert m["rollout/groups"] == 2
    saved = json.loads(json.dumps(__import__("yaml").safe_load((out / "config.yaml").read_text())))
    assert saved["reward"]["judge"].endswith("judge_standin.yaml") and (out / "judge_standin.yaml").is_file()
