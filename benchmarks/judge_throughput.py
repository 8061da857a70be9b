"""Judge pool throughput against a rate-limited, fault-injecting judge server.

The server (tests/judge/fake_judge_server.py) accepts at most R requests/s, counted in a sliding
window of ``--window`` seconds, and injects a few % of each fault kind. For each scenario, side by
side in one run, we report:

* ``share_of_R``: sustained scored-stories rate / R (goal >= 0.95). Measured at the server over
  the saturated stretch -- from one limiter window after the first arrival to the last
  first-attempt arrival, cut to a whole number of limiter windows -- so neither the initial
  burst nor the retry tail distorts it. Every fault consumes a request slot, so with f % faulty
  requests the best possible share is ~(1 - f); ``share_of_fault_free_capacity`` divides that out.
* ``over_limit`` (goal 0): requests the server saw beyond its limit, and the worst window count.
* ``lost`` (goal 0): stories that ended neither scored nor masked with a reason.

Run: ``.venv/bin/python benchmarks/judge_throughput.py`` (about a minute); writes
benchmarks/results/judge_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "judge")]

from fake_judge_server import FakeJudgeServer, max_in_window  # noqa: E402

from rlsys.judge.config import judge_config_from_dict  # noqa: E402
from rlsys.judge.pool import JudgeScorer  # noqa: E402

FAULTS = ("429", "500", "slow", "drop", "nonjson", "badscore")  # one kind each: 429, 5xx, timeout, conn, body, parse


def _config(url: str, a: argparse.Namespace, workers: int) -> dict:
    return {
        "name": f"bench{workers}", "base_url": url, "model": "fake-judge",
        "requests_per_minute": a.rate * 60, "rate_window_s": a.window, "window_margin_s": a.margin,
        "max_concurrency": 16, "timeout_s": 1.0, "max_output_tokens": 256,
        "retry": {"max_attempts": 5, "parse_retries": 3, "backoff_base_s": 0.05, "backoff_max_s": 0.5},
        "workers": {"min_workers": workers, "max_workers": workers, "chunk_size": 8, "target_backlog_per_worker": 64},
    }


def _steady_rate(srv: FakeJudgeServer, span: float) -> tuple[float, float]:
    """(scored stories per second, seconds measured) over the saturated stretch, in whole windows."""
    first = srv.arrivals[0]
    last_first_try = max(arr[0][0] for arr in srv.story_arrivals.values())
    start = first + span
    n = max(1, math.floor((last_first_try - start) / span))
    end = start + n * span
    ok = sum(1 for arr in srv.story_arrivals.values() for t, m in arr if m == "ok" and start <= t < end)
    return ok / (end - start), end - start


def run_scenario(name: str, a: argparse.Namespace, fault_pct: float, backend: str, workers: int) -> dict:
    srv = FakeJudgeServer(rate_limit=a.rate * a.window, rate_window_s=a.window, latency_s=a.latency,
                          fault_rates={k: fault_pct / 100 for k in FAULTS}, seed=1, retry_after="1",
                          retry_after_ms="200", slow_s=3.0).start()
    stories = [{"prompt": f"Write a story about harbour {i}. Approximately 2000 words long.",
                "story": f"Story {i}: the tide came in over harbour {i} and the bells rang {i % 7} times."}
               for i in range(int(a.rate * a.seconds))]
    cfg = judge_config_from_dict(_config(srv.base_url, a, workers))
    try:
        with JudgeScorer(cfg, backend=backend, namespace=f"bench-{name}") as scorer:
            t0 = time.monotonic()
            res = scorer.score_items(stories)
            elapsed = time.monotonic() - t0
            summary = scorer.metrics_summary()
    finally:
        srv.stop()
    span = a.window + a.margin
    rate, measured = _steady_rate(srv, span)
    faulty = sum(1 for arr in srv.story_arrivals.values() for _, m in arr if m not in ("ok", "over_limit"))
    fault_share = faulty / len(srv.arrivals)
    scored = sum(not r["masked"] for r in res)
    masked = [r for r in res if r["masked"]]
    return {
        "scenario": name, "backend": backend, "workers": workers, "fault_pct_each_kind": fault_pct,
        "stories": len(stories), "scored": scored, "masked": len(masked),
        "lost": len(stories) - scored - sum(1 for r in masked if r["reason"]),
        "masked_reasons": sorted({r["reason"] for r in masked}),
        "elapsed_s": round(elapsed, 2), "end_to_end_rate": round(scored / elapsed, 2),
        "steady_rate": round(rate, 2), "steady_seconds": round(measured, 1),
        "share_of_R": round(rate / a.rate, 3),
        "faulty_request_share": round(fault_share, 3),
        "share_of_fault_free_capacity": round(rate / (a.rate * (1 - fault_share)), 3),
        "limiter_ceiling": round(a.window / span, 3),
        "over_limit": srv.over_limit, "limit_per_window": a.rate * a.window,
        "max_in_any_window": max_in_window(srv.arrivals, a.window), "max_in_flight": srv.max_in_flight,
        "judge_metrics": summary,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rate", type=int, default=40, help="server limit R, requests per second")
    p.add_argument("--window", type=float, default=5.0, help="server/limiter window, seconds")
    p.add_argument("--margin", type=float, default=0.2, help="limiter window margin, seconds")
    p.add_argument("--seconds", type=float, default=22.0, help="stories = R * seconds per scenario")
    p.add_argument("--latency", type=float, default=0.05, help="server reply latency, seconds")
    p.add_argument("--fault-pct", type=float, default=1.0, help="percent of requests per fault kind")
    p.add_argument("--no-ray", action="store_true", help="skip the Ray scenario")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "judge_throughput.json"))
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    plan = [("clean-local", 0.0, "local", 1), ("faults-local", a.fault_pct, "local", 1)]
    if not a.no_ray:
        plan.append(("faults-ray-2workers", a.fault_pct, "ray", 2))
    rows = []
    ray_tmp = f"/tmp/ray_judge_bench_{os.getpid()}"  # own Ray, removed afterwards
    for name, pct, backend, workers in plan:
        if backend == "ray":
            import ray

            ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                     _temp_dir=ray_tmp, object_store_memory=200 * 1024 * 1024)
        try:
            rows.append(run_scenario(name, a, pct, backend, workers))
        finally:
            if backend == "ray":
                ray.shutdown()
                shutil.rmtree(ray_tmp, ignore_errors=True)
    keys = ["share_of_R", "share_of_fault_free_capacity", "limiter_ceiling", "faulty_request_share", "over_limit",
            "max_in_any_window", "lost", "masked", "scored", "steady_rate", "end_to_end_rate", "elapsed_s"]
    print(f"R = {a.rate}/s, window {a.window}s (+{a.margin}s margin), {a.fault_pct}% of each fault kind {FAULTS}")
    print(f"{'':30}" + "".join(f"{r['scenario']:>22}" for r in rows))
    for k in keys:
        print(f"{k:30}" + "".join(f"{r[k]:>22}" for r in rows))
    out = {"args": vars(a), "host": platform.node(), "cpus": os.cpu_count(), "scenarios": rows,
           "goals": {"share_of_R": ">= 0.95", "over_limit": 0, "lost": 0}}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
