"""The training loop, top to bottom: each step generates, rewards, updates (GRPO on advantages, or
DPO on best-vs-worst pairs: rlsys/steps.py) and broadcasts; checkpoints and logs in between.
With `algorithm.max_staleness: 1` (the default; 0: synchronous) the next step's rollout runs during
the update (rlsys/pipeline.py); a checkpoint's stream position excludes those prefetched prompts."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from rlsys import checkpoint, cluster
from rlsys.config import RunConfig
from rlsys.data.loading import load_for_run
from rlsys.data.stream import PromptStream
from rlsys.models import resolve_model
from rlsys.steps import dpo_step, grpo_step, make_pipeline
from rlsys.tracking import RunTracker

log = logging.getLogger(__name__)


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
    run, pipeline, final = None, None, Path(cfg.train.output_dir) / "final"
    try:
        run = GRPORun(cfg, model_dir)
        if ckpt is not None:
            run.load_checkpoint(str(ckpt), state.policy_version)
            log.info("resumed from %s: step %d, policy version %d", ckpt, state.step, state.policy_version)
        log.info("cluster up in %.1fs", time.perf_counter() - t_start)
        stream = PromptStream(examples, shuffle=cfg.data.shuffle, seed=cfg.seed, **state.stream)
        pipeline = make_pipeline(run, stream, cfg, channels)
        step_fn = dpo_step if cfg.algorithm.is_preference else grpo_step
        for step in range(state.step + 1, cfg.train.steps + 1):
            samples, metrics = step_fn(run, pipeline, cfg, channels, step)
            tracker.log_rollouts(samples, step)
            tracker.log_step(step, metrics)
            checkpoint.save_if_due(run, cfg, step, pipeline.stream_state())
        if cfg.train.save_final:
            run.save(str(final))
            log.info("final checkpoint: %s", final)
    finally:
        if pipeline is not None:
            pipeline.close()
        tracker.close()
        if run is not None:
            run.shutdown()
        cluster.shutdown()
    log.info("run finished in %.1fs; outputs in %s", time.perf_counter() - t_start, cfg.train.output_dir)
    return final
