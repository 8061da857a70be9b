"""Synchronous vs asynchronous steps (`algorithm.max_staleness` 0 vs 1), side by side.

One invocation runs the same recipe from the same seed and weights twice through the real stack
(private Ray head, a vLLM engine, a reward actor whose judge channel calls a local
OpenAI-compatible server on 127.0.0.1 with a configurable per-request latency, two DeepSpeed
ZeRO-3 ranks): first synchronously, then with the rollout one step ahead of the learner.

Reported per mode: the median step time (step 1 excluded: it has nothing to overlap with), the
busy time of each stage (generate + score, train, weight sync) and, for the asynchronous run,
step time / the slowest stage's busy time (goal <= 1.15: the step costs its slowest stage, the
others hidden behind it). The headline is the step-time ratio sync / async.

Run: `.venv/bin/python benchmarks/pipeline_overlap.py [--judge-latency 0.5] [--steps 5]`
(a few minutes on a 2-core CPU with the tiny model); writes
benchmarks/results/pipeline_overlap.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "judge")]

from benchmarks.machine import machine_info  # noqa: E402


def _run(mode: int, a: argparse.Namespace, root: Path, model_dir: str, data: Path, judge_yaml: Path) -> list[dict]:
    from rlsys.config import load_config
    from rlsys.data.loading import load_for_run
    from rlsys.data.stream import PromptStream
    from rlsys.driver import GRPORun
    from rlsys.steps import grpo_step, make_pipeline

    cfg = load_config(base={
        "seed": 0, "model": {"path": model_dir, "dtype": "float32"},
        "data": {"path": str(data), "format": "polaris"},
        "rollout": {"prompts_per_step": a.prompts, "group_size": a.group_size, "max_new_tokens": a.new_tokens,
                    "max_model_len": 1024, "kv_cache_gib": 0.25, "temperature": 1.0, "top_p": 1.0},
        "reward": {"judge": str(judge_yaml), "weights": {"sq": 1.0, "rep": -1.5, "len_pen": -0.8, "blank": -1.0}},
        "algorithm": {"kl_coef": 0.0, "max_staleness": mode, "tis_cap": 2.0 if mode else None},
        "learner": {"num_ranks": 2, "micro_batch_size": 8, "lr": 1e-4},
        "train": {"steps": a.steps, "output_dir": str(root / f"run-staleness{mode}")},
    })
    channels = cfg.reward.active_channels()
    run = GRPORun(cfg, model_dir)
    history = []
    try:
        pipeline = make_pipeline(run, PromptStream(load_for_run(cfg), shuffle=True, seed=cfg.seed), cfg, channels)
        try:
            for step in range(1, a.steps + 1):
                _, m = grpo_step(run, pipeline, cfg, channels, step)
                logging.info("max_staleness=%d step %d: %.1fs (generate %.1f, train %.1f)", mode, step,
                             m["time/step"], m["time/generate"] + m["time/reward_wait"], m["time/train"])
                history.append(m)
        finally:
            pipeline.close()
    finally:
        run.shutdown()
    return history


def _summary(history: list[dict]) -> dict:
    steady = history[1:]
    med = lambda key: statistics.median(m.get(key, 0.0) for m in steady)  # noqa: E731
    out = {"step_s": med("time/step"), "steps_s": [m["time/step"] for m in history],
           "busy_generate_s": statistics.median(m["time/generate"] + m["time/reward_wait"] for m in steady),
           "busy_train_s": med("time/train"), "busy_sync_s": med("time/sync"),
           "reward_sq": [m.get("reward/sq") for m in history]}
    if "async/step_over_slowest_stage" in steady[0]:
        out["step_over_slowest_stage"] = med("async/step_over_slowest_stage")
        out["staleness_mean"] = med("async/staleness_mean")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--judge-latency", type=float, default=0.5, help="seconds the judge server takes per request")
    ap.add_argument("--steps", type=int, default=5, help="steps per mode (the first is excluded from the medians)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--model", default=None, help="HF directory (default: a tiny random-init model built here)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pipeline_overlap.json"))
    a = ap.parse_args(argv)
    if a.steps < 2:
        ap.error("--steps must be >= 2 (step 1 is excluded)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    import yaml
    from fake_judge_server import FakeJudgeServer
    from judge_helpers import TEST_KEY, TEST_KEY_ENV, fast_config

    from rlsys import cluster
    from rlsys.atomic import write_file
    from rlsys.config import ClusterConfig
    from rlsys.data.polaris import write_polaris_dataset
    from rlsys.models import build_tiny_model

    root = Path(tempfile.mkdtemp(prefix="rlsys-pipeline-overlap-"))
    os.environ[TEST_KEY_ENV] = TEST_KEY   # a test key for the local server; the raylet passes it on
    srv = FakeJudgeServer(latency_s=a.judge_latency).start()
    judge = root / "judge.yaml"
    judge.write_text(yaml.safe_dump(fast_config(
        srv.base_url, name="bench", api_key_env=TEST_KEY_ENV, timeout_s=a.judge_latency + 10.0,
        workers={"min_workers": 1, "max_workers": 1, "num_cpus": 0.25}).model_dump(mode="json")))
    model_dir = a.model or build_tiny_model(root / "model", seed=0)
    data = write_polaris_dataset(root / "data", n=4 * a.prompts * a.steps, seed=0, fmt="jsonl")["train"]
    cluster.connect(ClusterConfig(num_cpus=8, object_store_gib=0.5))
    try:
        results = {"sync": _summary(_run(0, a, root, model_dir, data, judge)),
                   "async": _summary(_run(1, a, root, model_dir, data, judge))}
    finally:
        cluster.shutdown()
        srv.stop()
    results["speedup_sync_over_async"] = results["sync"]["step_s"] / results["async"]["step_s"]

    print(f"\npipeline overlap: judge latency {a.judge_latency}s, {a.prompts} prompts x G={a.group_size}, "
          f"{a.new_tokens} new tokens, {a.steps} steps per mode (medians without step 1)")
    print(f"{'mode':<6} {'step s':>7} {'gen+score s':>12} {'train s':>8} {'sync s':>7} {'step/slowest':>13}")
    for mode in ("sync", "async"):
        r = results[mode]
        ratio = f"{r['step_over_slowest_stage']:.2f}" if "step_over_slowest_stage" in r else "-"
        print(f"{mode:<6} {r['step_s']:>7.2f} {r['busy_generate_s']:>12.2f} {r['busy_train_s']:>8.2f} "
              f"{r['busy_sync_s']:>7.2f} {ratio:>13}")
    print(f"step-time ratio sync/async: {results['speedup_sync_over_async']:.2f}")
    out = {"args": vars(a), "machine": machine_info(), "results": results}
    write_file(Path(a.out), json.dumps(out, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
