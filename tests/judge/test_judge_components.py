"""Unit tests without a server or Ray: limiter, backoff, Retry-After, breaker, cache, metrics, config."""

from __future__ import annotations

import asyncio
import json
import random
import time
from email.utils import formatdate
from pathlib import Path

import pytest
from pydantic import BaseModel

from fake_judge_server import max_in_window
from rlsys.judge.cache import JudgeCache, cache_key
from rlsys.judge.config import JudgeConfig, JudgeConfigError, MissingApiKeyError, judge_config_from_dict, load_judge_config
from rlsys.judge.limiter import (AcquireAbandoned, HolderGone, Limits, LimiterCore, LimiterService, LocalLimiter,
                                Permit, PermitTooLarge, RayLimiterClient, limits_for)
from rlsys.judge.metrics import JudgeMetrics, percentile
from rlsys.judge.resilience import (CircuitBreaker, ServerLimits, backoff_delay, parse_duration,
                                    parse_rate_limit_headers, parse_retry_after)

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------- limiter


def test_core_window_counts_until_the_response_is_in():
    """A permit stays in the log from its grant until window + margin after its release: the
    server counts a request when it arrives, which can be any time before the response."""
    core = LimiterCore(Limits(requests=3, tokens=None, concurrency=100, window_s=1.0, margin_s=0.1, lease_s=50.0))
    grants = [core.try_acquire(1, 0.0) for _ in range(3)]
    assert all(isinstance(g, Permit) for g in grants)
    assert core.try_acquire(1, 1.5) == pytest.approx(50.0 + 1.1 - 1.5)  # none released: until a lease ends
    for g, t in zip(grants, (0.2, 0.3, 2.0)):
        core.release(g.id, now=t)
    assert core.try_acquire(1, 1.25) == pytest.approx(0.2 + 1.1 - 1.25)  # the first response + window + margin
    assert isinstance(core.try_acquire(1, 1.3), Permit)
    assert isinstance(core.try_acquire(1, 1.35), float)  # the 3rd response came in late: still in the window
    assert isinstance(core.try_acquire(1, 1.41), Permit)  # the second one has left


def test_core_abandoned_or_unanswered_permits_count_longer():
    core = LimiterCore(Limits(requests=1, tokens=None, concurrency=5, window_s=1.0, lease_s=5.0, late_s=0.5))
    core.try_acquire(1, 0.0)  # its holder dies and never releases it
    assert core.try_acquire(1, 5.5) == pytest.approx(1.0)  # lease end (5) + window (1) + late (0.5) - now
    p = core.try_acquire(1, 6.5)
    core.release(p.id, answered=False, now=7.0)  # timed out: the request may still reach the server
    assert core.try_acquire(1, 8.2) == pytest.approx(7.0 + 1.0 + 0.5 - 8.2)
    p = core.try_acquire(1, 8.5)
    core.release(p.id, now=9.0)  # answered: it has certainly arrived
    assert isinstance(core.try_acquire(1, 10.0), Permit)


def test_core_cap_lowers_but_never_raises_the_budget():
    core = LimiterCore(Limits(requests=10, tokens=1000, concurrency=100, window_s=1.0))
    assert core.cap(requests=4, tokens=None) and core.limits.requests == 4 and core.limits.tokens == 1000
    assert not core.cap(requests=4)
    assert core.cap(requests=50, tokens=200) and (core.limits.requests, core.limits.tokens) == (10, 200)
    ps = [core.try_acquire(1, 0.0) for _ in range(10)]
    assert all(isinstance(p, Permit) for p in ps)
    assert core.cap(requests=3)  # already 10 in the window: wait until 8 of them have left
    for n, p in enumerate(ps):
        core.release(p.id, now=0.1 * n)
    assert core.try_acquire(1, 1.0) == pytest.approx(0.1 * 7 + 1.0 - 1.0)


def test_core_tokens_reconciled_and_too_large():
    core = LimiterCore(Limits(requests=100, tokens=1000, concurrency=100, window_s=1.0))
    a = core.try_acquire(600, 0.0)
    assert isinstance(core.try_acquire(600, 0.1), float)  # 1200 > 1000
    core.release(a.id, actual_tokens=200, now=0.15)  # the reply used less than reserved
    assert isinstance(core.try_acquire(600, 0.2), Permit)
    with pytest.raises(PermitTooLarge):
        core.try_acquire(1001, 0.3)


