"""Shared helpers for the judge tests (a uniquely named module: `from conftest import` is
ambiguous once other test directories have their own conftest.py)."""

from __future__ import annotations

from typing import Any

from rlsys.judge.config import JudgeConfig, judge_config_from_dict

TEST_KEY_ENV = "RLSYS_TEST_JUDGE_KEY"
TEST_KEY = "sk-test-DO-NOT-LEAK-7f3a9c2e51b84d06"


def fast_config(base_url: str, **over: Any) -> JudgeConfig:
    """A config with short timeouts/backoffs so fault tests take fractions of a second."""
    data: dict[str, Any] = {
        "name": "test",
        "base_url": base_url,
        "model": "fake-judge",
        "requests_per_minute": 60_000,
        "rate_window_s": 1.0,
        "window_margin_s": 0.1,  # covers grant->arrival jitter on this busy 2-core machine
        "max_concurrency": 8,
        "timeout_s": 2.0,  # generous: the machine may be heavily loaded; fault tests set their own
        "connect_timeout_s": 2.0,
        "max_output_tokens": 256,
        "retry": {"max_attempts": 4, "parse_retries": 2, "backoff_base_s": 0.01, "backoff_max_s": 0.05,
                  "max_retry_after_s": 2.0, "sample_deadline_s": 20.0},
        "circuit_breaker": {"failure_threshold": 50, "reset_after_s": 0.5},
    }
    for k, v in over.items():
        data[k] = {**data[k], **v} if isinstance(v, dict) and isinstance(data.get(k), dict) else v
    return judge_config_from_dict(data)


def story(i: int, extra: str = "") -> dict[str, str]:
    return {"prompt": f"Write a story about lighthouse {i}. It should be approximately 1500 words long.",
            "story": f"<think>plan {i}</think>Once upon a time, keeper {i} lit the lamp. {extra}".strip()}
