"""Judge metrics: counters, latency percentiles, tokens and cost.

Workers record into their own ``JudgeMetrics`` and hand back ``drain()`` deltas with every batch;
the driver ``merge``s them, so nothing is lost when a worker is scaled down. Only numbers are
stored -- there is no field where a header, URL or key could end up.
"""

from __future__ import annotations

import math
import threading
from collections import Counter, deque
from typing import Any

# Counter names (documented in docs/JUDGE.md). Unknown names are rejected to catch typos.
COUNTERS = (
    "requests",          # HTTP requests sent (every attempt)
    "responses_ok",      # 2xx replies that parsed into a score
    "http_429",          # rate-limited replies
    "http_5xx",          # server errors
    "http_4xx",          # other client errors (not retried)
    "timeouts",          # requests that ran past timeout_s
    "connection_errors", # connect/read failures without an HTTP status
    "bad_responses",     # 2xx whose body was not a chat-completions JSON
    "parse_failures",    # replies that did not satisfy the rubric schema
    "retries",           # attempts after the first, for any reason
    "circuit_opens",     # times a circuit breaker opened
    "scored",            # samples that ended with a score (cache hits included)
    "masked",            # samples that ended masked (any reason)
    "failures",          # masked because the judge could not be made to answer
    "cache_hits",        # samples answered from the cache (incl. duplicates in a batch)
    "empty_stories",     # samples with nothing after </think>, scored 0 without a call
    "worker_restarts",   # chunks resubmitted because a worker died
    "pool_pauses",       # 429s after which every worker paused (quota exhausted per the headers, or pause_cluster_on_429)
    "tokens_in",
    "tokens_out",
)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); 0.0 for no data."""
    if not values:
        return 0.0
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100.0 * len(s)) - 1))
    return float(s[k])


class JudgeMetrics:
    """Counters plus a bounded reservoir of recent request latencies.

    Thread-safe: while a stream of results is consumed, the scorer's caller thread and its
    event-loop thread record into the same instance."""

    def __init__(self, price_in_per_1m: float = 0.0, price_out_per_1m: float = 0.0,
                 max_latencies: int = 20_000) -> None:
        self.counts: Counter[str] = Counter()
        self.latencies: deque[float] = deque(maxlen=max_latencies)
        self._price = (price_in_per_1m, price_out_per_1m)
        self._lock = threading.Lock()

    def inc(self, name: str, n: int = 1) -> None:
        if name not in COUNTERS:
            raise KeyError(f"unknown judge metric {name!r}")
        with self._lock:
            self.counts[name] += n

    def observe_latency(self, seconds: float) -> None:
        with self._lock:
            self.latencies.append(seconds)

    def drain(self) -> dict[str, Any]:
        """Return everything recorded since the last drain and reset (for worker -> driver)."""
        with self._lock:
            out = {"counts": dict(self.counts), "latencies": list(self.latencies)}
            self.counts.clear()
            self.latencies.clear()
        return out

    def merge(self, delta: dict[str, Any]) -> None:
        counts = {k: int(v) for k, v in delta.get("counts", {}).items()}
        unknown = set(counts) - set(COUNTERS)
        if unknown:
            raise KeyError(f"unknown judge metrics {sorted(unknown)}")
        with self._lock:
            self.counts.update(counts)
            self.latencies.extend(float(x) for x in delta.get("latencies", []))

    def cost_usd(self) -> float:
        p_in, p_out = self._price
        return (self.counts["tokens_in"] * p_in + self.counts["tokens_out"] * p_out) / 1e6

    def summary(self) -> dict[str, float]:
        """Flat ``name -> float`` dict for training logs and the CLI's final report."""
        with self._lock:
            out = {k: float(self.counts[k]) for k in COUNTERS}
            lat = list(self.latencies)
        out["latency_p50_s"] = percentile(lat, 50)
        out["latency_p95_s"] = percentile(lat, 95)
        out["cost_usd"] = self.cost_usd()
        return out
