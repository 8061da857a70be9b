"""Recipe B's reward path for real: a local Ray, a `RewardWorker` actor with recipe B's channels
(sq, rep, len_pen, blank) whose judge-worker actors call the fault-injecting HTTP judge from
tests/judge; masking, the driver's drop rule, advantages, judge and channel metrics (no secret)
and the judge cache as checkpoint state."""
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import ray
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent / "judge"))

from fake_judge_server import FakeJudgeServer, expected_sq  # noqa: E402
from judge_helpers import TEST_KEY, TEST_KEY_ENV, fast_config  # noqa: E402

from actors.reward import RewardWorker, merge_judge_metrics  # noqa: E402
from rewards.judge_rubric import visible_story  # noqa: E402
from rewards.polaris import polaris_rule_channels  # noqa: E402
from rlsys.batching import assign_advantages, group_is_usable  # noqa: E402
from rlsys.config import RewardConfig  # noqa: E402

WEIGHTS = {"sq": 1.0, "rep": -1.5, "len_pen": -0.8, "blank": -1.0}
PROMPT = [{"role": "user", "content": "Write a story about a bell. It should be approximately 300 words long."}]
BADx3 = "[[FAULTS:badscore,badscore,badscore]]"  # 1 try + 2 parse retries, all unparseable -> masked


def tale(i: int, n: int = 200, extra: str = "") -> str:
    return f"<think>plan {i}</think>" + " ".join(f"t{i}w{k}" for k in range(n)) + f" {extra}".rstrip()


GROUPS = [  # texts per group, as the rollout would return them
    [tale(0), tale(1, 40), tale(2, extra="[[FAULTS:429,ok]]"), "The bell rang again. " * 60],
    [tale(3), tale(4, extra=BADx3), tale(5, extra="[[FAULTS:500,ok]]"), "<think>never finished"],
    [tale(6, extra=BADx3), tale(7, extra=BADx3), tale(8), tale(9, extra=BADx3)],  # 1 scored: driver drops it
]


@pytest.fixture(scope="module")
def ray_cluster():
    """Own small Ray unless a judge-test session already started one (then reuse, leave running)."""
    os.environ[TEST_KEY_ENV] = TEST_KEY  # workers inherit the raylet's env, started here
    if ray.is_initialized():
        yield
        return
    temp_dir = f"/tmp/ray_polaris_{os.getpid()}"
    ray.init(num_cpus=8, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False,
             object_store_memory=200 * 1024 * 1024)
    yield
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def rewarder(ray_cluster, tmp_path):
    srv = FakeJudgeServer(retry_after_ms="50").start()
    cfg = fast_config(srv.base_url, name="polaris-actor", api_key_env=TEST_KEY_ENV, price_input_per_1m=1.0,
                      price_output_per_1m=4.0, workers={"min_workers": 1, "max_workers": 1, "num_cpus": 0.25})
    judge_yaml = tmp_path / "judge.yaml"
    judge_yaml.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    reward_cfg = RewardConfig(judge=str(judge_yaml), weights=WEIGHTS, aggregation="sum_then_norm")
    actor = ray.remote(num_cpus=0.5)(RewardWorker).remote(reward_cfg)
    yield actor, srv
    ray.get(actor.shutdown.remote())
    ray.kill(actor)
    srv.stop()


def test_polaris_reward_actor_end_to_end(rewarder, tmp_path):
    actor, srv = rewarder
    # Inside Ray the judge runs on worker actors behind the cluster-wide limiter.
    assert ray.get(actor.__ray_call__.remote(lambda w: type(w.judge._backend).__name__)) == "JudgeActorPool"
    example = {"uid": "p0", "messages": PROMPT, "story": "ref", "target_word_count": 300}
    scored = ray.get(actor.score_groups.remote([{"texts": g, "example": example} for g in GROUPS]))

    for texts, out in zip(GROUPS, scored):  # per-sample rule channels, whatever the judge did
        for c in ("rep", "len_pen", "blank"):
            assert out[c] == pytest.approx([polaris_rule_channels(t, PROMPT, 300)[c] for t in texts])
    a, b, c = scored
    assert a["valid"] == [True] * 4 and a["mask_reason"] == [None] * 4  # 429 was retried, not masked
    assert a["sq"] == pytest.approx([expected_sq(visible_story(t)) for t in GROUPS[0]])
    assert a["blank"] == [0.0, 1.0, 0.0, 0.0] and a["rep"][3] == 1.5  # 40 words; the loop hits the cap
    assert b["valid"] == [True, False, True, True] and b["mask_reason"][1].startswith("sq: parse_error:")
    assert math.isnan(b["sq"][1]) and b["sq"][3] == 0.0 and b["blank"][3] == 1.0  # unfinished think: empty story
    assert c["valid"] == [False, False, True, False] and c["mask_reason"][2] is None

    # The driver's rule: groups with < 2 valid samples are dropped; masked samples get no advantage.
    kept = [out for out in scored if group_is_usable(out["valid"])]
    assert len(kept) == 2
    groups = [[{"valid": out["valid"][j], **{f"reward_{ch}": out[ch][j] for ch in WEIGHTS}} for j in range(4)]
              for out in kept]
    assert_advantages(groups)

    m = ray.get(actor.judge_metrics.remote())
    for key in ("requests", "http_429", "retries", "failures", "masked", "latency_p50_s", "latency_p95_s",
                "tokens_in", "tokens_out", "cost_usd"):
        assert isinstance(m[f"judge/{key}"], float), key
    assert m["judge/http_429"] == 1 and m["judge/retries"] >= 1 + 1 + 4 * 2  # 429, 500, parse retries
    assert m["judge/masked"] == 4 and m["judge/failures"] == 4
    assert m["judge/requests"] == len(srv.arrivals) and m["judge/cost_usd"] > 0
    assert 0 < m["judge/latency_p50_s"] <= m["judge/latency_p95_s"]
    assert TEST_KEY not in repr(m) and srv.auth_headers == {f"Bearer {TEST_KEY}"}  # key used, never shown
    assert merge_judge_metrics([m, m])["judge/requests"] == 2 * m["judge/requests"]
    ch = ray.get(actor.channel_metrics.remote())  # per channel, since the last call
    assert ch["reward_masked/sq"] == 4 and ch["reward_time/sq_s"] > 0 and ch["reward_time/rep_s"] >= 0
    assert ray.get(actor.channel_metrics.remote()) == {}

    # Checkpoint state: the judge cache round-trips; cached verdicts cost no request.
    path = str(tmp_path / "ckpt" / "judge_cache.json")
    assert ray.get(actor.save_state.remote(path)) == path and TEST_KEY not in Path(path).read_text()
    assert ray.get(actor.load_state.remote(path)) == 7  # scored stories with a non-empty story
    assert ray.get(actor.load_state.remote(str(tmp_path / "missing.json"))) == 0
    before = len(srv.arrivals)
    again = ray.get(actor.score_groups.remote([{"texts": GROUPS[0], "example": example}]))
    assert again[0]["sq"] == a["sq"] and len(srv.arrivals) == before


def assert_advantages(groups: list[list[dict]]) -> None:
    assign_advantages(groups, WEIGHTS, aggregation="sum_then_norm")
    for g in groups:
        valid = [s["advantage"] for s in g if s["valid"]]
        assert sum(valid) == pytest.approx(0.0, abs=1e-9) and any(v != 0 for v in valid)
        assert all(s["advantage"] == 0.0 for s in g if not s["valid"])
