"""The driver's rollout path: how a step's prompts reach the engines, and the streaming
generate-and-score loop, with stand-in actors (no vLLM).

Regression guard for issue 10: the driver used to hand each engine its share in two chunks so
that scoring of the first overlapped generation of the second, which halved every engine's
decode batch and its tokens/s (a decode step costs about the same for 8 or 16 sequences).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time

import pytest

from rlsys.driver import engine_shares


@pytest.mark.parametrize("n_engines", [1, 2, 3, 5])
def test_engine_shares_give_each_engine_its_whole_share_in_one_call(n_engines):
    assert engine_shares(4, 1) == [[0, 1, 2, 3]]   # the demo: one engine, all 4 prompts in one batch
    for n in range(1, 23):
        shares = engine_shares(n, n_engines)
        assert len(shares) == min(n, n_engines)     # one call per engine, never more
        assert sorted(k for s in shares for k in s) == list(range(n))
        assert min(len(s) for s in shares) >= n // n_engines   # no engine gets less than its part


# ----------------------------------------------------------------------------- with stand-in actors

class _Engine:
    """generate_stream as RolloutWorker's: (index, result) per prompt, here in reverse order,
    one every `delay` s; dies (the process exits) after `die_after` results if set."""

    def __init__(self, delay: float, die_after: int | None = None):
        self.delay, self.die_after, self.calls = delay, die_after, []

    def generate_stream(self, prompts, sampling, n, references=None, indices=None):
        indices = list(range(len(prompts))) if indices is None else list(indices)
        self.calls.append({"prompts": len(prompts), "indices": indices, "seed": sampling["seed"]})
        for done, k in enumerate(reversed(range(len(prompts)))):
            if self.die_after is not None and done == self.die_after:
                os._exit(1)
            time.sleep(self.delay)
            yield indices[k], {"prompt_token_ids": [1, 2], "skipped": None, "policy_version": 0,
                               "samples": [{"token_ids": [3] * (j + 1), "text": f"{prompts[k][0]['content']}/{j}"}
                                           for j in range(n)]}

    def get_calls(self):
        return self.calls


class _Rewarder:
    def __init__(self):
        self.calls = []

    def score_groups(self, groups):
        self.calls.append((time.monotonic(), len(groups)))
        return [{"len": [float(len(t)) for t in g["texts"]]} for g in groups]

    def get_calls(self):
        return self.calls


@pytest.fixture(scope="module")
def ray_local():
    import ray

    tmp = tempfile.mkdtemp(prefix="rlsys-driver-test-ray-", dir="/tmp")  # short: Ray's socket paths
    here = os.path.dirname(os.path.abspath(__file__))  # the stand-in actors' module, for the workers
    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=tmp, log_to_driver=False,
             object_store_memory=100 * 1024 * 1024,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([here, os.path.dirname(here)])}})
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def _run(ray, n_engines: int, delay: float, die_after: int | None = None):
    """A GRPORun holding only stand-in engines and one reward actor (what generate_and_score uses)."""
    from rlsys.cluster import ActorDirectory
    from rlsys.config import ClusterConfig, RolloutConfig, RunConfig
    from rlsys.driver import GRPORun

    run = GRPORun.__new__(GRPORun)
    run.cfg = RunConfig.model_construct(seed=7, rollout=RolloutConfig(group_size=2),
                                        cluster=ClusterConfig(actor_timeout_s=60, max_actor_restarts=1))
    run.version, run.actors, run.restarts, run.learners, run.learner_pg = 3, ActorDirectory(), 0, [], None
    engine_cls, rewarder_cls = ray.remote(num_cpus=0)(_Engine), ray.remote(num_cpus=0)(_Rewarder)
    run._new_rollout = lambda i: engine_cls.remote(delay)
    run.rollouts = [engine_cls.remote(delay, die_after if i == 0 else None) for i in range(n_engines)]
    run.rewarders = [rewarder_cls.remote()]
    for i, a in enumerate(run.rollouts + run.rewarders):
        run.actors.add(a, f"actor {i}")
    return run


@pytest.mark.e2e
def test_generate_and_score_one_streamed_call_per_engine_scoring_overlaps(ray_local):
    from rlsys.data.prompts import PromptExample

    ray = ray_local
    examples = [PromptExample(f"p{i}", [{"role": "user", "content": f"prompt {i}"}]) for i in range(6)]
    run = _run(ray, n_engines=2, delay=0.3)
    groups, m = run.generate_and_score(examples)
    calls = [ray.get(e.get_calls.remote()) for e in run.rollouts]
    assert [[c["prompts"] for c in cs] for cs in calls] == [[3], [3]]        # one call each, whole share
    assert [cs[0]["seed"] for cs in calls] == [7 + 3000, 7 + 3001]          # seed: run seed, version, engine
    # Groups come back in example order, each with its own texts and rewards.
    assert [g[0]["prompt_uid"] for g in groups] == [e.uid for e in examples]
    for e, g in zip(examples, groups):
        assert [s["text"] for s in g] == [f"{e.messages[0]['content']}/{j}" for j in range(2)]
        assert [s["reward_len"] for s in g] == [float(len(s["text"])) for s in g]
    assert m["rollout/generated_tokens"] == 6 * (1 + 2) and m["recovery/actor_restarts"] == 0
    # Scoring started before generation ended: more than one scoring call, the first early.
    scoring = ray.get(run.rewarders[0].get_calls.remote())
    assert len(scoring) >= 2 and sum(n for _, n in scoring) == 6


@pytest.mark.e2e
def test_dead_engine_is_replaced_and_only_missing_prompts_reissued_with_their_seeds(ray_local):
    from rlsys.data.prompts import PromptExample

    ray = ray_local
    examples = [PromptExample(f"p{i}", [{"role": "user", "content": f"prompt {i}"}]) for i in range(5)]
    run = _run(ray, n_engines=1, delay=0.2, die_after=2)
    dead = run.rollouts[0]
    groups, m = run.generate_and_score(examples)
    assert run.rollouts[0] is not dead and m["recovery/actor_restarts"] == 1
    # The first engine returned prompts 4 and 3 (reverse order) before dying: the new one gets
    # 0..2 only, at their original indices (which seed them) and the same call seed.
    assert ray.get(run.rollouts[0].get_calls.remote()) == [{"prompts": 3, "indices": [0, 1, 2], "seed": 7 + 3000}]
    assert [g[0]["prompt_uid"] for g in groups] == [e.uid for e in examples]   # each once, in order