def test_core_concurrency_lease_and_pause():
    core = LimiterCore(Limits(requests=100, tokens=None, concurrency=2, window_s=1.0, lease_s=5.0))
    a, _ = core.try_acquire(1, 0.0), core.try_acquire(1, 0.0)
    assert core.try_acquire(1, 0.1) == pytest.approx(4.9)  # until a lease expires
    core.release(a.id, now=0.15)
    assert isinstance(core.try_acquire(1, 0.2), Permit)
    assert isinstance(core.try_acquire(1, 5.5), Permit)  # an abandoned lease expired
    core.pause(2.0, 6.0)
    assert core.try_acquire(1, 6.5) == pytest.approx(1.5)


def test_core_refunds_an_unsent_permit():
    core = LimiterCore(Limits(requests=1, tokens=100, concurrency=5, window_s=1.0))
    p = core.try_acquire(60, 0.0)
    assert isinstance(core.try_acquire(1, 0.1), float)
    core.release(p.id, sent=False, now=0.15)  # never sent: request slot and tokens both come back
    assert isinstance(core.try_acquire(100, 0.2), Permit)


def test_core_permits_end_with_their_holder():
    """A holder that ended (its pool closed, its actor died) gives its concurrency slots back at
    once and is refused from then on; other holders keep theirs."""
    core = LimiterCore(Limits(requests=100, tokens=None, concurrency=2, window_s=1.0, lease_s=50.0, late_s=0.5))
    a = core.try_acquire(1, 0.0, holder="run1/0")
    core.try_acquire(1, 0.0, holder="run1/1")
    assert core.try_acquire(1, 0.1, holder="run2/0") == pytest.approx(49.9)  # full until a lease ends
    assert core.end_holder("run1/0", now=0.2) == 1  # its worker died
    assert isinstance(core.try_acquire(1, 0.2, holder="run2/0"), Permit)
    with pytest.raises(HolderGone):
        core.try_acquire(1, 0.3, holder="run1/0")
    core.release(a.id, now=0.4)  # a late release of a reclaimed permit changes nothing
    assert core.holders() == {"run1/1", "run2/0"}
    assert core.end_holder("run1", now=0.5) == 1  # the pool closed: its other worker's permit
    with pytest.raises(HolderGone):
        core.try_acquire(1, 0.6, holder="run1/7")
    assert core.holders() == {"run2/0"} and core.in_flight() == 1


def test_core_ended_holders_requests_stay_in_the_window_as_unanswered():
    # The dead holder may have sent its request just before it ended: window + late after that.
    core = LimiterCore(Limits(requests=1, tokens=None, concurrency=5, window_s=1.0, lease_s=50.0, late_s=0.5))
    core.try_acquire(1, 0.0, holder="run1/0")
    core.end_holder("run1", now=2.0)
    assert core.try_acquire(1, 2.1, holder="run2/0") == pytest.approx(2.0 + 1.0 + 0.5 - 2.1)
    assert isinstance(core.try_acquire(1, 3.5, holder="run2/0"), Permit)


def test_local_limiter_refuses_the_waiting_acquires_of_an_ended_holder():
    lim = LocalLimiter(Limits(requests=100, tokens=None, concurrency=1, window_s=1.0, lease_s=50.0))

    async def main() -> None:
        await lim.acquire(1, "run1/0")
        waiting = asyncio.ensure_future(lim.acquire(1, "run1/1"))
        await asyncio.sleep(0.05)
        assert lim.busy_holders() == {"run1/0", "run1/1"}
        assert lim.end("run1") == 1
        with pytest.raises(HolderGone):
            await asyncio.wait_for(waiting, 1)
        await asyncio.wait_for(lim.acquire(1, "run2/0"), 1)  # the slot is free at once
        assert lim.busy_holders() == {"run2/0"}

    asyncio.run(main())


class _Ref:
    """Stands in for a Ray ObjectRef: awaitable any number of times, and a caller that stops
    awaiting it does not cancel the call (it goes on in the actor)."""

    def __init__(self, task: asyncio.Task) -> None:
        self.task = task

    def __await__(self):
        return asyncio.shield(self.task).__await__()


