"""Real local Ray: several JudgeWorker actors share one cluster-wide limiter (also with requests
delayed in transit); autoscaling; a worker killed mid-run loses no story."""

from __future__ import annotations

import threading
import time

import pytest

from judge_helpers import TEST_KEY, TEST_KEY_ENV, fast_config, story
from fake_judge_server import expected_sq, max_in_window, max_sum_in_window
from rewards.judge_rubric import visible_story
from rlsys.judge.client import JudgeFatalError
from rlsys.judge.limiter import get_cluster_limiter, limits_for
from rlsys.judge.pool import JudgeScorer


def test_limit_is_cluster_wide_across_workers(ray_local, judge_server):
    # Permits travel limiter actor -> worker and requests 0-0.1 s in transit; no margin is needed:
    # each request counts in the one log until its response is back at its worker.
    srv = judge_server(rate_limit=8, rate_window_s=0.5, latency_s=0.05, transit_jitter_s=0.1)
    cfg = fast_config(srv.base_url, name="cluster", api_key_env=TEST_KEY_ENV, requests_per_minute=960,
                      rate_window_s=0.5, window_margin_s=0.0, max_concurrency=3, tokens_per_minute=120 * 8000,
                      workers={"min_workers": 2, "max_workers": 2, "chunk_size": 4, "target_backlog_per_worker": 8})
    items = [story(i, "[[FAULTS:500]]" if i % 9 == 0 else "") for i in range(64)]
    with JudgeScorer(cfg, backend="ray", namespace="judge-test-a") as scorer:
        res = scorer.score_items(items)
        sent = [ray_local.get(w.handle.total_requests.remote()) for w in scorer._backend.workers]
        summary = scorer.metrics_summary()
    assert all(not r["masked"] for r in res)
    assert [r["score"] for r in res] == pytest.approx([expected_sq(visible_story(i["story"])) for i in items])
    assert len(sent) == 2 and min(sent) > 0, sent  # both processes really sent requests...
    assert srv.over_limit == 0  # ...yet together they stayed within the one budget
    assert max_in_window(srv.arrivals, 0.5) <= 8
    assert srv.max_in_flight <= 3
    assert max_sum_in_window(srv.tokens, 0.5) <= 8000
    assert summary["requests"] == len(srv.arrivals) == sum(sent)
    assert srv.auth_headers == {f"Bearer {TEST_KEY}"}
    # one limiter per judge name: a later driver with new budgets reconfigures it, never adds one
    cfg2 = cfg.model_copy(update={"requests_per_minute": 480})
    handle = get_cluster_limiter(cfg2, "judge-test-a")
    assert ray_local.get(handle.limits.remote()) == limits_for(cfg2)


def test_autoscaling_and_worker_death(ray_local, judge_server):
    srv = judge_server(latency_s=0.15)
    cfg = fast_config(srv.base_url, name="scaling", api_key_env=TEST_KEY_ENV, max_concurrency=16, window_margin_s=0.2,
                      workers={"min_workers": 1, "max_workers": 3, "chunk_size": 4,
                               "target_backlog_per_worker": 8, "scale_down_idle_s": 0})
    items = [story(i) for i in range(96)]
    with JudgeScorer(cfg, backend="ray", namespace="judge-test-b") as scorer:
        pool = scorer._backend

        def kill_a_busy_worker() -> None:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not any(w.in_flight for w in pool.workers[1:]):
                time.sleep(0.01)
            busy = next(w for w in pool.workers[1:] if w.in_flight)
            ray_local.kill(busy.handle)

        killer = threading.Thread(target=kill_a_busy_worker)
        killer.start()
        res = scorer.score_items(items)
        killer.join()
        summary = scorer.metrics_summary()
    assert all(not r["masked"] for r in res)  # the killed worker's chunks were resubmitted
    assert [r["score"] for r in res] == pytest.approx([expected_sq(visible_story(i["story"])) for i in items])
    assert summary["workers_peak"] == 3  # backlog 96 / 8 per worker -> capped at max 3
    assert summary["workers"] == 1  # idle workers scaled back to min
    assert summary["worker_restarts"] >= 1


def test_fatal_error_crosses_ray_cleanly(ray_local, judge_server):
    srv = judge_server()
    srv.default_mode = "401"  # the body echoes the Authorization header
    cfg = fast_config(srv.base_url, name="fatal", api_key_env=TEST_KEY_ENV, max_concurrency=2)
    with JudgeScorer(cfg, backend="ray", namespace="judge-test-c") as scorer:
        with pytest.raises(JudgeFatalError) as err:
            scorer.score_items([story(i) for i in range(40)])
    assert str(err.value).startswith("judge 'fatal': HTTP 401") and TEST_KEY not in str(err.value)
    # The other chunks were cancelled, not left hammering: of 40 stories only the requests
    # already in flight (or racing the cancellation) reached the server.
    assert len(srv.arrivals) <= 8
