"""Runs that survive: `rlsys train` killed with SIGKILL (the whole process tree: driver, its Ray
head, vLLM, DeepSpeed ranks) after its step-2 checkpoint, then `--resume auto`, must give the
same per-step losses, rewards and final weights as the same 4 steps run without interruption.
The data has 3 prompts and a step takes 2, so the checkpoint falls mid-epoch right after an
epoch boundary. The same under the asynchronous pipeline (`algorithm.max_staleness=1`, a
checkpoint every step), killed while a prefetch runs: the resume regenerates the prompts that
were prefetched but not trained, and the run finishes with every step once. And a checkpoint
writer killed mid-write leaves the previous checkpoint as the one `--resume auto` uses."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from proc_utils import pids_mentioning

ROOT = Path(__file__).resolve().parents[1]
RLSYS = [sys.executable, "-m", "rlsys.cli", "train"]
# float32 on both sides, fixed seeds: a resumed run repeats the uninterrupted one up to the
# order of floating-point sums (measured: identical).
REL = 1e-5


def _config(tmp: Path) -> Path:
    from rlsys.data.polaris import write_polaris_dataset
    from rlsys.models import build_tiny_model

    model = build_tiny_model(tmp / "model", seed=0)
    data = write_polaris_dataset(tmp / "data", n=3, seed=0, fmt="jsonl")["train"]
    cfg = {
        "seed": 5, "model": {"path": model, "dtype": "float32"},
        "data": {"path": str(data), "format": "polaris"},
        "rollout": {"prompts_per_step": 2, "group_size": 4, "max_new_tokens": 12, "max_model_len": 512,
                    "kv_cache_gib": 0.25, "temperature": 0.8, "top_p": 1.0},
        "reward": {"weights": {"share": 1.0},
                   "functions": {"share": f"{ROOT / 'tests' / 'reward_fns.py'}:share_a_to_m_slow"}},
        "algorithm": {"kl_coef": 0.02, "mini_batches": 2, "max_staleness": 0},   # bit-exact resume: synchronous
        "learner": {"num_ranks": 2, "micro_batch_size": 4, "lr": 5e-3, "gradient_checkpointing": False},
        "cluster": {"num_cpus": 8, "object_store_gib": 0.5},
        "train": {"steps": 4, "save_every": 2, "keep_checkpoints": 2},
    }
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(cfg: Path, out: Path, *extra: str, **popen) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([*RLSYS, str(cfg), f"train.output_dir={out}", *extra], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> None:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]


def _kill_tree(proc: subprocess.Popen, run_dir: Path) -> None:
    """SIGKILL the driver's process group, then whatever of its private Ray is left (found by
    the temp dir the driver logged), and the shared memory its vLLM engine leaked."""
    from actors.rollout import _mapped_shm_segments, _shm_segments

    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    log = (run_dir / "train.log").read_text()
    temp = log.split("temp dir ", 1)[1].split(")", 1)[0] if "temp dir " in log else None
    deadline = time.monotonic() + 30
    while temp and time.monotonic() < deadline:
        left = pids_mentioning(temp)
        if not left:
            break
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
    for name in _shm_segments() - _mapped_shm_segments() - SHM_BEFORE:
        Path("/dev/shm", name).unlink(missing_ok=True)


SHM_BEFORE: set[str] = set()


def _kill_after_checkpoint(proc: subprocess.Popen, run_dir: Path, name: str) -> None:
    """Wait until `checkpoints/latest` names `name`, then SIGKILL the whole run (`_kill_tree`)."""
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.monotonic() + 600
    while not (latest.is_file() and latest.read_text().strip() == name):
        assert proc.poll() is None, f"run ended before its checkpoint {name}: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    _kill_tree(proc, run_dir)


@pytest.mark.e2e
def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    from actors.rollout import _shm_segments
    from rlsys.tracking import read_metrics, read_rollouts

    SHM_BEFORE.update(_shm_segments())
    cfg = _config(tmp_path)
    a, b = tmp_path / "uninterrupted", tmp_path / "killed"
    _finish(_train(cfg, a))

    _kill_after_checkpoint(_train(cfg, b, start_new_session=True), b, "step-000002")
    assert not (b / "final").exists() and len(read_metrics(b)) < 4   # really killed mid-run
    state = json.loads((b / "checkpoints" / "step-000002" / "state.json").read_text())
    assert state["step"] == 2 and state["policy_version"] == 2
    assert state["stream"] == {"epoch": 1, "index": 1}   # 3 prompts, 2 per step: past the boundary

    _finish(_train(cfg, b, "--resume", "auto"))
    ma, mb = read_metrics(a), read_metrics(b)
    assert [m["step"] for m in ma] == [m["step"] for m in mb] == [1, 2, 3, 4]   # nothing lost or doubled
    for x, y in zip(ma, mb):
        for k in ("loss/total", "loss/pg", "loss/kl", "reward/share", "policy/grad_norm", "policy/clip_frac"):
            assert y[k] == pytest.approx(x[k], rel=REL, abs=1e-7), (x["step"], k)
    ra, rb = read_rollouts(a), read_rollouts(b)
    assert ra.column("step").to_pylist() == rb.column("step").to_pylist()
    assert ra.column("text").to_pylist() == rb.column("text").to_pylist()

    from safetensors.torch import load_file
    wa, wb = load_file(str(a / "final" / "model.safetensors")), load_file(str(b / "final" / "model.safetensors"))
    assert set(wa) == set(wb)
    for k in wa:
        assert (wa[k] - wb[k]).abs().max().item() <= 1e-6 * max(1.0, wa[k].abs().max().item()), k
    # Checkpoints kept: the last two, each with its HF export; TensorBoard has each step once.
    kept = sorted(p.name for p in (b / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert kept == ["step-000002", "step-000004"] and (b / "checkpoints" / "step-000004" / "hf" / "config.json").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(b / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("loss/total")] == [1, 2, 3, 4]


@pytest.mark.e2e
def test_async_sigkill_mid_prefetch_then_resume(tmp_path):
    """max_staleness=1, save_every=1. Step 2's checkpoint is written after step 3's prompts were
    taken and generated (prefetched during step 2's update); the kill follows it at once, while
    step 3 trains and step 4's rollout runs. The checkpoint must hold the stream position before
    step 3's prompts, so the resumed run generates them again (with the checkpoint's weights:
    version 2, where the killed attempt had version 1) and no prompt is skipped; metrics.jsonl
    and rollouts/ end with each of the 4 steps exactly once."""
    from actors.rollout import _shm_segments
    from rlsys import checkpoint
    from rlsys.config import load_config
    from rlsys.data.loading import load_for_run
    from rlsys.data.stream import PromptStream
    from rlsys.tracking import read_metrics, read_rollouts

    SHM_BEFORE.update(_shm_segments())
    cfg, run = _config(tmp_path), tmp_path / "async"
    flags = ("algorithm.max_staleness=1", "train.save_every=1")
    _kill_after_checkpoint(_train(cfg, run, *flags, start_new_session=True), run, "step-000002")
    assert not (run / "final").exists() and len(read_metrics(run)) < 4   # really killed mid-run
    state = checkpoint.load_state(checkpoint.resolve("auto", run))        # the checkpoint reads back
    assert (state.step, state.policy_version) == (2, 2)
    assert state.stream == {"epoch": 1, "index": 1}   # 4 prompts trained; step 3's 2 (taken) not counted

    _finish(_train(cfg, run, *flags, "--resume", "auto"))
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]                   # no gap, no duplicate
    # Steps 1 and 3 (the first after the resume) are collected when they start; 2 and 4 were
    # generated during the previous update, one version behind.
    assert [m["async/staleness_max"] for m in metrics] == [0, 1, 0, 1]
    assert all(m["async/dropped_stale_groups"] == 0 for m in metrics)
    c = load_config(cfg)
    stream = PromptStream(load_for_run(c), shuffle=c.data.shuffle, seed=c.seed)
    expected = [[e.uid for e in stream.take(2)] for _ in range(4)]      # the prompt order, skipping none
    rows = read_rollouts(run).to_pylist()
    for step in range(1, 5):
        got = [r for r in rows if r["step"] == step]
        assert list(dict.fromkeys(r["prompt_uid"] for r in got)) == expected[step - 1], step
        assert len(got) == 2 * c.rollout.group_size
        # generated by: v0 (step 1 now, step 2 ahead), then the resumed run's v2 (step 3 now, step 4 ahead)
        assert {r["policy_version"] for r in got} == {[0, 0, 2, 2][step - 1]}, step
    kept = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert kept == ["step-000003", "step-000004"] and (run / "final" / "model.safetensors").is_file()


class _SlowRun:
    """What checkpoint.save asks of a GRPORun, writing `n` files slowly."""

    def __init__(self, n: int, delay: float):
        self.n, self.delay = n, delay

    def save_checkpoint(self, path: str) -> None:
        for i in range(self.n):
            Path(path, f"shard-{i}.bin").write_bytes(os.urandom(1 << 16))
            time.sleep(self.delay)


def test_killed_checkpoint_writer_leaves_the_previous_one(tmp_path):
    from rlsys import checkpoint

    out = tmp_path / "run"
    checkpoint.save(_SlowRun(3, 0), out, checkpoint.RunState(2, 2, {"epoch": 0, "index": 4}), keep=2)
    writer = subprocess.Popen([sys.executable, "-c", f"""