class _Handle:
    """A ``LimiterService`` behind an actor-handle-like ``handle.method.remote(...)``, whose
    acquire replies reach the caller ``reply_delay_s`` after the grant (transit)."""

    def __init__(self, service: LimiterService, reply_delay_s: float = 0.0) -> None:
        self.service, self.reply_delay_s = service, reply_delay_s

    def __getattr__(self, name: str):
        method = getattr(self.service, name)
        delay = self.reply_delay_s if name == "acquire" else 0.0

        async def call(*args):
            out = await method(*args)
            await asyncio.sleep(delay)
            return out

        return type("Method", (), {"remote": staticmethod(lambda *a: _Ref(asyncio.ensure_future(call(*a))))})


def test_abandoned_acquire_never_holds_a_permit_whatever_the_order():
    """A caller that stops waiting for a permit leaves none behind: its acquire is cancelled while
    it waits in the limiter, refused if the abandon got there first, and -- granted with the reply
    still in transit when the caller gave up -- handed back unused on arrival."""
    limits = Limits(requests=100, tokens=None, concurrency=1, window_s=1.0, lease_s=50.0)

    async def waiting_in_the_limiter() -> None:
        svc = LimiterService(limits)
        first = await svc.acquire(1, "run/0", "r1")
        waiting = asyncio.ensure_future(svc.acquire(1, "run/0", "r2"))
        await asyncio.sleep(0.05)
        await svc.abandon("r2")
        with pytest.raises(AcquireAbandoned):
            await asyncio.wait_for(waiting, 1)
        await svc.release(first)
        await asyncio.wait_for(svc.acquire(1, "run/0", "r3"), 1)  # the slot went to nobody else
        await svc.abandon("r4")  # abandoned before its acquire arrived
        with pytest.raises(AcquireAbandoned):
            await svc.acquire(1, "run/0", "r4")

    async def granted_in_transit() -> None:
        svc = LimiterService(limits)
        client = RayLimiterClient(_Handle(svc, reply_delay_s=0.3), "run/0")
        first = await client.acquire(1)

        async def release_soon() -> None:
            await asyncio.sleep(0.05)
            await client.release(first)

        releasing = asyncio.ensure_future(release_soon())
        with pytest.raises(asyncio.TimeoutError):  # granted at 0.05 s, but the reply lands at 0.35 s
            await asyncio.wait_for(client.acquire(1), 0.15)
        await releasing
        assert svc._inner.core.in_flight() == 1  # granted to a caller that has gone
        second = await asyncio.wait_for(client.acquire(1), 2)  # handed back as soon as it arrives
        assert svc._inner.core.in_flight() == 1
        await client.release(second)

    asyncio.run(waiting_in_the_limiter())
    asyncio.run(granted_in_transit())


def test_limits_for_scales_per_minute_budgets():
    cfg = JudgeConfig(base_url="http://127.0.0.1:1/v1", model="m", requests_per_minute=600,
                      tokens_per_minute=60_000, rate_window_s=2.0)
    lim = limits_for(cfg)
    assert (lim.requests, lim.tokens, lim.window_s) == (20, 2000, 2.0)


def test_local_limiter_holds_window_under_contention():
    lim = LocalLimiter(Limits(requests=5, tokens=None, concurrency=3, window_s=0.2, margin_s=0.0))
    times: list[float] = []
    state = {"now": 0, "peak": 0}

    async def one() -> None:
        p = await lim.acquire(1)
        times.append(time.monotonic())
        state["now"] += 1
        state["peak"] = max(state["peak"], state["now"])
        await asyncio.sleep(0.01)
        state["now"] -= 1
        await lim.release(p)

    async def main() -> None:
        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(20))), 10)

    asyncio.run(main())
    assert len(times) == 20
    assert max_in_window(times, 0.2) <= 5
    assert state["peak"] <= 3
    assert times[-1] - times[0] >= 0.55  # 20 grants at 5 per 0.2 s need >= 3 full windows


# ------------------------------------------------------------------ retry helpers


def test_backoff_grows_caps_and_jitters():
    rng = random.Random(0)
    no_jitter = [backoff_delay(n, 0.5, 3.0, 0.0, rng) for n in range(1, 6)]
    assert no_jitter == [0.5, 1.0, 2.0, 3.0, 3.0]
    jittered = [backoff_delay(3, 0.5, 3.0, 0.5, rng) for _ in range(200)]
    assert all(1.0 <= d <= 2.0 for d in jittered) and len(set(jittered)) > 100


