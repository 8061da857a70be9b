"""The API key is used on the wire but appears in no log, config dump, cache, metrics, output or error."""

from __future__ import annotations

import json
import logging

import pytest

from judge_helpers import TEST_KEY, TEST_KEY_ENV, fast_config, story
from rlsys.judge.cli import main
from rlsys.judge.client import JudgeFatalError
from rlsys.judge.config import JudgeConfigError, judge_config_from_dict, load_judge_config
from rlsys.judge.pool import JudgeScorer


def test_key_never_leaks(judge_server, tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setenv(TEST_KEY_ENV, TEST_KEY)
    caplog.set_level(logging.DEBUG)  # everything, including httpx/httpcore debug output
    srv = judge_server(retry_after="0", slow_s=1.5)
    cfg = fast_config(srv.base_url, api_key_env=TEST_KEY_ENV, timeout_s=0.3)
    faults = ["500", "429", "slow", "badscore,badscore,badscore", "drop", "nonjson"]
    items = [story(i, f"[[FAULTS:{f}]]") for i, f in enumerate(faults)]
    leaks: list[str] = []
    with JudgeScorer(cfg) as scorer:
        res = scorer.score_items(items)
        scorer.save_cache(str(tmp_path / "cache.json"))
        leaks += [json.dumps(scorer.metrics_summary()), json.dumps(res), repr(scorer._backend.client)]
        srv.default_mode = "401"  # its body echoes the Authorization header back
        with pytest.raises(JudgeFatalError) as err:
            scorer.score_items([story(99)])
        leaks += [str(err.value), repr(err.value)]
    assert f"Bearer {TEST_KEY}" in srv.auth_headers  # the key really was sent
    assert TEST_KEY_ENV in str(err.value)  # the error names the variable, not its value
    leaks += [cfg.model_dump_json(), repr(cfg), (tmp_path / "cache.json").read_text(), caplog.text]

    # CLI: output, cache and stderr
    srv.default_mode = None
    yaml_path = tmp_path / "judge.yaml"
    yaml_path.write_text(f"base_url: {srv.base_url}\nmodel: m\napi_key_env: {TEST_KEY_ENV}\n")
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps({"id": "a", **story(1)}) + "\n")
    assert main(["score", str(yaml_path), "--input", str(inp), "--output", str(out), "--no-progress"]) == 0
    captured = capsys.readouterr()
    leaks += [out.read_text(), (tmp_path / "out.jsonl.cache.json").read_text(), captured.out, captured.err, caplog.text]
    assert "HTTP Request" in caplog.text and "circuit" not in caplog.text  # logs were really captured
    assert [x for x in leaks if TEST_KEY in x] == []


def test_key_in_the_wrong_place_is_rejected_without_echo(tmp_path):
    p = tmp_path / "j.yaml"
    p.write_text(f"base_url: http://127.0.0.1:9/v1\nmodel: m\napi_key: {TEST_KEY}\n")
    with pytest.raises(JudgeConfigError) as e1:
        load_judge_config(p)
    with pytest.raises(JudgeConfigError) as e2:
        judge_config_from_dict({"base_url": "http://h/v1", "model": "m", "api_key_env": TEST_KEY})
    with pytest.raises(JudgeConfigError) as e3:
        judge_config_from_dict({"base_url": f"http://user:{TEST_KEY}@h/v1", "model": "m"})
    for e in (e1, e2, e3):
        assert TEST_KEY not in str(e.value) and TEST_KEY not in repr(e.value)
        assert e.value.__cause__ is None and e.value.__suppress_context__
    assert "api_key" in str(e1.value) and "api_key_env" in str(e2.value) and "base_url" in str(e3.value)
