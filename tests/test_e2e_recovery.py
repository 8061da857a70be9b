"""Actor faults recovered: a rollout engine's process SIGKILLed while it generates, and a reward
actor's process SIGKILLed during a step, are replaced (the engine brought to the current policy
version through a re-formed weight-sync group), their in-flight prompts re-issued, and the step
ends with exactly the groups it asked for -- none lost, none twice -- on the real stack."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
REWARD_FN = f"{Path(__file__).with_name('reward_fns.py')}:share_a_to_m_slow"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from rlsys import cluster
    from rlsys.config import load_config
    from rlsys.data.polaris import write_polaris_dataset
    from rlsys.driver import GRPORun
    from rlsys.models import build_tiny_model

    root = tmp_path_factory.mktemp("recovery")
    model = build_tiny_model(root / "model", seed=0)
    data = write_polaris_dataset(root / "data", n=12, seed=0, fmt="jsonl")["train"]
    cfg = load_config(base={
        "seed": 1, "model": {"path": model, "dtype": "float32"}, "data": {"path": str(data), "format": "polaris"},
        # Long answers at T=1 (EOS is rare for a random model): generation takes seconds, so a
        # kill lands while the engine is busy.
        "rollout": {"prompts_per_step": 4, "group_size": 8, "max_new_tokens": 300, "max_model_len": 512,
                    "kv_cache_gib": 0.25, "temperature": 1.0,
                    # vLLM's own engine processes and shared-memory rings: the case where a
                    # killed engine leaves something behind (in-process, the default on CPU,
                    # dies whole with its actor).
                    "cpu_engine_in_process": False},
        "reward": {"weights": {"share": 1.0}, "functions": {"share": REWARD_FN}},
        "algorithm": {"kl_coef": 0.0, "max_staleness": 0},   # one synchronous step at a time
        "learner": {"num_ranks": 2, "micro_batch_size": 8, "lr": 1e-3, "gradient_checkpointing": False},
        "cluster": {"num_cpus": 8, "object_store_gib": 0.5, "max_actor_restarts": 2},
    })
    cluster.connect(cfg.cluster)
    r = GRPORun(cfg, model)
    yield cfg, r
    r.shutdown()
    cluster.shutdown()


def _pid(actor) -> int:
    import ray
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))


def _step_with_kill(cfg, r, stream, victim, delay):
    """grpo_step in a thread; SIGKILL `victim`'s process `delay` s in. Returns (asked, samples, metrics)."""
    from rlsys.steps import grpo_step, make_pipeline

    pid = _pid(victim)
    state = dict(stream.state())
    out = {}
    pipeline = make_pipeline(r, stream, cfg, ["share"])
    th = threading.Thread(target=lambda: out.update(zip(("samples", "metrics"), grpo_step(r, pipeline, cfg, ["share"]))))
    th.start()
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    th.join(600)
    assert not th.is_alive() and "metrics" in out, "the step did not finish"
    from rlsys.data.stream import PromptStream
    replay = PromptStream(stream.examples, shuffle=stream.shuffle, seed=stream.seed, **state)
    asked = [e.uid for e in replay.take(cfg.rollout.prompts_per_step)]
    return asked, out["samples"], out["metrics"]


def _check_groups(samples, asked, version, g):
    uids = [s["prompt_uid"] for s in samples]
    assert sorted(set(uids)) == sorted(asked) and len(uids) == len(asked) * g   # each prompt once, whole
    assert {s["policy_version"] for s in samples} == {version}


def test_killed_engine_and_reward_actor_are_replaced(run):
    import psutil
    import ray

    from rlsys.data.loading import load_for_config
    from rlsys.data.stream import PromptStream
    from rlsys.steps import grpo_step, make_pipeline

    cfg, r = run
    stream = PromptStream(load_for_config(cfg.data), shuffle=True, seed=cfg.seed)
    _, m = grpo_step(r, make_pipeline(r, stream, cfg, ["share"]), cfg, ["share"])
    assert m["recovery/actor_restarts"] == 0

    engine = r.rollouts[0]
    engine_tree = [p.pid for p in psutil.Process(_pid(engine)).children(recursive=True)]
    killed_shm = set(ray.get(engine.__ray_call__.remote(lambda self: self._engine_shm)))
    assert killed_shm
    asked, samples, m = _step_with_kill(cfg, r, stream, engine, delay=1.0)
    assert r.rollouts[0] is not engine and m["recovery/actor_restarts"] == 1
    _check_groups(samples, asked, 1, cfg.rollout.group_size)
    assert ray.get(r.rollouts[0].policy_version.remote()) == 2 == r.version
    learner = [d for d in ray.get([lr.gathered_digest.remote(None) for lr in r.learners]) if d][0]
    eng = ray.get(r.rollouts[0].weights_digest.remote(None))
    assert all(eng[n]["sum"] == learner[n][0] for n in learner)   # the new engine has the new weights
    # The killed engine's own processes (vLLM engine core, worker) go with it: nothing orphaned.
    deadline = time.monotonic() + 60
    while [p for p in engine_tree if psutil.pid_exists(p)] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [p for p in engine_tree if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]

    # ... and the watchdog unlinks the shared memory the killed engine could not.
    from actors.rollout import _shm_segments
    deadline = time.monotonic() + 60
    while killed_shm & _shm_segments() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not killed_shm & _shm_segments()

    rewarder = r.rewarders[0]
    asked, samples, m = _step_with_kill(cfg, r, stream, rewarder, delay=0.5)
    assert r.rewarders[0] is not rewarder and m["recovery/actor_restarts"] == 1
    _check_groups(samples, asked, 2, cfg.rollout.group_size)
    assert all(s["valid"] for s in samples if s["text"])