def test_retry_after_forms():
    now = time.time()
    assert parse_retry_after({"retry-after": "7"}, now) == 7.0
    assert parse_retry_after({"retry-after": "0.25"}, now) == 0.25
    assert parse_retry_after({"retry-after": "9", "retry-after-ms": "120"}, now) == pytest.approx(0.12)
    assert parse_retry_after({"retry-after": formatdate(now + 30, usegmt=True)}, now) == pytest.approx(30, abs=1.5)
    assert parse_retry_after({"retry-after": "soon"}, now) is None
    assert parse_retry_after({}, now) is None


def test_rate_limit_headers_say_what_the_whole_quota_allows():
    assert [parse_duration(v) for v in ("20ms", "1.5s", "6m0s", "1h2m3s", "2", "soon", "1sx", "")] == \
        [0.02, 1.5, 360.0, 3723.0, 2.0, None, None, None]
    h = {"x-ratelimit-limit-requests": "600", "x-ratelimit-remaining-requests": "0",
         "x-ratelimit-reset-requests": "350ms", "x-ratelimit-limit-tokens": "90000",
         "x-ratelimit-remaining-tokens": "12", "x-ratelimit-reset-tokens": "2s"}
    assert parse_rate_limit_headers(h) == ServerLimits(600.0, 90000.0, 0.35)  # tokens left: only requests block
    assert parse_rate_limit_headers({"x-ratelimit-remaining-requests": "5"}) == ServerLimits()
    assert parse_rate_limit_headers({"x-ratelimit-limit-requests": "lots"}) == ServerLimits()


def test_circuit_breaker_cycle():
    cb = CircuitBreaker(threshold=2, reset_after_s=10)
    assert cb.before(0) == 0 and not cb.failure(0)
    assert cb.failure(1) and cb.state == "open"
    assert cb.before(5) == pytest.approx(6)
    assert cb.before(11) == 0 and cb.state == "half_open"  # one probe
    assert cb.before(11) > 0  # everyone else waits for the probe
    assert cb.failure(12) and cb.state == "open"  # failed probe re-opens at once
    assert cb.before(22) == 0
    cb.success()
    assert cb.state == "closed" and cb.before(23) == 0


# ------------------------------------------------------------------------ cache


def test_cache_key_covers_every_field():
    base = ("m", "fp", "prompt", "story")
    keys = {cache_key(*base)}
    for i in range(4):
        changed = list(base)
        changed[i] += "x"
        keys.add(cache_key(*changed))
    assert len(keys) == 5
    assert cache_key("ab", "c", "", "") != cache_key("a", "bc", "", "")  # field boundaries count


def test_cache_roundtrip_and_atomic_save(tmp_path):
    c = JudgeCache()
    c.put("k1", {"score": 0.5, "overall": 50})
    with pytest.raises(ValueError):
        c.put("k2", {"score": None})
    path = tmp_path / "ckpt" / "judge_cache.json"
    c.save(path)
    c.put("k3", {"score": object()})  # not JSON-serialisable: the next save fails mid-write
    with pytest.raises(TypeError):
        c.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["judge_cache.json"]  # no temp file left
    fresh = JudgeCache()
    assert fresh.load(path) == 1 and fresh.get("k1") == {"score": 0.5, "overall": 50}
    assert JudgeCache().load(tmp_path / "missing.json") == 0


def test_cache_journal_appends_survives_a_torn_tail_and_folds_into_the_snapshot(tmp_path):
    path = tmp_path / "cache.json"
    c = JudgeCache()
    c.put("k0", {"score": 0.1})
    c.save(path)
    c.journal(path)
    c.put("k1", {"score": 0.2, "overall": 20})
    c.put("k2", {"score": 0.3})
    journal = tmp_path / "cache.json.journal"
    with journal.open("a") as f:  # a crash in the middle of a line
        f.write('{"key": "k3", "verd')
    fresh = JudgeCache()
    assert fresh.load(path) == 3 and fresh.get("k1") == {"score": 0.2, "overall": 20} and "k3" not in fresh
    fresh.journal(path)  # the torn tail is cut off, so the next entry starts on its own line
    fresh.put("k4", {"score": 0.4})
    fresh.save(path)  # folds the journal into the snapshot
    fresh.close_journal()
    assert not journal.exists()
    again = JudgeCache()
    assert again.load(path) == 4 and again.get("k4") == {"score": 0.4}
    c.close_journal()


