"""Autoscaling pool of ``JudgeWorker`` actors, driven from the scorer's event loop.

Scaling rule: ``desired = clamp(ceil(backlog / target_backlog_per_worker), min, max)``, where
backlog = samples queued + in flight. Scale-up is immediate; a worker above ``min_workers`` is
removed after ``scale_down_idle_s`` without work (idle workers only, so no metrics are lost).
Workers request ``num_cpus`` and ``resources`` from the config; with the ``judge_node`` resource
of cluster/judge_workers.yaml, pending workers make the Ray autoscaler add judge nodes.

A chunk whose worker dies is resubmitted to another worker (``max_resubmits``), then masked.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError

from rewards.judge_rubric import Rubric
from rlsys.judge.client import JudgeFatalError
from rlsys.judge.config import JudgeConfig
from rlsys.judge.limiter import get_cluster_limiter
from rlsys.judge.metrics import JudgeMetrics

log = logging.getLogger(__name__)


@dataclass
class _Worker:
    handle: Any
    in_flight: int = 0
    idle_since: float = field(default_factory=time.monotonic)


class JudgeActorPool:
    """Owns the workers and the cluster limiter handle; ``score_many`` runs on one event loop."""

    def __init__(self, cfg: JudgeConfig, rubric: Rubric, metrics: JudgeMetrics, namespace: str = "rlsys") -> None:
        from actors.judge_worker import JudgeWorker  # imports Ray; only needed for this backend

        self.cfg, self.rubric, self.metrics = cfg, rubric, metrics
        self._cls = JudgeWorker
        self.limiter = get_cluster_limiter(cfg, namespace)
        self.workers: list[_Worker] = []
        self.peak_workers = 0
        self._spawn(cfg.workers.min_workers)
        # Surface start-up failures (e.g. the key missing on a worker node) now, not mid-run.
        ray.get([w.handle.ready.remote() for w in self.workers])

    @property
    def per_worker(self) -> int:
        """Chunks one worker may hold at once (= target backlog per worker, in chunks)."""
        w = self.cfg.workers
        return max(1, math.ceil(w.target_backlog_per_worker / w.chunk_size))

    def _spawn(self, n: int) -> None:
        w = self.cfg.workers
        for _ in range(n):
            handle = self._cls.options(num_cpus=w.num_cpus, resources=w.resources or None).remote(
                self.cfg.model_dump(), self.limiter, self.rubric)
            self.workers.append(_Worker(handle))
        self.peak_workers = max(self.peak_workers, len(self.workers))
        if n:
            log.info("judge %s: %d workers", self.cfg.name, len(self.workers))

    def autoscale(self, backlog: int, now: float) -> None:
        w = self.cfg.workers
        desired = min(w.max_workers, max(w.min_workers, math.ceil(backlog / w.target_backlog_per_worker)))
        if desired > len(self.workers):
            self._spawn(desired - len(self.workers))
            return
        for wk in list(self.workers):
            if len(self.workers) <= max(desired, w.min_workers):
                break
            if wk.in_flight == 0 and now - wk.idle_since >= w.scale_down_idle_s:
                self.workers.remove(wk)
                ray.kill(wk.handle)

    async def score_many(self, items: list[tuple[str, str]]) -> list[dict[str, Any]]:
        size = self.cfg.workers.chunk_size
        results: list[dict[str, Any] | None] = [None] * len(items)
        queue = deque((list(range(i, min(i + size, len(items)))), 0) for i in range(0, len(items), size))
        running: dict[asyncio.Future, tuple[_Worker, list[int], int, Any]] = {}
        try:
            while queue or running:
                backlog = sum(len(c) for c, _ in queue) + sum(len(v[1]) for v in running.values())
                self.autoscale(backlog, time.monotonic())
                for wk in sorted(self.workers, key=lambda x: x.in_flight):
                    while queue and wk.in_flight < self.per_worker:
                        idx, tries = queue.popleft()
                        ref = wk.handle.score_batch.remote([items[i] for i in idx])
                        running[asyncio.wrap_future(ref.future())] = (wk, idx, tries, ref)
                        wk.in_flight += 1
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    wk, idx, tries, _ = running.pop(fut)
                    wk.in_flight -= 1
                    wk.idle_since = time.monotonic()
                    self._collect(fut, wk, idx, tries, results, queue)
        except BaseException:  # fatal error or cancellation: stop the other chunks' requests
            for fut, (wk, _, _, ref) in running.items():
                fut.cancel()
                wk.in_flight -= 1
                try:
                    ray.cancel(ref)
                except Exception:  # the worker may be gone already
                    pass
            raise
        self.autoscale(0, time.monotonic())
        return [r for r in results if r is not None]

    def _collect(self, fut: asyncio.Future, wk: _Worker, idx: list[int], tries: int,
                 results: list, queue: deque) -> None:
        try:
            outcomes, delta = fut.result()
        except RayActorError:
            log.warning("judge %s: worker died; resubmitting %d samples", self.cfg.name, len(idx))
            if wk in self.workers:
                self.workers.remove(wk)
            self.metrics.inc("worker_restarts")
            if tries < self.cfg.workers.max_resubmits:
                queue.appendleft((idx, tries + 1))
            else:
                for i in idx:
                    results[i] = {"score": None, "overall": None, "reason": "worker_failed"}
                self.metrics.inc("failures", len(idx))
            return
        except JudgeFatalError as e:  # Ray's RayTaskError subclass of the cause's type
            raise JudgeFatalError(str(getattr(e, "cause", e))) from None
        self.metrics.merge(delta)
        for i, out in zip(idx, outcomes):
            results[i] = out

    def close(self, loop: object = None) -> None:
        for wk in self.workers:
            try:
                self.metrics.merge(ray.get(wk.handle.close.remote(), timeout=10))
            except Exception:  # best effort: the worker may already be gone
                pass
            ray.kill(wk.handle)
        self.workers.clear()
