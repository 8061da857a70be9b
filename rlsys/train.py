"""The GRPO loop, top to bottom: generate -> reward -> advantages -> update -> broadcast."""
from __future__ import annotations

import logging
import random
import time
from pathlib import Path

from rlsys import cluster
from rlsys.batching import assign_advantages
from rlsys.config import RunConfig
from rlsys.data.loading import load_for_config
from rlsys.models import resolve_model
from rlsys.tracking import RunTracker

log = logging.getLogger(__name__)


def prompt_batches(examples: list, per_step: int, shuffle: bool, seed: int):
    """Endless stream of per-step prompt lists; reshuffled every epoch."""
    rng, epoch = random.Random(seed), list(examples)
    while True:
        if shuffle:
            rng.shuffle(epoch)
        for i in range(0, len(epoch) - per_step + 1, per_step):
            yield epoch[i:i + per_step]


def step_metrics(groups: list[list[dict]], channels: list[str]) -> dict[str, float]:
    every = [s for g in groups for s in g]
    samples = [s for s in every if s["valid"]]  # masked samples have no reward to average
    n = max(len(samples), 1)
    out = {f"reward/{c}": sum(s[f"reward_{c}"] for s in samples) / n for c in channels}
    out["reward/weighted"] = sum(s["reward"] for s in samples) / n
    out["rollout/response_len"] = sum(len(s["token_ids"]) for s in every) / max(len(every), 1)
    return out


def grpo_step(run, examples: list, cfg: RunConfig, channels: list[str]) -> tuple[list[dict], dict[str, float]]:
    """One step: generate and score groups, advantages, update, broadcast."""
    t0 = time.perf_counter()
    groups, timing = run.generate_and_score(examples)
    assign_advantages(groups, cfg.reward.weights, estimator=cfg.algorithm.advantage,
                      aggregation=cfg.reward.aggregation, eps=cfg.algorithm.norm_eps)
    samples = [s for g in groups for s in g]
    # Masked samples (reward unavailable) stay out of the loss as well as the statistics.
    trainable = [s for s in samples if s["valid"]]
    metrics = {**step_metrics(groups, channels), **timing, **run.train(trainable), **run.sync_weights(),
               **run.judge_metrics()}
    metrics["time/step"] = time.perf_counter() - t0
    metrics["policy_version"] = float(run.version)
    return samples, metrics


def train(cfg: RunConfig) -> Path:
    from rlsys.driver import GRPORun

    t_start = time.perf_counter()
    model_dir = resolve_model(cfg.model.path)
    examples = load_for_config(cfg.data)
    if len(examples) < cfg.rollout.prompts_per_step:
        raise ValueError(f"data.path has {len(examples)} prompts, fewer than rollout.prompts_per_step "
                         f"({cfg.rollout.prompts_per_step})")
    channels = [c for c, w in cfg.reward.weights.items() if w != 0]
    cluster.connect(cfg.cluster)
    tracker = RunTracker(cfg.train.output_dir, cfg.train.steps, cfg.model_dump(mode="json"))
    run, final = None, Path(cfg.train.output_dir) / "final"
    try:
        run = GRPORun(cfg, model_dir)
        log.info("cluster up in %.1fs", time.perf_counter() - t_start)
        batches = prompt_batches(examples, cfg.rollout.prompts_per_step, cfg.data.shuffle, cfg.seed)
        for step in range(1, cfg.train.steps + 1):
            samples, metrics = grpo_step(run, next(batches), cfg, channels)
            tracker.log_rollouts(samples, step)
            tracker.log_step(step, metrics)
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step < cfg.train.steps:
                run.save(str(Path(cfg.train.output_dir) / f"checkpoint-{step}"))
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
