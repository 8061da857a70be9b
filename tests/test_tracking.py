"""Run outputs: per-step rollout files keep stable column types across steps, empty steps are
fine, metrics are appended as they happen, a resumed run drops the later steps of the attempt it
continues, and closing writes metrics.json and the curves PNG."""
import json

from rlsys.tracking import RunTracker, read_metrics, read_rollouts


def _sample(**kw):
    base = dict(prompt_uid="u", group=0, sample=0, policy_version=0, text="x", finish_reason="stop",
                reward=1.0, advantage=0.5, valid=True, mask_reason=None, token_ids=[1, 2],
                reward_sq=None, reward_rep=0.1)
    return {**base, **kw}


def test_rollouts_parquet_types_and_outputs(tmp_path):
    t = RunTracker(str(tmp_path), 2, {"name": "t"})
    t.log_rollouts([_sample()], 1)        # mask_reason and reward_sq all None in the first step
    t.log_rollouts([], 2)                 # every group dropped
    t.log_rollouts([_sample(valid=False, mask_reason="parse_error", reward_sq=0.3, token_ids=[1])], 2)
    t.log_step(1, {"reward/sq": 0.2, "loss/total": 0.1, "time/step": 3.0})
    t.log_step(2, {"reward/sq": 0.4, "loss/total": 0.0, "time/step": 2.0})
    t.close()
    assert [h["step"] for h in read_metrics(tmp_path)] == [1, 2]   # there before close()
    rows = read_rollouts(tmp_path).to_pylist()
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[1]["mask_reason"] == "parse_error" and rows[1]["reward_sq"] == 0.3
    assert rows[0]["reward_sq"] is None and rows[1]["response_tokens"] == 1
    history = json.loads((tmp_path / "metrics.json").read_text())
    assert [h["reward/sq"] for h in history] == [0.2, 0.4]
    assert (tmp_path / "curves.png").stat().st_size > 5000
    assert "name: t" in (tmp_path / "config.yaml").read_text()


def test_resume_drops_later_steps_and_survives_a_torn_line(tmp_path):
    t = RunTracker(str(tmp_path), 4, {})
    for step in (1, 2, 3):
        t.log_rollouts([_sample(reward_rep=float(step))], step)
        t.log_step(step, {"loss/total": float(step)})
    # A kill mid-append leaves a torn last line; no close() either.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss/to')
    assert [h["step"] for h in read_metrics(tmp_path)] == [1, 2, 3]
    t = RunTracker(str(tmp_path), 4, {}, resume_step=2)        # the checkpoint was at step 2
    assert [h["step"] for h in t.history] == [1, 2]
    t.log_rollouts([_sample(reward_rep=30.0)], 3)
    t.log_step(3, {"loss/total": 30.0})
    t.close()
    assert [(h["step"], h["loss/total"]) for h in read_metrics(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert [(r["step"], r["reward_rep"]) for r in read_rollouts(tmp_path).to_pylist()] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    # A fresh start in the same directory replaces the earlier run's logs.
    t = RunTracker(str(tmp_path), 4, {})
    t.close()
    assert read_metrics(tmp_path) == [] and read_rollouts(tmp_path).num_rows == 0
