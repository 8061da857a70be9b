"""The actors of one GRPO run and the four things the loop asks of them:
generate+score a step's prompts, train on the scored samples, broadcast the new weights, save.

Placement: `learner.num_ranks` DeepSpeed ranks, `rollout.num_actors` vLLM engines, and
`reward.num_actors` reward workers, each a Ray actor with its configured resources.
"""
from __future__ import annotations

import logging
import os
import random
import time

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ray.exceptions import RayActorError

# The actor classes' modules import nothing heavy: each actor imports its engine in its own process.
from actors.learner import LearnerWorker
from actors.reward import RewardWorker
from actors.rollout import RolloutWorker
from rlsys.batching import split_for_ranks, split_mini_batches, split_pairs_for_ranks
from rlsys.cluster import (ACTOR_ENV_DEFAULTS, ActorDirectory, ActorFailure, PlacementError, check_local_head_fits,
                           free_port, get_with_deadline, wait_for_placement)
from rlsys.cluster_files import actor_demands
from rlsys.config import RunConfig
from rlsys.data.prompts import example_fields
from rlsys.weight_sync import choose_backend

log = logging.getLogger(__name__)


def actor_env(cpu_share: int | None = None) -> dict:
    """Env vars for an actor (passed explicitly: on a joined cluster the driver's env does not
    reach remote workers). For a compute actor without a GPU (`cpu_share` set) also DeepSpeed's
    CPU accelerator and 1/cpu_share of the cores for torch threads: Ray would set
    OMP_NUM_THREADS from the actor's logical CPUs, which are oversubscribed here; the engine
    (idle while learners train) takes every core, each of the N learner ranks 1/N of them
    (2 threads per rank on 2 cores measured ~40% slower). Such an actor sees no GPU either:
    Ray 2.60 no longer hides the GPUs from an actor that reserved none, so on a GPU node it
    would compute on GPU 0 unreserved, beside the actors that did reserve it."""
    env = {k: os.environ.get(k, v) for k, v in ACTOR_ENV_DEFAULTS.items()}
    if cpu_share:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // cpu_share)),
                   CUDA_VISIBLE_DEVICES="")
    return env


def engine_shares(n_prompts: int, n_engines: int) -> list[list[int]]:
    """Which of a step's prompts (positions) each engine generates: all of an engine's share in
    ONE call, so they are decoded in one batch. A decode step costs about the same for 8 or 16
    sequences (it reads every weight once either way), so splitting a share into chunks, as
    the driver once did to overlap scoring, halved generation speed; the overlap now comes
    from streaming groups back as they finish. Shares differ by at most one prompt."""
    return [list(range(e, n_prompts, n_engines)) for e in range(min(n_engines, n_prompts))]


@ray.remote
def _rendezvous() -> tuple[str, int]:
    """Address and a free port of the node this runs on (learner rank 0's)."""
    return ray.util.get_node_ip_address(), free_port()


