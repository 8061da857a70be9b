"""`ray job submit` proven: a private Ray cluster started with `ray start` (its own temp dir and
ports; a head plus a second node), the tiny-model run submitted with JobSubmissionClient and a
`working_dir` runtime env (the repository, uploaded), SUCCEEDED with a checkpoint; then a
longer run stopped mid-way and resubmitted with `--resume auto`, which continues from the saved
step. The cluster is stopped by PID (never `ray stop`)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from proc_utils import pids_mentioning

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def cluster():
    """Head + one worker node on this machine, token auth as Ray 2.60 sets it up."""
    from rlsys.cluster import free_port

    # Each node its own short temp dir (socket paths are limited; two nodes sharing one would
    # manage the same runtime-env files), found again by it to stop exactly these processes.
    temps = [tempfile.mkdtemp(prefix=f"rlsys-job{i}-", dir="/tmp") for i in range(2)]
    gcs, dash = free_port(), free_port()
    env = dict(os.environ, RAY_AUTH_MODE="token", PYTHONPATH=str(ROOT))
    common = ["--disable-usage-stats", "--min-worker-port", "21000", "--max-worker-port", "21999"]
    try:
        subprocess.run([RAY, "start", "--head", "--temp-dir", temps[0], "--port", str(gcs), "--dashboard-port", str(dash),
                        "--dashboard-host", "127.0.0.1", "--num-cpus", "6", "--include-dashboard", "true",
                        "--dashboard-agent-listen-port", str(free_port()), "--ray-client-server-port", str(free_port()),
                        *common], check=True, env=env, capture_output=True, timeout=180)
        subprocess.run([RAY, "start", "--address", f"127.0.0.1:{gcs}", "--temp-dir", temps[1], "--num-cpus", "3",
                        "--dashboard-agent-listen-port", str(free_port()), *common],
                       check=True, env=env, capture_output=True, timeout=180)
        yield {"gcs": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}", "env": env}
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in [p for t in temps for p in pids_mentioning(t)]:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(3)


def _config(tmp: Path, steps: int) -> Path:
    from rlsys.data.polaris import write_polaris_dataset
    from rlsys.models import build_tiny_model

    model = build_tiny_model(tmp / "model", seed=0)
    data = write_polaris_dataset(tmp / "data", n=8, seed=0, fmt="jsonl")["train"]
    cfg = {
        "seed": 2, "model": {"path": model, "dtype": "float32"}, "data": {"path": str(data), "format": "polaris"},
        "rollout": {"prompts_per_step": 2, "group_size": 4, "max_new_tokens": 12, "max_model_len": 512,
                    "kv_cache_gib": 0.25, "temperature": 0.8},
        # A relative path: resolved in the job's working directory, the uploaded repository.
        "reward": {"weights": {"share": 1.0},
                   "functions": {"share": "tests/reward_fns.py:share_a_to_m_slow"}},
        "algorithm": {"kl_coef": 0.0},
        "learner": {"num_ranks": 2, "micro_batch_size": 4, "lr": 5e-3, "gradient_checkpointing": False},
        "train": {"steps": steps, "save_every": 2, "output_dir": str(tmp / "run")},
    }
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _submit(client, cfg: Path, *extra: str) -> str:
    return client.submit_job(
        entrypoint=f"{sys.executable} -m rlsys.cli train {cfg} {' '.join(extra)}",
        runtime_env={"working_dir": str(ROOT), "excludes": ["benchmarks/results"]})


def _wait(client, job: str, states: set, timeout: float = 600, until=None):
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get_job_status(job)
        if until is not None and until():
            return status
        if status in states or status in {JobStatus.FAILED, JobStatus.STOPPED, JobStatus.SUCCEEDED}:
            return status
        time.sleep(0.2)
    raise AssertionError(f"job {job} still {client.get_job_status(job)} after {timeout}s:\n{client.get_job_logs(job)[-3000:]}")


def _auth_headers() -> dict:
    """Ray 2.60's `ray start --head` turns on token auth and writes the token here; a client in
    another environment would set RAY_AUTH_MODE=token before importing ray, or send it like this."""
    token = os.environ.get("RAY_AUTH_TOKEN") or (Path.home() / ".ray" / "auth_token").read_text().strip()
    return {"authorization": f"Bearer {token}"}


def test_submit_then_stop_and_resume(cluster, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    from rlsys.tracking import read_metrics

    client = JobSubmissionClient(cluster["dashboard"], headers=_auth_headers())

    short = _config(tmp_path / "short", steps=2)
    job = _submit(client, short)
    assert _wait(client, job, {JobStatus.SUCCEEDED}) == JobStatus.SUCCEEDED, client.get_job_logs(job)[-3000:]
    run = tmp_path / "short" / "run"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000002"
    assert (run / "final" / "model.safetensors").is_file() and [m["step"] for m in read_metrics(run)] == [1, 2]
    assert "joining Ray cluster" in client.get_job_logs(job)

    long = _config(tmp_path / "long", steps=6)
    run = tmp_path / "long" / "run"
    latest = run / "checkpoints" / "latest"
    job = _submit(client, long, "--resume", "auto")
    _wait(client, job, set(), until=lambda: latest.is_file())
    assert client.stop_job(job)
    assert _wait(client, job, {JobStatus.STOPPED}, timeout=120) == JobStatus.STOPPED
    saved = int(latest.read_text().strip().split("-")[1])
    assert 2 <= saved < 6 and not (run / "final").exists()

    job = _submit(client, long, "--resume", "auto")
    assert _wait(client, job, {JobStatus.SUCCEEDED}) == JobStatus.SUCCEEDED, client.get_job_logs(job)[-3000:]
    logs = client.get_job_logs(job)
    assert f"step {saved}, policy version {saved}" in logs, logs[-3000:]
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3, 4, 5, 6]   # continued, nothing doubled
    state = json.loads((run / "checkpoints" / "step-000006" / "state.json").read_text())
    assert state["policy_version"] == 6


def test_paths_checked_on_every_node(cluster):
    """A driver joined to the two-node cluster: a path missing on the nodes is named per node."""
    code = f"""
import ray
from rlsys.cluster import check_paths_on_every_node
ray.init(address={cluster['gcs']!r}, log_to_driver=False)
assert len([n for n in ray.nodes() if n["Alive"]]) == 2
check_paths_on_every_node([{str(ROOT / 'rlsys')!r}])
try:
    check_paths_on_every_node([{str(ROOT / 'rlsys')!r}, "/nonexistent/model"])
except FileNotFoundError as e:
    print("ERROR:", e)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=cluster["env"], capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("ERROR:")][0]
    assert line.count("/nonexistent/model") == 2 and "rlsys," not in line, line
