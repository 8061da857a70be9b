"""No silent hangs: waits on actors have deadlines, a dead actor is named with its node, and a
placement the cluster cannot hold is refused with what is missing -- on a real local Ray."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from proc_utils import pids_mentioning

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_head():
    import ray

    from rlsys import cluster
    from rlsys.config import ClusterConfig

    cluster.connect(ClusterConfig(num_cpus=2, object_store_gib=0.25))
    yield ray
    cluster.shutdown()


def test_deadline_and_dead_actor_are_named(ray_head):
    import ray

    from rlsys.cluster import ActorDirectory, ActorFailure, get_with_deadline

    @ray.remote(num_cpus=0)
    class Worker:
        def nap(self, s):
            time.sleep(s)
            return s

        def die(self):
            os._exit(1)

    a, b = Worker.remote(), Worker.remote()
    names = ActorDirectory()
    names.add(a, "learner rank 0")
    names.add(b, "learner rank 1")
    names.locate([a, b], timeout=60)
    assert get_with_deadline(a.nap.remote(0), "quick", 30, names) == 0
    t0 = time.monotonic()
    with pytest.raises(ActorFailure, match=r"learner update: no answer within 2s \(cluster.actor_timeout_s\)"):
        get_with_deadline([a.nap.remote(30), b.nap.remote(0)], "learner update", 2, names)
    assert time.monotonic() - t0 < 10
    with pytest.raises(ActorFailure, match=r"weight broadcast: learner rank 1 on node [\d.]+ died") as e:
        get_with_deadline([b.die.remote()], "weight broadcast", 60, names)
    assert "hung" not in str(e.value)
    ray.kill(a)


def test_placement_refused_at_once_with_what_is_missing(ray_head, tmp_path):
    from rlsys.cluster import PlacementError, placement_shortfall
    from rlsys.config import load_config
    from rlsys.data.polaris import write_polaris_dataset
    from rlsys.driver import GRPORun
    from rlsys.models import build_tiny_model

    assert placement_shortfall([{"CPU": 1, "GPU": 1}] * 2, {"CPU": 8.0}) == {"GPU": (2, 0.0)}
    model = build_tiny_model(tmp_path / "m")
    data = write_polaris_dataset(tmp_path / "d", n=4, seed=0, fmt="jsonl")["train"]
    cfg = load_config(base={"model": {"path": model}, "data": {"path": str(data), "format": "polaris"},
                            "reward": {"weights": {"rep": -1.0}},
                            "learner": {"num_ranks": 2, "num_gpus": 1}})
    t0 = time.monotonic()
    with pytest.raises(PlacementError, match=r"GPU: asked 2, available 0"):
        GRPORun(cfg, model)
    assert time.monotonic() - t0 < 30   # refused, not waited on


def test_cli_reports_the_shortfall_and_exits(tmp_path):
    """The whole CLI path: exit code 1, the missing resources and the checkpoint to resume from."""
    from rlsys.data.polaris import write_polaris_dataset
    from rlsys.models import build_tiny_model

    model = build_tiny_model(tmp_path / "m")
    data = write_polaris_dataset(tmp_path / "d", n=4, seed=0, fmt="jsonl")["train"]
    proc = subprocess.run(
        [sys.executable, "-m", "rlsys.cli", "train", "/dev/null", f"model.path={model}", f"data.path={data}",
         "data.format=polaris", "reward.weights={rep: -1.0}", "learner.num_cpus=6",
         "cluster.num_cpus=4", f"train.output_dir={tmp_path / 'run'}"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "CPU: asked 13.5, available 4" in proc.stderr and "2 x learner rank" in proc.stderr
    assert "Last checkpoint: none" in proc.stderr


def test_sigterm_stops_the_run_cleanly(tmp_path):
    """`kill` / `ray job stop` send SIGTERM: the run unwinds through its cleanup (engines stop and
    free their shared memory, Ray goes down, logs are closed) and exits 143 naming the last
    checkpoint, instead of Ray's native handler aborting with a stack trace."""
    import signal

    from actors.rollout import _shm_segments
    from rlsys.data.polaris import write_polaris_dataset
    from rlsys.models import build_tiny_model
    from rlsys.tracking import read_metrics

    model = build_tiny_model(tmp_path / "m")
    data = write_polaris_dataset(tmp_path / "d", n=4, seed=0, fmt="jsonl")["train"]
    run = tmp_path / "run"
    shm_before = _shm_segments()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlsys.cli", "train", "/dev/null", f"model.path={model}", "model.dtype=float32",
         f"data.path={data}", "data.format=polaris", "reward.weights={rep: -1.0}",
         "rollout.max_new_tokens=8", "rollout.max_model_len=512", "rollout.kv_cache_gib=0.25",
         "learner.gradient_checkpointing=false", "train.steps=500", f"train.output_dir={run}"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not read_metrics(run):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.5)
    temp = (run / "train.log").read_text().split("temp dir ", 1)[1].split(")", 1)[0]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM. Last checkpoint: none" in err and "SIGTERM received" not in err
    assert (run / "metrics.json").is_file()                         # the tracker was closed
    time.sleep(2)
    left = pids_mentioning(temp)
    assert not left, "Ray processes of the stopped run are still running"
    assert not (_shm_segments() - shm_before), "the engine's shared memory was not freed"

