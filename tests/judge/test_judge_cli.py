"""`rlsys judge score` (rlsys.judge.cli.main): output per input, resume (also after SIGKILL), no
chunk barrier, summary, start-up errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from judge_helpers import story
from fake_judge_server import expected_sq
from rewards.judge_rubric import POLARIS_RUBRIC, judge_visible_prompt, visible_story
from rlsys.judge.cache import cache_key
from rlsys.judge.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _write_config(path, base_url, **extra) -> str:
    lines = [f"base_url: {base_url}", "model: fake-judge", "timeout_s: 3.0",
             "retry: {max_attempts: 3, parse_retries: 1, backoff_base_s: 0.01, backoff_max_s: 0.02}"]
    lines += [f"{k}: {v}" for k, v in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_score_file_resumes_where_it_stopped(judge_server, tmp_path, capsys):
    srv = judge_server()
    cfg = _write_config(tmp_path / "judge.yaml", srv.base_url)
    rows = [{"id": f"s{i}", **story(i, "[[FAULTS:badscore,badscore]]" if i == 3 else "")} for i in range(10)]
    rows.append({"id": "broken", "prompt": "p"})  # no story: masked with a reason, not dropped
    inp, out = tmp_path / "stories.jsonl", tmp_path / "scores.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))

    assert main(["score", cfg, "--input", str(inp), "--output", str(out), "--chunk", "4", "--no-progress"]) == 0
    first = [json.loads(x) for x in out.read_text().splitlines()]
    summary = json.loads(capsys.readouterr().err.strip().splitlines()[-1])["judge_summary"]
    assert [r["id"] for r in first] == [r["id"] for r in rows]
    by_id = {r["id"]: r for r in first}
    assert by_id["s3"]["masked"] and by_id["s3"]["reason"].startswith("parse_error")
    assert by_id["broken"] == {"id": "broken", "masked": True, "reason": "invalid_input:prompt and story must be strings"}
    for r in rows[:10]:
        if r["id"] != "s3":
            assert by_id[r["id"]]["score"] == expected_sq(visible_story(r["story"]))
    for key in ("requests", "http_429", "retries", "failures", "masked", "latency_p50_s", "latency_p95_s",
                "tokens_in", "tokens_out", "cost_usd"):
        assert key in summary
    assert summary["masked"] == 1 and summary["scored"] == 9

    # Simulate a crash: keep 5 complete lines plus a torn sixth, and lose the cache.
    text = out.read_text().splitlines(keepends=True)
    out.write_text("".join(text[:5]) + text[5][:7])
    (tmp_path / "scores.jsonl.cache.json").unlink()
    before = dict(srv.per_story)
    assert main(["score", cfg, "--input", str(inp), "--output", str(out), "--no-progress"]) == 0
    second = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in second] == [r["id"] for r in rows]  # one line per input, no duplicates
    assert second == first
    resent = {s for s in srv.per_story if srv.per_story[s] != before.get(s, 0)}
    done_first = {visible_story(r["story"]) for r in rows[:5]}
    assert resent and not (resent & done_first)  # only the unfinished ids were judged again

    # A third run has nothing left to do and sends nothing.
    count = sum(srv.per_story.values())
    assert main(["score", cfg, "--input", str(inp), "--output", str(out), "--no-progress"]) == 0
    assert sum(srv.per_story.values()) == count


def test_start_up_errors_exit_2_and_name_the_problem(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RLSYS_MISSING_KEY", raising=False)
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": 1, "prompt": "p", "story": "s"}) + "\n")
    cfg = _write_config(tmp_path / "j.yaml", "http://127.0.0.1:9/v1", api_key_env="RLSYS_MISSING_KEY")
    assert main(["score", cfg, "--input", str(inp), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "RLSYS_MISSING_KEY" in capsys.readouterr().err
    bad = _write_config(tmp_path / "b.yaml", "http://127.0.0.1:9/v1", max_concurency=3)
    assert main(["score", bad, "--input", str(inp), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "max_concurency" in capsys.readouterr().err
    inp.write_text('{"id": 1, "prompt": "p", "story": "s"}\n{"id": 1, "prompt": "p", "story": "t"}\n')
    cfg_ok = _write_config(tmp_path / "ok.yaml", "http://127.0.0.1:9/v1")
    assert main(["score", cfg_ok, "--input", str(inp), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "duplicate id" in capsys.readouterr().err


def test_a_retrying_story_holds_back_no_other(judge_server, tmp_path):
    """No chunk barrier: while one story waits out a slow reply, the next stories keep going."""
    srv = judge_server(slow_s=1.5)
    cfg = _write_config(tmp_path / "judge.yaml", srv.base_url)
    rows = [{"id": f"s{i}", **story(i, "[[FAULTS:slow]]" if i == 0 else "")} for i in range(40)]
    inp, out = tmp_path / "stories.jsonl", tmp_path / "scores.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["score", cfg, "--input", str(inp), "--output", str(out), "--in-flight", "4", "--no-progress"]) == 0
    (t_slow, mode), = srv.story_arrivals[visible_story(rows[0]["story"])]
    assert mode == "slow"
    during = [t for t in srv.arrivals if t_slow < t < t_slow + 1.4]
    assert len(during) >= 20, len(during)  # chunks of 4 would have waited for the slow one: ~3
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == [r["id"] for r in rows]  # input order


def _cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "rlsys.judge.cli", "score", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_sigkill_mid_run_then_resume_repeats_no_answered_request(judge_server, tmp_path):
    """Kill the real CLI process mid-run: the output and the cache journal are readable, and the
    resumed run sends nothing for a story whose result was already written (output or cache)."""
    srv = judge_server(latency_s=0.02)
    # 10 requests per second: the run lasts ~4 s, long enough to be killed in the middle
    cfg = _write_config(tmp_path / "judge.yaml", srv.base_url, requests_per_minute=600, rate_window_s=1.0,
                        window_margin_s=0.0, max_concurrency=4)
    rows = [{"id": f"s{i}", **story(i)} for i in range(40)]
    inp, out = tmp_path / "stories.jsonl", tmp_path / "scores.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    journal = tmp_path / "scores.jsonl.cache.json.journal"

    proc = _cli(cfg, "--input", str(inp), "--output", str(out), "--no-progress", "--in-flight", "16")
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_text().count("\n") >= 12:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stderr.close()

    lines = out.read_bytes().split(b"\n")
    written = [json.loads(x) for x in lines[:-1]]  # every complete line parses (a torn tail is cut on resume)
    assert 12 <= len(written) < len(rows)
    journaled = {json.loads(x)["key"] for x in journal.read_text().splitlines() if x.endswith("}")}
    fingerprint = POLARIS_RUBRIC.fingerprint()
    key = {r["id"]: cache_key("fake-judge", fingerprint, judge_visible_prompt(r["prompt"]), visible_story(r["story"]))
           for r in rows}
    answered = {r["id"] for r in written} | {i for i, k in key.items() if k in journaled}
    assert len(journaled) >= len(written)  # a verdict is journaled before its output line
    before = dict(srv.per_story)

    assert main(["score", cfg, "--input", str(inp), "--output", str(out), "--no-progress"]) == 0
    final = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in final] == [r["id"] for r in rows]  # one line each, input order
    for r, rec in zip(rows, final):
        assert rec["score"] == expected_sq(visible_story(r["story"]))
    resent = {r["id"] for r in rows if srv.per_story[visible_story(r["story"])] != before.get(visible_story(r["story"]), 0)}
    assert resent and not (resent & answered)  # only stories without an answer on disk were judged again
    # judged twice: only requests on the wire when the process died (max_concurrency of them)
    assert sum(n > 1 for n in srv.per_story.values()) <= 4
    assert not journal.exists() and (tmp_path / "scores.jsonl.cache.json").exists()  # journal folded in
