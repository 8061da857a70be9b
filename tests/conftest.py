"""Fixtures shared by several test files (a file's own fixture of the same name wins)."""
from __future__ import annotations

import shutil
import tempfile

import pytest


@pytest.fixture
def ray_local():
    """A private local Ray head for one test, its temp dir removed after."""
    import ray

    tmp = tempfile.mkdtemp(prefix="rlsys-test-ray-", dir="/tmp")  # short: Ray's socket paths
    ray.init(num_cpus=8, include_dashboard=False, _temp_dir=tmp, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def base(tmp_path):
    """The smallest valid config tree: an (empty) model directory and a one-row data file."""
    (tmp_path / "model").mkdir()
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    return {"model": {"path": str(tmp_path / "model")}, "data": {"path": str(data)}}