import sys; sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_e2e_resume import _SlowRun
from rlsys import checkpoint
checkpoint.save(_SlowRun(1000, 0.01), {str(out)!r}, checkpoint.RunState(4, 4, {{"epoch": 1, "index": 0}}), keep=2)
"""])
    root = out / "checkpoints"
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(".step-000004") and len(list(p.iterdir())) > 20
                  for p in root.iterdir() if p.is_dir()):
        assert writer.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    writer.send_signal(signal.SIGKILL)
    writer.wait(10)
    assert any(p.name.startswith(".step-000004") for p in root.iterdir())   # a torn write is there ...
    ckpt = checkpoint.resolve("auto", out)                                     # ... and ignored
    assert ckpt == root / "step-000002" and checkpoint.load_state(ckpt).stream == {"epoch": 0, "index": 4}
    assert not (root / "step-000004").exists()
    # The next save cleans up after the killed writer.
    checkpoint.save(_SlowRun(2, 0), out, checkpoint.RunState(4, 4, {"epoch": 1, "index": 0}), keep=1)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000004"]
    # Bad --resume values say what is wrong; a run mismatching its checkpoint is refused.
    with pytest.raises(checkpoint.CheckpointError, match="not a complete rlsys checkpoint"):
        checkpoint.resolve(str(tmp_path), out)
    assert checkpoint.resolve("auto", tmp_path / "elsewhere") is None      # nothing yet: fresh start
    assert checkpoint.resolve(str(root), out) == root / "step-000004"      # a checkpoints/ dir works too
    saved = checkpoint.RunState(4, 4, {}, config={"seed": 1, "model": {"path": "/m"}})
    checkpoint.write_file(root / "step-000004" / "state.json", json.dumps(saved.__dict__))
    with pytest.raises(checkpoint.CheckpointError, match="seed: checkpoint 1, now 2"):
        checkpoint.start_state(root / "step-000004", {"seed": 2, "model": {"path": "/m"}})