class GRPORun:
    def __init__(self, cfg: RunConfig, model_dir: str, *, learners: bool = True):
        """Start every actor of the run. `learners=False` starts the engines and reward actors
        only (no learner ranks, no weight-sync group): `generate_and_score` works, training does
        not; benchmarks/rollout_overhead.py measures the rollout path so."""
        self.cfg, self.version, self.actors, self.restarts = cfg, 0, ActorDirectory(), 0
        self.learner_pg = None
        check_local_head_fits(actor_demands(cfg))
        self.learners = self._start_learners(model_dir) if learners else []
        self.rollouts = self._start_rollouts(model_dir)
        self.rewarders = self._start_rewarders()
        for kind, group in (("learner rank", self.learners), ("rollout engine", self.rollouts),
                            ("reward actor", self.rewarders)):
            for i, a in enumerate(group):
                self.actors.add(a, f"{kind} {i}")
        every = self.learners + self.rollouts + self.rewarders
        self._get([a.__ray_ready__.remote() for a in every], "starting the actors", cfg.cluster.startup_timeout_s)
        self.actors.locate(every, cfg.cluster.startup_timeout_s)
        if self.learners:
            self._init_weight_sync()

    def _get(self, refs, what: str, timeout_s: float | None = None):
        """Every wait on an actor: a deadline, and a failure that names the actor (rlsys.cluster)."""
        return get_with_deadline(refs, what, timeout_s or self.cfg.cluster.actor_timeout_s, self.actors)

    def _start_learners(self, model_dir: str) -> list:
        lc = self.cfg.learner
        # Ranks go into a placement group so that rank 0's node (which hosts the rendezvous)
        # is known before any rank starts; its address and a free port are read on that node.
        bundle = {k: v for k, v in {"CPU": lc.num_cpus, "GPU": lc.num_gpus}.items() if v > 0}
        self.learner_pg = placement_group([bundle] * lc.num_ranks, strategy="PACK")
        wait_for_placement(self.learner_pg, [bundle] * lc.num_ranks, self.cfg.cluster.placement_timeout_s,
                           f"learner placement group ({lc.num_ranks} ranks)")
        host, port = self._rank0_address()
        cls = ray.remote(num_cpus=lc.num_cpus, num_gpus=lc.num_gpus, runtime_env={
            "env_vars": actor_env(lc.num_ranks if lc.num_gpus == 0 else None)})(LearnerWorker)
        return [cls.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.learner_pg, placement_group_bundle_index=r)).remote(
                    r, lc.num_ranks, host, port, model_dir, lc, self.cfg.algorithm, self.cfg.seed,
                    dtype=self.cfg.weights_dtype(), temperature=self.learner_temperature())
                for r in range(lc.num_ranks)]

    def _start_rollouts(self, model_dir: str) -> list:
        rc = self.cfg.rollout
        kv_gib = self.cfg.kv_cache_gib(model_dir)
        if rc.num_gpus == 0:
            log.info("KV cache per rollout engine: %.3f GiB (rollout.kv_cache_gib: %s)", kv_gib, rc.kv_cache_gib)
        cls = ray.remote(num_cpus=rc.num_cpus, num_gpus=rc.num_gpus, runtime_env={
            "env_vars": actor_env(1 if rc.num_gpus == 0 else None)})(RolloutWorker)
        self._new_rollout = lambda i: cls.remote(
            model_dir, max_model_len=rc.max_model_len, kv_cache_gib=kv_gib,
            gpu_memory_utilization=rc.gpu_memory_utilization, enforce_eager=rc.enforce_eager,
            dtype=self.cfg.weights_dtype(), seed=self.cfg.seed + i, cpu_engine_in_process=rc.cpu_engine_in_process,
            cpu_fast_top_p=rc.cpu_fast_top_p)
        return [self._new_rollout(i) for i in range(rc.num_actors)]

    def _start_rewarders(self) -> list:
        rw = self.cfg.reward
        # The judge config is read here, on the driver, so a bad file fails before any actor
        # starts and workers on other nodes need no copy of it.
        judge_cfg = None
        if "sq" in rw.active_channels():
            from rlsys.judge import load_judge_config
            judge_cfg = load_judge_config(rw.judge).model_dump(mode="json")
        cls = ray.remote(num_cpus=rw.num_cpus, runtime_env={"env_vars": actor_env()})(RewardWorker)
        self._new_rewarder = lambda i: cls.remote(rw, judge_cfg)
        return [self._new_rewarder(i) for i in range(rw.num_actors)]

    def learner_temperature(self) -> float:
        """GRPO takes every log-prob under the sampler's temperature (the ratio is between the
        distributions samples come from); a preference loss compares the policy itself (T = 1)."""
        return 1.0 if self.cfg.algorithm.is_preference else self.cfg.rollout.temperature

    def _rank0_address(self) -> tuple[str, int]:
        return self._get(_rendezvous.options(num_cpus=0, scheduling_strategy=PlacementGroupSchedulingStrategy(
            self.learner_pg, placement_group_bundle_index=0)).remote(), "rendezvous on learner rank 0's node",
            self.cfg.cluster.startup_timeout_s)

    def _init_weight_sync(self) -> None:
        """Learner rank 0 + every engine form the broadcast group; all join concurrently."""
        t = self.cfg.cluster.startup_timeout_s
        self.metas = self._get(self.learners[0].weight_metadata.remote(), "weight metadata", t)
        accelerator = self._get(self.learners[0].communication_backend.remote(), "learner backend", t)
        try:
            backend, why = choose_backend(self.cfg.cluster.weight_sync_backend, accelerator,
                                          self.actors.place(self.learners[0]),
                                          [self.actors.place(r) for r in self.rollouts])
        except ValueError as e:
            raise PlacementError(str(e)) from None
        (host, port), world = self._rank0_address(), 1 + len(self.rollouts)
        refs = [lr.init_weight_sync.remote(host, port, world, backend) for lr in self.learners]
        refs += [r.init_weight_transport.remote(host, port, i + 1, world, backend) for i, r in enumerate(self.rollouts)]
        self._get(refs, "forming the weight-sync group", t)
        log.info("weight sync group ready: %s (%s) over %s, %d tensors", backend, why, f"{host}:{port}",
                 len(self.metas))

    def generate_and_score(self, examples: list, seed_round: int | None = None
                           ) -> tuple[list[list[dict]], dict[str, float]]:
        """Generate a group per example, scoring the groups that are complete while the engines
        still generate the rest.

        Each engine gets its whole share of the step's prompts in one call (`engine_shares`), so
        they all sit in its decode batch together, and streams each group back as soon as it
        is complete (`RolloutWorker.generate_stream`). Whatever groups have arrived go to a
        reward actor as soon as one is idle: scoring overlaps generation, and scoring calls
        grow when scoring is slower than generation.

        Returns every generated group in `examples` order (lists of sample dicts carrying
        reward_<channel>, `valid` and `mask_reason`; `rlsys.batching.screen_groups` decides
        which are usable) and timings. A rollout engine or reward actor that dies meanwhile is
        replaced (`_replace`); the prompts whose groups had not come back are re-issued with
        the same seeds and unscored groups are scored again, so no group is lost and none is
        counted twice.
        """
        rc = self.cfg.rollout
        sampling = dict(temperature=rc.temperature, top_p=rc.top_p, top_k=rc.top_k,
                        repetition_penalty=rc.repetition_penalty, max_new_tokens=rc.max_new_tokens)
        shares = engine_shares(len(examples), len(self.rollouts))
        # Seeds follow the step's round (default: the policy version, which is the same thing in
        # a synchronous run; a prefetched step runs at the previous version and needs its own).
        seed_key = self.version if seed_round is None else seed_round
        restarts_before = self.restarts
        hri = self.cfg.algorithm.reference_injection

        def generate(e: int, todo: list[int]):
            """Engine e's prompts `todo` (positions in its share); share e always goes to engine e
            with the same seed, and a prompt's samples are seeded by its position in the share."""
            eng = self.rollouts[e]
            share = [examples[k] for k in shares[e]]
            refs = [example_fields(share[j])[hri.field] for j in todo] if hri.enabled else None
            stream = eng.generate_stream.options(num_returns="streaming").remote(
                [share[j].messages for j in todo], dict(sampling, seed=self.cfg.seed + seed_key * 1000 + e),
                rc.group_size, refs, todo)
            return stream, eng

        def score(r: int, batch: list[int]):
            rewarder = self.rewarders[r]
            groups_in = [{"texts": [s["text"] for s in outs[k]["samples"]], "example": example_fields(examples[k])}
                         for k in batch]
            return rewarder.score_groups.remote(groups_in), rewarder

        t0 = time.perf_counter()
        streams = {}   # ObjectRefGenerator -> (engine index, engine)
        for e in range(len(shares)):
            stream, eng = generate(e, list(range(len(shares[e]))))
            streams[stream] = (e, eng)
        outs: dict[int, dict] = {}      # example position -> the engine's result for it
        unscored: list[int] = []        # positions generated, not yet sent to a reward actor
        scoring = {}                    # ref -> (reward actor index, reward actor, positions)
        scored: dict[int, dict] = {}    # position -> that group's rewards
        gen_done_at = t0
        while streams or unscored or scoring:
            busy = {r for r, _, _ in scoring.values()}
            idle = [r for r in range(len(self.rewarders)) if r not in busy]
            if unscored and idle:
                ref, rewarder = score(idle[0], unscored)
                scoring[ref] = (idle[0], rewarder, unscored)
                unscored = []
            deadline = self.cfg.cluster.actor_timeout_s
            ready, _ = ray.wait([*streams, *scoring], num_returns=1, timeout=deadline)
            if not ready:
                waiting = [self.actors.name(a._actor_id.hex()) for a in
                           [eng for _, eng in streams.values()] + [rw for _, rw, _ in scoring.values()]]
                raise ActorFailure(f"generation and scoring: no answer within {deadline:.0f}s "
                                   f"(cluster.actor_timeout_s) from {', '.join(waiting)}")
            if ready[0] in scoring:
                r, rewarder, batch = scoring.pop(ready[0])
                try:
                    scored.update(zip(batch, ray.get(ready[0])))
                except RayActorError as err:
                    self._replace("reward", r, rewarder, err)
                    unscored = batch + unscored
                continue
            stream = ready[0]
            e, eng = streams.pop(stream)
            try:
                j, out = ray.get(next(stream))
            except StopIteration:  # engine e's share is all back
                continue
            except RayActorError as err:
                self._replace("rollout", e, eng, err)
                stream, eng = generate(e, [j for j, k in enumerate(shares[e]) if k not in outs])
                streams[stream] = (e, eng)
                continue
            streams[stream] = (e, eng)
            gen_done_at = time.perf_counter()
            k = shares[e][j]
            outs[k] = out
            if not out.get("skipped"):  # the injected reference is the group's last member (HRI)
                out["samples"] += [out.pop("reference")] if "reference" in out else []
                unscored.append(k)
        groups, skipped = [], 0
        for k, e in enumerate(examples):
            o = outs[k]
            if o.get("skipped"):
                skipped += 1
                continue
            rewards = scored[k]
            valid = rewards.pop("valid", None) or [True] * len(o["samples"])
            reasons = rewards.pop("mask_reason", None) or [None] * len(o["samples"])
            groups.append([dict(s, prompt_uid=e.uid, sample=j, policy_version=o["policy_version"],
                                is_reference=bool(s.get("is_reference")),
                                prompt_token_ids=o["prompt_token_ids"], valid=valid[j], mask_reason=reasons[j],
                                **{f"reward_{c}": v[j] for c, v in rewards.items()})
                           for j, s in enumerate(o["samples"])])
        t1 = time.perf_counter()
        tokens = sum(len(s["token_ids"]) for g in groups for s in g if not s.get("is_reference"))
        return groups, {"time/generate": gen_done_at - t0, "time/reward_wait": t1 - gen_done_at,
                        "rollout/generated_tokens": float(tokens), "rollout/skipped_prompts": float(skipped),
                        "recovery/actor_restarts": float(self.restarts - restarts_before)}

    def _replace(self, kind: str, i: int, dead, error: Exception) -> None:
        """Replace dead rollout engine / reward actor `i` (unless already replaced): a new actor,
        and for an engine a re-formed weight-sync group and the current policy's weights."""
        group = self.rollouts if kind == "rollout" else self.rewarders
        name = self.actors.name(dead._actor_id.hex())
        if group[i] is not dead:  # a second in-flight call of the same dead actor: already done
            return
        if self.restarts >= self.cfg.cluster.max_actor_restarts:
            raise ActorFailure(f"{name} died ({str(error).splitlines()[0][:200] if str(error) else error!r}) "
                               f"and cluster.max_actor_restarts={self.cfg.cluster.max_actor_restarts} "
                               "restarts are used up") from error
        self.restarts += 1
        log.warning("%s died; restarting it (restart %d of at most %d)", name, self.restarts,
                    self.cfg.cluster.max_actor_restarts)
        ray.kill(dead)
        new = (self._new_rollout if kind == "rollout" else self._new_rewarder)(i)
        group[i] = new
        self.actors.add(new, f"{'rollout engine' if kind == 'rollout' else 'reward actor'} {i}")
        self._get(new.__ray_ready__.remote(), f"restarting {name}", self.cfg.cluster.startup_timeout_s)
        self.actors.locate([new], self.cfg.cluster.startup_timeout_s)
        if kind == "rollout" and self.learners:
            self._init_weight_sync()
            self._push_weights()  # the new engine joins at the current policy version

    def train(self, samples: list[dict]) -> dict[str, float]:
        """One update on the step's samples: `algorithm.mini_batches` optimizer steps (whole
        groups per mini-batch, order seeded by run seed and policy version), each split over the
        learner ranks by tokens."""
        t0 = time.perf_counter()
        parts = split_mini_batches(samples, self.cfg.algorithm.mini_batches, self._update_rng())
        keep = self.cfg.learner.shared_prompt
        return self._update([split_for_ranks(p, len(self.learners), keep_groups=keep) for p in parts], t0)

    def train_pairs(self, pairs: list[tuple[dict, dict]]) -> dict[str, float]:
        """One preference update on the step's (chosen, rejected) pairs: `algorithm.mini_batches`
        optimizer steps over the pairs (order seeded like `train`), whole pairs per rank."""
        t0 = time.perf_counter()
        order = list(pairs)
        self._update_rng().shuffle(order)
        n = max(1, min(self.cfg.algorithm.mini_batches, len(order)))
        return self._update([split_pairs_for_ranks(order[i::n], len(self.learners)) for i in range(n)], t0)

    def _update_rng(self) -> random.Random:
        """The order of a step's mini-batches: seeded by the run seed and the policy version."""
        return random.Random(self.cfg.seed * 1_000_003 + self.version)

    def _update(self, per_part: list[list[dict]], t0: float) -> dict[str, float]:
        """Every rank's train_step on its share of every mini-batch (`per_part[j][rank]`)."""
        batches = [{"mini_batches": [pp[r] for pp in per_part]} for r in range(len(self.learners))]
        metrics = self._get([lr.train_step.remote(b) for lr, b in zip(self.learners, batches)], "learner update")[0]
        return {**metrics, "time/train": time.perf_counter() - t0}

    def sync_weights(self) -> dict[str, float]:
        """Broadcast the learner's weights into every engine; samples generated afterwards carry
        the new policy version."""
        t0 = time.perf_counter()
        self.version += 1
        sent, loaded = self._push_weights()
        # Where the time goes: the learner's gather + send, the slowest engine's receive + load.
        return {"time/sync": time.perf_counter() - t0, "time/sync_send": max(s["seconds"] for s in sent),
                "time/sync_load": max(x.get("total_seconds", x["seconds"]) for x in loaded)}

    def _push_weights(self) -> tuple[list[dict], list[dict]]:
        """Every learner rank's and every engine's report of the broadcast."""
        refs = [lr.broadcast_weights.remote() for lr in self.learners]
        refs += [r.update_weights.remote(self.metas, self.version) for r in self.rollouts]
        done = self._get(refs, f"weight broadcast (policy version {self.version})")
        return done[:len(self.learners)], done[len(self.learners):]

    def reward_actor_metrics(self) -> dict[str, float]:
        """Judge counters (cumulative) and per-channel time / masked / errors / timeouts (since the
        last call) summed over the reward actors."""
        from actors.reward import merge_judge_metrics
        per_actor = self._get([r.judge_metrics.remote() for r in self.rewarders], "judge metrics")
        per_actor += self._get([r.channel_metrics.remote() for r in self.rewarders], "reward channel metrics")
        return merge_judge_metrics(per_actor)

    def save(self, path: str) -> str:
        """HF checkpoint from the learner; the judge caches go with it."""
        self._get([lr.save_hf.remote(path) for lr in self.learners], "saving the HF checkpoint")
        self._save_reward_state(path)
        return path

    def _save_reward_state(self, path: str) -> None:
        self._get([r.save_state.remote(f"{path}/judge_cache-{i}.json") for i, r in enumerate(self.rewarders)],
                  "saving reward state")

    def save_checkpoint(self, path: str) -> None:
        """Everything but the driver's own state (rlsys.checkpoint writes that): every learner
        rank's DeepSpeed state, an HF export of the policy, the reward actors' state."""
        self._get([lr.save_checkpoint.remote(f"{path}/learner", "state") for lr in self.learners],
                  "saving the learner checkpoint")
        self._get([lr.save_hf.remote(f"{path}/hf") for lr in self.learners], "saving the HF export")
        self._save_reward_state(path)

    def load_checkpoint(self, path: str, version: int) -> None:
        """Restore a `save_checkpoint` and bring every engine to the restored policy `version`."""
        self._get([lr.load_checkpoint.remote(f"{path}/learner", "state") for lr in self.learners],
                  f"loading {path}")
        self._get([r.load_state.remote(f"{path}/judge_cache-{i}.json") for i, r in enumerate(self.rewarders)],
                  "loading reward state")
        self.version = version
        self._push_weights()

    def shutdown(self) -> None:
        """Stop engines cleanly first (they unlink their shared-memory buffers), then kill."""
        for a in self.rollouts + self.learners + self.rewarders:
            try:
                ray.get(a.shutdown.remote(), timeout=60)
            except Exception as e:  # the run is over; a dead actor must not hide the result
                log.warning("actor shutdown: %s", e)
        for a in self.learners + self.rollouts + self.rewarders:
            ray.kill(a)
        if self.learner_pg is not None:
            remove_placement_group(self.learner_pg)
