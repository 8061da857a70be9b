"""`rlsys eval`: the model cards' metrics computed by hand on small scored groups (pure), and
(e2e) the command through the real stack comparing two checkpoints side by side, with recipe A's
multi-turn transition timing (its simulator is tested without Ray in test_eval_episodes.py)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from rlsys.eval_metrics import card_metrics, recipe_a_metrics, recipe_b_metrics, recipe_c_metrics

ROOT = Path(__file__).resolve().parents[1]


def answer(next_episode: str) -> str:
    return '```json\n{"plot_list": [{"narrative": "n"}], "next_episode": "' + next_episode + '"}\n```'


def sample(text: str, example: dict, **rewards) -> dict:
    return {"text": text, "valid": True, "example": example, **{f"reward_{k}": v for k, v in rewards.items()}}


def test_recipe_a_accuracy_and_json():
    t0 = {"story_id": "s", "turn_index": 0, "reference_next_episode": "1"}
    t1 = {"story_id": "s", "turn_index": 1, "reference_next_episode": "2"}
    t2 = {"story_id": "s", "turn_index": 2, "reference_next_episode": "2"}
    groups = [
        [sample(answer("1"), t0, acc=1.0), sample("no json", t0, acc=0.0)],
        [sample(answer("1"), t1, acc=0.0), sample(answer("2"), t1, acc=1.0)],
        [sample(answer("3"), t2, acc=0.0), sample(answer("9"), t2, acc=0.0)],
    ]
    m = recipe_a_metrics(groups)
    assert m["A/acc@1"] == pytest.approx(1 / 3) and m["A/avg@2"] == pytest.approx(2 / 6)
    assert m["A/pass@2"] == pytest.approx(2 / 3) and m["A/json@2"] == pytest.approx(5 / 6)
    # Transition timing needs multi-turn rollouts (tests/test_eval_episodes.py), not single prompts.
    assert not any(key.startswith("A/timing") for key in m)


def test_recipe_b_length_adherence_buckets_and_slope():
    short = {"messages": [{"role": "user", "content": "A tale, approximately 500 words long."}]}
    long_ = {"target_word_count": 2000, "messages": []}
    groups = [[sample("w " * 250, short, sq=0.5), sample("w " * 500, short, sq=0.7)],
              [sample("w " * 1000, long_, sq=0.2), sample("w " * 3000, long_, sq=0.4)]]
    m = recipe_b_metrics(groups)
    assert m["B/length_adherence_<1k"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["B/length_adherence_1-4k"] == pytest.approx((0.5 + 1.5) / 2)
    assert m["B/judge_score_<1k"] == pytest.approx(0.6) and m["B/judge_score_1-4k"] == pytest.approx(0.3)
    assert m["B/judge_score"] == pytest.approx(0.45)
    # Bucket centres 0.5k and 2.5k words: slope (0.3 - 0.6) / 2.0 per 1k words.
    assert m["B/score_slope_per_1k_words"] == pytest.approx(-0.15)
    masked = dict(groups[0][0], valid=False, reward_sq=math.nan)
    assert recipe_b_metrics([[masked, groups[0][1]]])["B/judge_score"] == pytest.approx(0.7)


def test_recipe_c_structure_links_and_grounding():
    real, synth = {"synthetic": False}, {"synthetic": True}
    groups = [[sample("a", real, st_struct=1.0, st_reid=0.5, st_ground=1.0),
               sample("b", real, st_struct=0.0, st_reid=0.0, st_ground=0.0)],
              [sample("c", synth, st_struct=1.0, st_reid=-0.25, st_ground=0.5)]]
    m = recipe_c_metrics(groups)
    assert m["C/structure_rate"] == pytest.approx(2 / 3) and m["C/grounding_share"] == pytest.approx(0.5)
    assert m["C/reid_links_real"] == pytest.approx(0.25) and m["C/reid_links_synthetic"] == pytest.approx(0.25)
    both = card_metrics(groups, ["st_struct", "st_reid", "st_ground"])
    assert both["mean/st_reid"] == pytest.approx(0.25 / 3) and both["masked_share"] == 0.0 and "A/acc@1" not in both


@pytest.mark.e2e
def test_eval_compares_two_checkpoints(tmp_path):
    from rlsys.data.synth import write_dataset
    from rlsys.data.synth_graph import Story
    from rlsys.eval_episodes import story_path
    from rlsys.models import build_tiny_model

    a = build_tiny_model(tmp_path / "a", seed=0)
    b = build_tiny_model(tmp_path / "b", seed=1)
    paths = write_dataset(tmp_path / "data", 2, 0, "jsonl", 0.0)
    data = paths["test"]
    out = tmp_path / "eval"
    overrides = [str(ROOT / "configs" / "demo.yaml"), f"model.path={a}", f"data.path={data}", "model.dtype=float32",
                 "rollout.max_new_tokens=16", "rollout.kv_cache_gib=0.25", "rollout.max_model_len=2048",
                 "cluster.num_cpus=8", "cluster.object_store_gib=0.5"]
    proc = subprocess.run(
        [sys.executable, "-m", "rlsys.cli", "eval", *overrides,
         "--model", a, "--model", b, "--k", "3", "--limit", "4", "--timing-budget", "2", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "eval.json").read_text())
    assert list(report["results"]) == [a, b] and (out / "eval.png").stat().st_size > 1000
    assert report["timing_budget"] == 2
    # The test split is one story (its first 4 prompts evaluated); timing plays every episode
    # of one path through it, seeded by the config's seed (demo.yaml: 1).
    graph = json.loads(paths["graphs"].read_text())["stories"][-1]
    episodes = len(story_path(Story.from_json(graph), 1))
    for r in report["results"].values():
        assert r["prompts"] + r["skipped_prompts"] == 4 and r["k"] == 3
        assert {"A/acc@1", "A/pass@3", "A/json@3", "A/avg@3", "mean/div"} <= set(r)
        assert 0 <= r["A/pass@3"] <= 1 and math.isfinite(r["mean/div"])
        assert r["A/timing_episodes"] + r["A/timing_skipped_episodes"] == episodes
        assert sum(r[f"A/timing_{b}"] for b in ("too_fast", "on_time", "too_slow", "failure")) == pytest.approx(1)
        assert 0 <= r["A/timing_wrong_target"] <= r["A/timing_failure"]
        assert episodes <= r["A/timing_answers"] <= 3 * episodes     # floor(1.5 * 2) rounds at most
    assert "A/pass@3" in proc.stdout and "A/timing_on_time" in proc.stdout and Path(b).name in proc.stdout
    # Without graphs.json timing stops before Ray starts, naming the file and the way out.
    paths["graphs"].unlink()
    proc = subprocess.run([sys.executable, "-m", "rlsys.cli", "eval", *overrides, "--model", a, "--k", "1",
                           "--limit", "1", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "graphs.json does not exist" in proc.stderr and "--no-timing" in proc.stderr
