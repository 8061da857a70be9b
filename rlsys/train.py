"""The GRPO loop, top to bottom: generate -> reward -> advantages -> update -> broadcast."""
from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path

from rlsys import checkpoint, cluster
from rlsys.batching import assign_advantages, reference_weight, reward_metrics, screen_groups
from rlsys.config import RunConfig
from rlsys.data.loading import load_for_run
from rlsys.data.stream import PromptStream
from rlsys.models import resolve_model
from rlsys.tracking import RunTracker

log = logging.getLogger(__name__)


def collect_groups(run, stream: PromptStream, cfg: RunConfig, channels: list[str]) -> tuple[list, dict]:
    """Generate and score a step's groups; screen them (rlsys.batching.screen_groups) and, with
    `algorithm.filter_groups.refill`, sample more prompts until the step is full."""
    fc, want = cfg.algorithm.filter_groups, cfg.rollout.prompts_per_step
    groups, counts, timing, rounds = [], Counter(), Counter(), 0
    while True:
        new, t = run.generate_and_score(stream.take(want - len(groups)))
        timing.update(t)
        kept, c = screen_groups(new, channels, filter_constant=fc.enabled, std_threshold=fc.std_threshold)
        groups, counts = groups + kept, counts + c
        if len(groups) >= want or not (fc.enabled and fc.refill) or rounds >= fc.max_refill_rounds:
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


def grpo_step(run, stream: PromptStream, cfg: RunConfig, channels: list[str]) -> tuple[list[dict], dict[str, float]]:
    """One step: generate and score groups, advantages, update, broadcast."""
    t0 = time.perf_counter()
    groups, rollout = collect_groups(run, stream, cfg, channels)
    hri = cfg.algorithm.reference_injection  # its weight warms up with the policy version (= steps done)
    assign_advantages(groups, cfg.reward.weights, estimator=cfg.algorithm.advantage, aggregation=cfg.reward.aggregation,
                      eps=cfg.algorithm.norm_eps, reference_weight=reference_weight(run.version + 1, hri.weight, hri.warmup_steps))
    samples = [s for g in groups for s in g]
    # Masked samples (reward unavailable) stay out of the loss as well as the statistics.
    trainable = [s for s in samples if s["valid"]]
    metrics = {**rollout, **reward_metrics(groups, channels), **run.train(trainable), **run.sync_weights(),
               **run.reward_actor_metrics()}
    metrics["time/step"] = time.perf_counter() - t0
    metrics["policy_version"] = float(run.version)
    return samples, metrics


def train(cfg: RunConfig, resume: str | None = None) -> Path:
    """Run `cfg` (from the checkpoint `resume` names: None, `auto` or a path); returns `final/`."""
    from rlsys.driver import GRPORun

    t_start = time.perf_counter()
    model_dir = resolve_model(cfg.model.path)
    examples = load_for_run(cfg)  # rows checked against the reward channels' fields, before Ray
    ckpt = checkpoint.resolve(resume, cfg.train.output_dir)
    state = checkpoint.start_state(ckpt, cfg.model_dump(mode="json"))  # before Ray: a bad one fails fast
    channels = cfg.reward.active_channels()
    cluster.connect(cfg.cluster)
    cluster.check_paths_on_every_node([model_dir, cfg.data.path, *cfg.reward.function_files()])
    tracker = RunTracker(cfg.train.output_dir, cfg.train.steps, cfg.model_dump(mode="json"), resume_step=state.step)
    run, final = None, Path(cfg.train.output_dir) / "final"
    try:
        run = GRPORun(cfg, model_dir)
        if ckpt is not None:
            run.load_checkpoint(str(ckpt), state.policy_version)
            log.info("resumed from %s: step %d, policy version %d", ckpt, state.step, state.policy_version)
        log.info("cluster up in %.1fs", time.perf_counter() - t_start)
        stream = PromptStream(examples, shuffle=cfg.data.shuffle, seed=cfg.seed, **state.stream)
        for step in range(state.step + 1, cfg.train.steps + 1):
            samples, metrics = grpo_step(run, stream, cfg, channels)
            tracker.log_rollouts(samples, step)
            tracker.log_step(step, metrics)
            checkpoint.save_if_due(run, cfg, step, stream)
        if cfg.train.save_final:
            run.save(str(final))
            log.info("final checkpoint: %s", final)
    finally:
        tracker.close()
        if run is not None:
            run.shutdown()
        cluster.shutdown()
    log.info("run finished in %.1fs; outputs in %s", time.perf_counter() - t_start, cfg.train.output_dir)
    return final