# ---------------------------------------------------------------------- metrics


def test_metrics_percentiles_cost_and_merge():
    assert percentile([], 50) == 0.0
    assert percentile(list(range(1, 101)), 95) == 95
    w = JudgeMetrics(price_in_per_1m=1.0, price_out_per_1m=4.0)
    w.inc("requests", 3)
    w.inc("tokens_in", 1_000_000)
    w.inc("tokens_out", 500_000)
    for x in (0.1, 0.2, 0.3):
        w.observe_latency(x)
    driver = JudgeMetrics(1.0, 4.0)
    driver.merge(w.drain())
    assert w.summary()["requests"] == 0  # drained
    s = driver.summary()
    assert s["requests"] == 3 and s["cost_usd"] == pytest.approx(3.0)
    assert s["latency_p50_s"] == pytest.approx(0.2) and s["latency_p95_s"] == pytest.approx(0.3)
    assert all(isinstance(v, float) for v in s.values())
    with pytest.raises(KeyError):
        driver.inc("requestz")


# ----------------------------------------------------------------------- config


def _walk_fields(model: type[BaseModel], prefix: str = ""):
    for name, f in model.model_fields.items():
        yield prefix + name, f
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _walk_fields(ann, prefix + name + ".")


def test_every_config_field_is_described():
    missing = [n for n, f in _walk_fields(JudgeConfig) if not f.description]
    assert missing == []
    assert JudgeConfig.model_config["extra"] == "forbid"


def test_example_configs_load():
    local = load_judge_config(ROOT / "configs" / "judge_local.yaml")
    gem = load_judge_config(ROOT / "configs" / "judge_gemini.yaml")
    assert local.base_url.startswith("http://127.0.0.1")
    assert gem.api_key_env == "GEMINI_API_KEY" and "generativelanguage" in gem.base_url


def test_validation_errors_name_the_field(tmp_path):
    p = tmp_path / "j.yaml"
    p.write_text("base_url: http://127.0.0.1:9/v1\nmodel: m\nretry: {max_attemps: 3}\n")
    with pytest.raises(JudgeConfigError, match=r"field 'retry\.max_attemps'"):
        load_judge_config(p)
    with pytest.raises(JudgeConfigError, match=r"field 'workers'.*max_workers"):
        judge_config_from_dict({"base_url": "http://h/v1", "model": "m", "workers": {"min_workers": 3, "max_workers": 2}})
    with pytest.raises(JudgeConfigError, match=r"field 'base_url'"):
        judge_config_from_dict({"base_url": "http://h/v1?key=abc", "model": "m"})


def test_missing_key_fails_naming_env_var(monkeypatch):
    monkeypatch.delenv("RLSYS_NO_SUCH_KEY", raising=False)
    cfg = judge_config_from_dict({"base_url": "http://h/v1", "model": "m", "api_key_env": "RLSYS_NO_SUCH_KEY"})
    with pytest.raises(MissingApiKeyError, match="RLSYS_NO_SUCH_KEY"):
        cfg.api_key()
    assert json.loads(cfg.model_dump_json())["api_key_env"] == "RLSYS_NO_SUCH_KEY"


def test_cluster_yaml_declares_an_autoscalable_cpu_judge_group():
    import yaml
    from ray.autoscaler._private.providers import _get_default_config
    from ray.autoscaler._private.util import validate_config

    cluster = yaml.safe_load((ROOT / "cluster" / "judge_workers.yaml").read_text())
    validate_config({**_get_default_config(cluster["provider"]), **cluster})  # what `ray up` checks
    group = cluster["available_node_types"]["judge_workers"]
    assert "GPU" not in group["resources"] and group["resources"]["CPU"] > 0
    assert 0 <= group["min_workers"] < group["max_workers"]
    # the example judge config asks for the marker resource this group advertises
    wanted = load_judge_config(ROOT / "configs" / "judge_gemini.yaml").workers.resources
    assert set(wanted) <= set(group["resources"]) and all(v <= group["resources"][k] for k, v in wanted.items())
