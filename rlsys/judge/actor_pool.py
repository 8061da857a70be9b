"""Autoscaling pool of ``JudgeWorker`` actors, driven from the scorer's event loop.

Stories go to workers one by one (``JudgeWorker.score_one``), each to the least busy worker with
a free slot (``target_backlog_per_worker`` per worker), and each result comes back on its own: a
worker's slow or retrying story holds back nothing but itself (no chunk barrier). Per-story
calls cost about a millisecond of driver time each, which judge rate limits (tens to hundreds of
requests per second) leave plenty of room for.

Scaling rule: ``desired = clamp(ceil(backlog / target_backlog_per_worker), min, max)``, where
backlog = stories waiting for a slot + in flight. Scale-up is immediate; a worker above
``min_workers`` is removed after ``scale_down_idle_s`` without work (idle workers only, so no
metrics are lost). Workers request ``num_cpus`` and ``resources`` from the config; with the
``judge_node`` resource of cluster/judge_workers.yaml, pending workers make the Ray autoscaler
add judge nodes.

A story whose worker dies is resubmitted to another worker (``max_resubmits``), then masked.

Each worker holds its limiter permits as ``"<pool id>/<n>"``, registered with the limiter: a
worker that dies or is removed gives its permits back, and ``close`` (the run's shutdown path)
gives back every permit of the pool, so the next run under the same judge name starts at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ActorDiedError, RayActorError

from rewards.judge_rubric import Rubric
from rlsys.judge.client import JudgeFatalError
from rlsys.judge.config import JudgeConfig
from rlsys.judge.limiter import get_cluster_limiter
from rlsys.judge.metrics import JudgeMetrics

log = logging.getLogger(__name__)


@dataclass
class _Worker:
    handle: Any
    holder: str  # its permits' tag at the limiter
    in_flight: int = 0
    idle_since: float = field(default_factory=time.monotonic)


class JudgeActorPool:
    """Owns the workers and the cluster limiter handle; ``score_one`` runs on one event loop."""

    def __init__(self, cfg: JudgeConfig, rubric: Rubric, metrics: JudgeMetrics, namespace: str = "rlsys") -> None:
        from actors.judge_worker import JudgeWorker  # imports Ray; only needed for this backend

        self.cfg, self.rubric, self.metrics = cfg, rubric, metrics
        self._cls = JudgeWorker
        self.limiter = get_cluster_limiter(cfg, namespace)
        self.pool_id = uuid.uuid4().hex[:12]
        self._serial = itertools.count()
        self.workers: list[_Worker] = []
        self.peak_workers = 0
        self._active = 0  # stories in score_one: waiting for a slot or in flight
        self._waiters: deque[asyncio.Future] = deque()  # stories waiting for a slot, oldest first
        self._spawn(cfg.workers.min_workers)
        # Surface start-up failures (e.g. the key missing on a worker node) now, not mid-run.
        ray.get([w.handle.ready.remote() for w in self.workers])

    @property
    def per_worker(self) -> int:
        """Stories one worker may hold at once."""
        return self.cfg.workers.target_backlog_per_worker

    def _spawn(self, n: int) -> None:
        w = self.cfg.workers
        for _ in range(n):
            holder = f"{self.pool_id}/{next(self._serial)}"
            handle = self._cls.options(num_cpus=w.num_cpus, resources=w.resources or None).remote(
                self.cfg.model_dump(), self.limiter, self.rubric, holder)
            self.limiter.register.remote(holder, handle)  # its death gives its permits back
            self.workers.append(_Worker(handle, holder))
        self.peak_workers = max(self.peak_workers, len(self.workers))
        if n:
            log.info("judge %s: %d workers", self.cfg.name, len(self.workers))
            self._wake(n * self.per_worker)

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
                self.limiter.end.remote(wk.holder)

    def _wake(self, n: int) -> None:
        """Let up to ``n`` waiting stories look for a slot again (oldest first)."""
        while n > 0 and self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():  # a waiter that timed out or was cancelled is skipped
                fut.set_result(None)
                n -= 1

    async def _take_slot(self, deadline: float) -> _Worker | None:
        """The least busy worker with a free slot (its slot taken), or None at the deadline."""
        while True:
            self.autoscale(self._active, time.monotonic())
            free = [w for w in self.workers if w.in_flight < self.per_worker]
            if free:
                wk = min(free, key=lambda w: w.in_flight)
                wk.in_flight += 1
                return wk
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await asyncio.wait_for(fut, remaining)
            except asyncio.TimeoutError:
                pass  # the loop checks the deadline

    def _free_slot(self, wk: _Worker) -> None:
        wk.in_flight -= 1
        wk.idle_since = time.monotonic()
        self._wake(1)

    async def score_one(self, prompt: str, story: str) -> dict[str, Any]:
        """One story on some worker; resubmitted elsewhere if that worker dies."""
        self._active += 1
        deadline = time.monotonic() + self.cfg.retry.sample_deadline_s
        try:
            for _ in range(self.cfg.workers.max_resubmits + 1):
                wk = await self._take_slot(deadline)
                if wk is None:
                    self.metrics.inc("failures")
                    return {"score": None, "overall": None, "reason": "deadline_exceeded:waiting_for_worker"}
                ref = wk.handle.score_one.remote(prompt, story)
                try:
                    outcome, delta = await asyncio.wrap_future(ref.future())
                except RayActorError as e:
                    if wk in self.workers:
                        log.warning("judge %s: a worker died; resubmitting its stories", self.cfg.name)
                        self.workers.remove(wk)
                        if isinstance(e, ActorDiedError):  # its permits back now, not at the limiter's next check
                            self.limiter.end.remote(wk.holder)
                    self.metrics.inc("worker_restarts")
                    continue
                except JudgeFatalError as e:  # Ray's RayTaskError subclass of the cause's type
                    raise JudgeFatalError(str(getattr(e, "cause", e))) from None
                except asyncio.CancelledError:  # the stream stopped: stop this request too
                    _cancel(ref)
                    raise
                finally:
                    self._free_slot(wk)
                self.metrics.merge(delta)
                return outcome
            self.metrics.inc("failures")
            return {"score": None, "overall": None, "reason": "worker_failed"}
        finally:
            self._active -= 1

    async def settle(self) -> None:
        """A stream ended: scale down what is idle."""
        self.autoscale(self._active, time.monotonic())

    def close(self, loop: object = None) -> None:
        for wk in self.workers:
            try:
                self.metrics.merge(ray.get(wk.handle.close.remote(), timeout=10))
            except Exception as e:  # best effort: the worker may already be gone
                log.warning("judge %s: a worker's last metrics are lost (%s)", self.cfg.name, type(e).__name__)
            ray.kill(wk.handle)
        self.workers.clear()
        try:  # the workers are gone: every permit they held (or waited for) comes back now
            ray.get(self.limiter.end.remote(self.pool_id), timeout=10)
        except Exception as e:  # the limiter still reclaims them once it sees the workers dead
            log.warning("judge %s: could not hand the pool's permits back (%s)", self.cfg.name, type(e).__name__)


def _cancel(ref: Any) -> None:
    try:
        ray.cancel(ref)
    except Exception as e:  # already finished, or its worker is gone: nothing left to stop
        log.debug("judge: cancelling a request failed (%s)", type(e).__name__)
