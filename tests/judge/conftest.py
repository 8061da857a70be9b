"""Fixtures for the judge tests: a real fault-injecting HTTP judge server and a small Ray.

The server itself lives in ``fake_judge_server.py`` (also used by the benchmark).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_judge_server import FakeJudgeServer  # noqa: E402
from judge_helpers import TEST_KEY, TEST_KEY_ENV  # noqa: E402


@pytest.fixture
def judge_server() -> Callable[..., FakeJudgeServer]:
    started: list[FakeJudgeServer] = []

    def make(**kw: Any) -> FakeJudgeServer:
        srv = FakeJudgeServer(**kw).start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


@pytest.fixture(scope="module")
def ray_local():
    """A small local Ray per test module (own temp dir; shut down, never `ray stop`). Module
    scope, not session: the other Ray tests of the suite start Rays of their own."""
    import ray

    os.environ[TEST_KEY_ENV] = TEST_KEY  # workers inherit the raylet's env, started here
    temp_dir = f"/tmp/ray_judge_{os.getpid()}"
    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=temp_dir,
             log_to_driver=False, namespace="rlsys-judge-tests", object_store_memory=200 * 1024 * 1024)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)
