"""Ray actor shell around ``JudgeClient``: one per judge worker, scaled by the driver.

All workers share the cluster's named limiter actor, so N workers together never exceed the
configured RPM/TPM/concurrency; each worker's permits carry its ``holder`` tag, so they come back
when the worker dies or its pool closes. The API key is read from *this process's* environment (the
node's), never shipped through Ray (a runtime_env would store it in the GCS and the dashboard).
"""

from __future__ import annotations

from typing import Any

import ray

from rewards.judge_rubric import POLARIS_RUBRIC, Rubric
from rlsys.judge.client import JudgeClient
from rlsys.judge.config import JudgeConfig
from rlsys.judge.limiter import RayLimiterClient
from rlsys.judge.metrics import JudgeMetrics


@ray.remote(max_restarts=0)
class JudgeWorker:
    """Scores (judge-visible prompt, story) pairs, one call per story, many calls concurrently."""

    def __init__(self, cfg: dict[str, Any], limiter_handle: Any, rubric: Rubric = POLARIS_RUBRIC,
                 holder: str | None = None) -> None:
        self.cfg = JudgeConfig.model_validate(cfg)
        self.metrics = JudgeMetrics(self.cfg.price_input_per_1m, self.cfg.price_output_per_1m)
        self.requests_sent = 0
        # Raises MissingApiKeyError naming the env var if this node lacks the key.
        self.client = JudgeClient(self.cfg, RayLimiterClient(limiter_handle, holder), self.metrics, rubric)

    def ready(self) -> bool:
        """Start-up check for the pool, liveness check for the limiter: keep it cheap."""
        return True

    async def score_one(self, prompt: str, story: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """Score one story (many run concurrently: an async actor); also return the metrics
        recorded since the last call (drained), so nothing is lost when the worker is removed."""
        outcome = await self.client.score(prompt, story)
        delta = self.metrics.drain()
        self.requests_sent += delta["counts"].get("requests", 0)
        return outcome, delta

    def total_requests(self) -> int:
        """Requests this worker has sent (observability; the driver owns the real metrics)."""
        return self.requests_sent

    async def close(self) -> dict[str, Any]:
        await self.client.aclose()
        return self.metrics.drain()
