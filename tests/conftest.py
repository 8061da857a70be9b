"""Fixtures shared by several test files (a file's own fixture of the same name wins)."""
from __future__ import annotations

import logging
import shutil
import tempfile

import pytest


@pytest.fixture(autouse=True)
def _restore_root_logging():
    """A test that runs a CLI command in-process gets `logging.basicConfig(force=True)`: a root
    handler bound to that test's captured stderr, which pytest closes after it. Left in place, a
    later test's log record fails with 'Logging error ... I/O operation on closed file'."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in root.handlers:
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    for h in handlers:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(level)


@pytest.fixture
def ray_local(request):
    """A private local Ray head for one test, its temp dir removed after. Indirect parametrization
    adds ray.init arguments (e.g. `{"num_gpus": 2}`: GPUs declared, none needed)."""
    import ray

    tmp = tempfile.mkdtemp(prefix="rlsys-test-ray-", dir="/tmp")  # short: Ray's socket paths
    ray.init(num_cpus=8, include_dashboard=False, _temp_dir=tmp, log_to_driver=False,
             **getattr(request, "param", {}))
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
