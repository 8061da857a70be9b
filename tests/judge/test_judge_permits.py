"""Real local Ray + the HTTP fake judge: permits end with their holder (issue 9).

A run's judge workers hold permits of the cluster-wide limiter (a named, detached actor shared
by every run under the same judge name). A closed pool's permits go back at once, a killed
worker's are reclaimed as soon as Ray reports it dead, and a live slow request keeps counting.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from judge_helpers import TEST_KEY_ENV, fast_config, story
from fake_judge_server import expected_sq
from rewards.judge_rubric import POLARIS_RUBRIC, judge_visible_prompt, visible_story
from rlsys.judge.actor_pool import JudgeActorPool
from rlsys.judge.limiter import RayLimiterClient, get_cluster_limiter
from rlsys.judge.metrics import JudgeMetrics

SLOW = "[[FAULTS:slow]]"  # the server holds the reply for slow_s (or until the client hangs up)


def _args(item: dict[str, str]) -> tuple[str, str]:
    return judge_visible_prompt(item["prompt"]), visible_story(item["story"])


def _wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _slow_config(base_url: str, name: str, workers: int):
    # One request's permit outlives any test here unless its holder's end gives it back: the
    # server holds slow replies for 120 s, the request timeout (and so the lease) is longer.
    return fast_config(base_url, name=name, api_key_env=TEST_KEY_ENV, max_concurrency=2, timeout_s=120.0,
                       workers={"min_workers": workers, "max_workers": workers, "target_backlog_per_worker": 8})


def test_closed_pool_hands_its_permits_to_the_next_run(ray_local, judge_server):
    srv = judge_server(slow_s=120.0)
    cfg = _slow_config(srv.base_url, "handover", workers=1)
    first = JudgeActorPool(cfg, POLARIS_RUBRIC, JudgeMetrics(), namespace="judge-test-permits")
    worker = first.workers[0].handle
    # 2 requests in flight (the whole concurrency budget) and 4 more waiting for a permit
    pending = [worker.score_one.remote(*_args(story(i, SLOW))) for i in range(6)]
    _wait_for(lambda: srv.in_flight == 2, 30, "the first run's requests to reach the server")
    first.close()  # the run's shutdown path, with permits outstanding
    del pending

    second = JudgeActorPool(cfg, POLARIS_RUBRIC, JudgeMetrics(), namespace="judge-test-permits")
    try:
        item = story(100)
        t0 = time.monotonic()
        outcome, _ = ray_local.get(second.workers[0].handle.score_one.remote(*_args(item)), timeout=60)
        took = time.monotonic() - t0
    finally:
        second.close()
    assert outcome["score"] == pytest.approx(expected_sq(visible_story(item["story"]))), outcome
    assert took < 2.0, f"the next run waited {took:.1f} s for a permit"


def test_killed_worker_permits_are_reclaimed_but_live_slow_requests_still_count(ray_local, judge_server):
    srv = judge_server(slow_s=120.0)
    cfg = _slow_config(srv.base_url, "reclaim", workers=2)
    pool = JudgeActorPool(cfg, POLARIS_RUBRIC, JudgeMetrics(), namespace="judge-test-permits")
    victim, survivor = pool.workers[0].handle, pool.workers[1].handle
    try:
        live = survivor.score_one.remote(*_args(story(0, SLOW)))  # a live slow request: keeps its permit
        _wait_for(lambda: srv.in_flight == 1, 30, "the survivor's slow request")
        doomed = [victim.score_one.remote(*_args(story(i, SLOW))) for i in range(1, 4)]  # 1 sent, 2 waiting
        _wait_for(lambda: srv.in_flight == 2, 30, "the victim's request")
        ray_local.kill(victim)
        del doomed
        t0 = time.monotonic()
        item = story(100)
        outcome, _ = ray_local.get(survivor.score_one.remote(*_args(item)), timeout=60)
        took = time.monotonic() - t0
        assert outcome["score"] == pytest.approx(expected_sq(visible_story(item["story"]))), outcome
        assert took < 5.0, f"the dead worker's permits were reclaimed only after {took:.1f} s"
        # The live slow request still holds its permit (seconds after the reclaim, many liveness
        # checks later): of 4 more stories at most one at a time reaches the server beside it.
        time.sleep(2.0)
        more = [story(200 + i) for i in range(4)]
        outs = ray_local.get([survivor.score_one.remote(*_args(it)) for it in more], timeout=60)
        assert [o["score"] for o, _ in outs] == pytest.approx([expected_sq(visible_story(it["story"])) for it in more])
        assert srv.in_flight == 1 and srv.max_in_flight <= 2
    finally:
        pool.workers = [w for w in pool.workers if w.handle is not victim]
        pool.close()
    del live


def test_abandoned_acquire_leaves_no_permit_and_new_budgets_are_named(ray_local, caplog):
    cfg = fast_config("http://127.0.0.1:9/v1", name="abandon", max_concurrency=1, timeout_s=120.0)
    client = RayLimiterClient(get_cluster_limiter(cfg, "judge-test-permits"), "driver/0")

    async def main() -> None:
        first = await client.acquire(10)
        with pytest.raises(asyncio.TimeoutError):  # the one slot is taken: this caller gives up
            await asyncio.wait_for(client.acquire(10), 0.5)
        await client.release(first)
        # The abandoned acquire was cancelled in the limiter (or its permit handed back unused),
        # so the slot is free now, not when a 150 s lease ends.
        await client.release(await asyncio.wait_for(client.acquire(10), 5.0))

    asyncio.run(main())
    # A later run with other budgets reconfigures the limiter, and the warning says what changed.
    with caplog.at_level(logging.WARNING, logger="rlsys.judge.limiter"):
        get_cluster_limiter(cfg.model_copy(update={"requests_per_minute": 30_000}), "judge-test-permits")
    assert "requests 1000 -> 500" in caplog.text and "'abandon'" in caplog.text
