"""One training step each: take the step's scored groups (rlsys.pipeline: collected now, or
prefetched while the previous step trained), then GRPO (advantages) or DPO (pairs), update,
broadcast. Called by the loop in rlsys/train.py."""
from __future__ import annotations

import time
from collections import Counter

from rlsys.batching import (assign_advantages, build_pairs, reference_weight, reward_metrics,
                            screen_groups)
from rlsys.config import RunConfig
from rlsys.data.stream import PromptStream
from rlsys.pipeline import RolloutPipeline, stage_metrics


def make_pipeline(run, stream: PromptStream, cfg: RunConfig, channels: list[str]) -> RolloutPipeline:
    """The run's source of scored groups (synchronous, or one step ahead: rlsys.pipeline)."""
    return RolloutPipeline(lambda st, step, examples: collect_groups(run, st, cfg, channels, step, examples), stream,
                           cfg.algorithm.max_staleness, cfg.train.steps, cfg.cluster.actor_timeout_s,
                           cfg.algorithm.stale_groups)


def collect_groups(run, stream: PromptStream, cfg: RunConfig, channels: list[str], step: int,
                   examples: list | None = None) -> tuple[list, dict]:
    """Generate and score step `step`'s groups; screen them (rlsys.batching.screen_groups) and,
    with `algorithm.filter_groups.refill`, sample more prompts until the step is full. Sampling
    seeds follow the step (= the policy version in a synchronous run). `examples`: exactly these
    prompts, one round, nothing from the stream (stale groups regenerated: rlsys.pipeline)."""
    fc = cfg.algorithm.filter_groups
    want = cfg.rollout.prompts_per_step if examples is None else len(examples)
    groups, counts, timing, rounds = [], Counter(), Counter(), 0
    while True:
        asked = stream.take(want - len(groups)) if examples is None else examples
        new, t = run.generate_and_score(asked, seed_round=step - 1)
        timing.update(t)
        kept, c = screen_groups(new, channels, filter_constant=fc.enabled, std_threshold=fc.std_threshold)
        groups, counts = groups + kept, counts + c
        if (len(groups) >= want or examples is not None or not (fc.enabled and fc.refill)
                or rounds >= fc.max_refill_rounds):
            break
        rounds += 1
    counts["refill_surplus_groups"] = max(0, len(groups) - want)
    groups = groups[:want]
    for gi, g in enumerate(groups):
        for s in g:
            s["group"] = gi
    out = {**timing, **{f"rollout/{k}": float(counts[k]) for k in
                        ("masked_nonfinite", "dropped_groups", "filtered_groups", "refill_surplus_groups")}}
    out.update({"rollout/refill_rounds": float(rounds), "rollout/groups": float(len(groups)),
                "perf/gen_tokens_per_s": timing["rollout/generated_tokens"] / max(timing["time/generate"], 1e-9)})
    return groups, out


def grpo_step(run, pipeline: RolloutPipeline, cfg: RunConfig, channels: list[str], step: int | None = None
              ) -> tuple[list[dict], dict[str, float]]:
    """One step (`step`: 1-based; default: the one after the policy's version): the step's
    scored groups, advantages, update, broadcast (asynchronous mode: the next step's groups are
    generated during the update)."""
    t0 = time.perf_counter()
    step = run.version + 1 if step is None else step
    groups, rollout = pipeline.groups(step, run.version)
    pipeline.prefetch(step)
    hri = cfg.algorithm.reference_injection  # its weight warms up with the policy version (= steps done)
    assign_advantages(groups, cfg.reward.weights, estimator=cfg.algorithm.advantage, aggregation=cfg.reward.aggregation,
                      eps=cfg.algorithm.norm_eps, reference_weight=reference_weight(run.version + 1, hri.weight, hri.warmup_steps))
    samples = [s for g in groups for s in g]
    # Masked samples (reward unavailable) stay out of the loss as well as the statistics.
    trainable = [s for s in samples if s["valid"]]
    metrics = {**rollout, **reward_metrics(groups, channels), **run.train(trainable)}
    return samples, _finish(run, pipeline, metrics, t0)


def dpo_step(run, pipeline: RolloutPipeline, cfg: RunConfig, channels: list[str], step: int | None = None
             ) -> tuple[list[dict], dict[str, float]]:
    """One preference step (recipe C): G scored samples per prompt, pair each group's best and
    worst (rlsys.batching.build_pairs), a DPO update on the pairs, broadcast."""
    t0 = time.perf_counter()
    step = run.version + 1 if step is None else step
    groups, rollout = pipeline.groups(step, run.version)
    pipeline.prefetch(step)
    pairs, counts = build_pairs(groups, cfg.reward.weights, cfg.algorithm.preference.min_margin)
    samples = [s for g in groups for s in g]
    gap = [c["reward"] - r["reward"] for c, r in pairs]
    metrics = {**rollout, **reward_metrics(groups, channels), "pairs/pairs": float(len(pairs)),
               "pairs/tied_groups": float(counts["tied_groups"]), "pairs/reward_gap": sum(gap) / max(len(gap), 1),
               **run.train_pairs(pairs)}
    return samples, _finish(run, pipeline, metrics, t0)


def _finish(run, pipeline: RolloutPipeline, metrics: dict[str, float], t0: float) -> dict[str, float]:
    """Broadcast once the engines are idle (weights change between requests, never inside one),
    then the step's remaining metrics."""
    pipeline.wait_engines_idle()
    metrics = {**metrics, **run.sync_weights(), **run.reward_actor_metrics()}
    metrics["time/step"] = time.perf_counter() - t0
    metrics["policy_version"] = float(run.version)
    if pipeline.asynchronous:
        metrics.update(stage_metrics(metrics["time/step"], metrics), **{"async/queue_steps": float(pipeline.queued_steps)})
    return metrics
