"""Judge pool throughput against a rate-limited, fault-injecting judge server.

The server (tests/judge/fake_judge_server.py) accepts at most R requests/s, counted in a strict
sliding window of ``--window`` seconds; each request spends a random 0..``--transit-jitter`` s
"in transit" before it arrives (and is counted), and ``--fault-pct`` % of requests get each fault
kind (429, 500, slow reply past the timeout, dropped connection, non-JSON body, unparseable
score). Scenarios, side by side in one run:

* ``cli-*``: ``rlsys judge score`` as a user runs it (a subprocess, local backend, defaults),
  fault-free and with faults;
* ``scorer-*``: ``JudgeScorer.score_items`` as a reward actor calls it in training, in-process
  and with 2 Ray judge workers.

Reported per scenario:

* ``share_of_R``: sustained scored-stories rate / R (goal >= 0.95 fault-free). Measured at the
  server over the saturated stretch -- whole waves of R * window arrivals, from the second wave
  to the last first attempt -- so neither the initial burst nor the retry tail distorts it.
  Every faulty request uses up a request slot, so with f % faulty requests the best possible
  share is ~(1 - f).
* ``requests_share_of_R``: requests of any outcome arriving per second / R over the same stretch:
  how much of the server's allowance the pool uses (the limiter's ceiling is
  ``window / (window + latency + margin)``).
* ``refused`` (goal 0): requests the server refused because they arrived above its limit, and
  the worst count in any window.
* ``lost`` (goal 0): stories that ended neither scored nor masked with a reason.
* ``load_avg``: the host's 1-minute load average before the scenario (the machine may be shared).

Run: ``.venv/bin/python benchmarks/judge_throughput.py`` (about 1.5 minutes); writes
benchmarks/results/judge_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "judge")]

from fake_judge_server import FakeJudgeServer, max_in_window  # noqa: E402

from rlsys.atomic import write_file  # noqa: E402
from rlsys.judge.config import judge_config_from_dict  # noqa: E402
from rlsys.judge.pool import JudgeScorer  # noqa: E402

FAULTS = ("429", "500", "slow", "drop", "nonjson", "badscore")  # one kind each: 429, 5xx, timeout, conn, body, parse
CLI_TIMEOUT_S = 600.0


def _serve(conn: Any, kwargs: dict[str, Any]) -> None:
    """Child process: run the judge server until told to stop, then send back what it saw."""
    srv = FakeJudgeServer(**kwargs).start()
    conn.send(srv.base_url)
    try:
        if not conn.poll(CLI_TIMEOUT_S + 120):
            print("judge bench server: no stop message; stopping anyway", file=sys.stderr)
        else:
            conn.recv()
    finally:
        srv.stop()
        conn.send({"arrivals": srv.arrivals, "story_arrivals": srv.story_arrivals,
                   "over_limit": srv.over_limit, "max_in_flight": srv.max_in_flight})


class ServerProcess:
    """The fake judge in its own process, as a real judge is: it does not share the client's
    interpreter lock, so a busy client cannot make it read requests late (and vice versa)."""

    def __init__(self, **kwargs: Any) -> None:
        ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold Ray threads
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, kwargs), daemon=True)
        self._proc.start()
        if not self._conn.poll(120):
            self._proc.kill()
            raise RuntimeError("judge bench server did not start within 120 s")
        self.base_url: str = self._conn.recv()

    def stop(self) -> SimpleNamespace:
        self._conn.send("stop")
        if not self._conn.poll(120):
            self._proc.kill()
            raise RuntimeError("judge bench server did not report within 120 s")
        stats = SimpleNamespace(**self._conn.recv())
        self._proc.join(timeout=30)
        return stats


def _config(url: str, a: argparse.Namespace, name: str, workers: int) -> dict[str, Any]:
    return {
        "name": name, "base_url": url, "model": "fake-judge",
        "requests_per_minute": a.rate * 60, "rate_window_s": a.window, "window_margin_s": a.margin,
        "max_concurrency": 16, "timeout_s": 1.0, "max_output_tokens": 256,
        "retry": {"max_attempts": 5, "parse_retries": 3, "backoff_base_s": 0.05, "backoff_max_s": 0.5},
        # At ~16 % transport faults (4 % each of 500, timeout, drop, non-JSON) a chance streak of
        # 5 failures (the default threshold) opens the breaker for its 30 s reset in a few % of
        # runs; the breaker is for dead endpoints, which this one is not.
        "circuit_breaker": {"failure_threshold": 10, "reset_after_s": 2.0},
        "workers": {"min_workers": workers, "max_workers": workers, "chunk_size": 8, "target_backlog_per_worker": 64},
    }


def _steady_rate(srv: SimpleNamespace, limit: int) -> tuple[float, float, float]:
    """(scored stories per second, requests per second, seconds measured) over the saturated
    stretch.

    A sliding-window limiter lets ``limit`` requests through at once, then one more each time an
    earlier one leaves the window, so arrivals come in waves of ``limit``. We measure from the
    first arrival of the second wave over a whole number of waves, up to the last first attempt
    of any story: neither the initial burst nor the retry tail counts, and no wave is cut.
    """
    t = srv.arrivals  # every request, refused ones included: each takes a slot
    last_first_try = max(arr[0][0] for arr in srv.story_arrivals.values())
    usable = sum(1 for x in t if x <= last_first_try) - 1 - limit
    m = max(limit, usable // limit * limit)
    a, b = t[limit], t[min(len(t) - 1, limit + m)]
    ok = sum(1 for arr in srv.story_arrivals.values() for x, mode in arr if mode == "ok" and a <= x < b)
    return ok / (b - a), m / (b - a), b - a


def _stories(a: argparse.Namespace) -> list[dict[str, str]]:
    return [{"prompt": f"Write a story about harbour {i}. Approximately 2000 words long.",
             "story": f"Story {i}: the tide came in over harbour {i} and the bells rang {i % 7} times."}
            for i in range(int(a.rate * a.seconds))]


def _run_cli(cfg: dict[str, Any], stories: list[dict[str, str]]) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """``rlsys judge score`` in a subprocess, with its default settings, as a user would run it."""
    tmp = Path(tempfile.mkdtemp(prefix="judge_bench_"))
    try:
        (tmp / "judge.yaml").write_text(json.dumps(cfg))  # JSON is YAML
        (tmp / "in.jsonl").write_text("".join(json.dumps({"id": f"s{i}", **s}) + "\n" for i, s in enumerate(stories)))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run([sys.executable, "-m", "rlsys.judge.cli", "score", str(tmp / "judge.yaml"),
                               "--input", str(tmp / "in.jsonl"), "--output", str(tmp / "out.jsonl"), "--no-progress"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
        if proc.returncode != 0:
            raise RuntimeError(f"rlsys judge score exited {proc.returncode}: {proc.stderr[-2000:]}")
        rows = [json.loads(x) for x in (tmp / "out.jsonl").read_text().splitlines()]
        summary = json.loads(proc.stderr.strip().splitlines()[-1])["judge_summary"]
        return [{"masked": r["masked"], "reason": r.get("reason")} for r in rows], summary
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_scenario(name: str, a: argparse.Namespace, fault_pct: float, path: str, backend: str, workers: int) -> dict:
    server = ServerProcess(rate_limit=a.rate * a.window, rate_window_s=a.window, latency_s=a.latency,
                           fault_rates={k: fault_pct / 100 for k in FAULTS}, seed=1, retry_after="1",
                           retry_after_ms="200", slow_s=3.0, transit_jitter_s=a.transit_jitter)
    stories = _stories(a)
    cfg = _config(server.base_url, a, f"bench-{name}", workers)
    load = os.getloadavg()[0]
    try:
        t0 = time.monotonic()
        if path == "cli":
            res, summary = _run_cli(cfg, stories)
        else:
            with JudgeScorer(judge_config_from_dict(cfg), backend=backend, namespace=f"bench-{name}") as scorer:
                res = scorer.score_items(stories)
                summary = scorer.metrics_summary()
        elapsed = time.monotonic() - t0
    finally:
        srv = server.stop()
    rate, req_rate, measured = _steady_rate(srv, int(a.rate * a.window))
    faulty = sum(1 for arr in srv.story_arrivals.values() for _, m in arr if m not in ("ok", "over_limit"))
    fault_share = faulty / len(srv.arrivals)
    scored = sum(not r["masked"] for r in res)
    masked = [r for r in res if r["masked"]]
    return {
        "scenario": name, "path": path, "backend": backend, "workers": workers, "fault_pct_each_kind": fault_pct,
        "stories": len(stories), "scored": scored, "masked": len(masked),
        "lost": len(stories) - scored - sum(1 for r in masked if r["reason"]),
        "masked_reasons": sorted({r["reason"] for r in masked}),
        "elapsed_s": round(elapsed, 2), "end_to_end_rate": round(scored / elapsed, 2),
        "steady_rate": round(rate, 2), "steady_seconds": round(measured, 1),
        "share_of_R": round(rate / a.rate, 3),
        "faulty_request_share": round(fault_share, 3),
        "requests_share_of_R": round(req_rate / a.rate, 3),
        "refused": srv.over_limit, "limit_per_window": a.rate * a.window,
        "max_in_any_window": max_in_window(srv.arrivals, a.window), "max_in_flight": srv.max_in_flight,
        "load_avg": round(load, 2), "circuit_opens": int(summary.get("circuit_opens", 0)),
        "judge_metrics": summary,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rate", type=int, default=40, help="server limit R, requests per second")
    p.add_argument("--window", type=float, default=5.0, help="server/limiter window, seconds")
    p.add_argument("--margin", type=float, default=0.0, help="limiter window margin (window_margin_s), seconds")
    p.add_argument("--seconds", type=float, default=15.0, help="stories = R * seconds per scenario")
    p.add_argument("--latency", type=float, default=0.05, help="server reply latency, seconds")
    p.add_argument("--transit-jitter", type=float, default=0.1, help="random request transit delay, up to this, seconds")
    p.add_argument("--fault-pct", type=float, default=4.0, help="percent of requests per fault kind")
    p.add_argument("--no-ray", action="store_true", help="skip the Ray scenario")
    p.add_argument("--only", nargs="*", help="run only these scenarios")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "judge_throughput.json"))
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    plan = [("cli-clean", 0.0, "cli", "local", 1), ("cli-faults", a.fault_pct, "cli", "local", 1),
            ("scorer-faults-local", a.fault_pct, "scorer", "local", 1)]
    if not a.no_ray:
        plan.append(("scorer-faults-ray-2workers", a.fault_pct, "scorer", "ray", 2))
    if a.only:
        plan = [x for x in plan if x[0] in a.only]
    rows = []
    ray_tmp = f"/tmp/ray_judge_bench_{os.getpid()}"  # own Ray, removed afterwards
    for name, pct, path, backend, workers in plan:
        if backend == "ray":
            import ray

            ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                     _temp_dir=ray_tmp, object_store_memory=200 * 1024 * 1024)
        try:
            rows.append(run_scenario(name, a, pct, path, backend, workers))
        finally:
            if backend == "ray":
                ray.shutdown()
                shutil.rmtree(ray_tmp, ignore_errors=True)
    keys = ["share_of_R", "requests_share_of_R", "faulty_request_share", "refused", "max_in_any_window",
            "lost", "masked", "scored", "steady_rate", "end_to_end_rate", "elapsed_s", "load_avg", "circuit_opens"]
    print(f"R = {a.rate}/s, window {a.window}s (+{a.margin}s margin), transit jitter <= {a.transit_jitter}s, "
          f"{a.fault_pct}% of each fault kind {FAULTS}")
    print(f"{'':30}" + "".join(f"{r['scenario']:>28}" for r in rows))
    for k in keys:
        print(f"{k:30}" + "".join(f"{r[k]:>28}" for r in rows))
    out = {"args": vars(a), "host": platform.node(), "cpus": os.cpu_count(), "scenarios": rows,
           "goals": {"share_of_R (fault-free)": ">= 0.95", "refused": 0, "lost": 0}}
    write_file(a.out, json.dumps(out, indent=2) + "\n")  # atomic: a kill leaves the last result whole
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
