"""Request/token/concurrency permits for a judge endpoint, shared by every worker in a cluster.

Why a sliding-window *log* rather than a token bucket: a bucket lets ``capacity + rate * W``
requests through in a window of length W, while a log of grant times enforces "at most L grants
in any window of length W" exactly, which is what "the endpoint never sees more than the
limit" means. The window is lengthened by ``margin_s`` so that jitter between the grant and the
request's arrival at the endpoint cannot squeeze L + 1 arrivals into one server-side window.

``LimiterCore`` is the pure, clock-injected state machine (unit-tested without asyncio);
``LocalLimiter`` wraps it for one event loop; ``RayLimiterActor`` hosts a ``LocalLimiter`` in a
named Ray actor so that all judge workers of the cluster draw from the same budgets, and
``RayLimiterClient`` gives that actor the same async interface as ``LocalLimiter``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Protocol

log = logging.getLogger(__name__)


class PermitTooLarge(ValueError):
    """A single request needs more tokens than one whole window allows: it can never run."""


@dataclass(frozen=True)
class Limits:
    """Budgets per window of ``window_s`` (+ ``margin_s``) and a concurrency cap."""

    requests: int
    tokens: int | None
    concurrency: int
    window_s: float
    margin_s: float = 0.0
    lease_s: float = 600.0  # an unreleased permit (dead worker) frees its concurrency slot after this


@dataclass(frozen=True)
class Permit:
    """Proof of admission; hand it back with ``release``.

    ``granted_wall`` (``time.time()`` at grant, 0 = unknown) lets the holder refuse a permit that
    reached it too late: the margin only absorbs grant-to-send delays shorter than itself.
    """

    id: int
    tokens: int
    granted_wall: float = 0.0


class LimiterCore:
    """Pure limiter state; ``now`` is always passed in so tests control time."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._grants: deque[tuple[float, int]] = deque()  # (time, permit id) in the window
        self._tokens: dict[int, int] = {}  # permit id -> tokens charged (while in the window)
        self._leases: dict[int, float] = {}  # permit id -> lease expiry (while in flight)
        self._paused_until = 0.0
        self._ids = itertools.count(1)

    @property
    def span(self) -> float:
        return self.limits.window_s + self.limits.margin_s

    def _expire(self, now: float) -> None:
        while self._grants and self._grants[0][0] <= now - self.span:
            _, pid = self._grants.popleft()
            self._tokens.pop(pid, None)
        for pid, until in list(self._leases.items()):
            if until <= now:
                del self._leases[pid]

    def try_acquire(self, tokens: int, now: float) -> Permit | float:
        """Grant a permit, or return how many seconds to wait before asking again."""
        lim = self.limits
        if lim.tokens is not None and tokens > lim.tokens:
            raise PermitTooLarge(f"request needs {tokens} tokens, window budget is {lim.tokens}")
        self._expire(now)
        waits = [self._paused_until - now]
        if len(self._grants) >= lim.requests:
            waits.append(self._grants[0][0] + self.span - now)
        if lim.tokens is not None and sum(self._tokens.values()) + tokens > lim.tokens:
            waits.append(self._when_tokens_fit(tokens, now))
        if len(self._leases) >= lim.concurrency:
            waits.append(min(self._leases.values()) - now)
        wait = max(waits)
        if wait > 0:
            return wait
        pid = next(self._ids)
        self._grants.append((now, pid))
        self._tokens[pid] = tokens
        self._leases[pid] = now + lim.lease_s
        return Permit(pid, tokens)

    def _when_tokens_fit(self, tokens: int, now: float) -> float:
        used = sum(self._tokens.values())
        for t, pid in self._grants:
            used -= self._tokens.get(pid, 0)
            if used + tokens <= (self.limits.tokens or 0):
                return t + self.span - now
        return self.span

    def release(self, permit_id: int, actual_tokens: int | None = None, sent: bool = True) -> None:
        """End a permit's concurrency lease; replace its token reservation by actual usage.

        ``sent=False`` refunds the permit entirely (the request was never sent, e.g. the
        circuit breaker opened while the caller waited for the permit)."""
        self._leases.pop(permit_id, None)
        if not sent:
            self._grants = deque(g for g in self._grants if g[1] != permit_id)
            self._tokens.pop(permit_id, None)
        elif actual_tokens is not None and permit_id in self._tokens:
            self._tokens[permit_id] = actual_tokens

    def pause(self, seconds: float, now: float) -> None:
        """Grant nothing for ``seconds`` (e.g. the endpoint answered 429 with Retry-After)."""
        self._paused_until = max(self._paused_until, now + seconds)

    def in_flight(self) -> int:
        return len(self._leases)


class AsyncLimiter(Protocol):
    """Interface shared by the local and the Ray-backed limiter."""

    async def acquire(self, tokens: int) -> Permit: ...
    async def release(self, permit: Permit, actual_tokens: int | None = None, sent: bool = True) -> None: ...
    async def pause(self, seconds: float) -> None: ...


class LocalLimiter:
    """Single-process limiter. Waiters are served in FIFO order (``asyncio.Lock`` is fair)."""

    def __init__(self, limits: Limits, clock=time.monotonic) -> None:
        self.core = LimiterCore(limits)
        self._clock = clock
        self._lock: asyncio.Lock | None = None
        self._wake: asyncio.Event | None = None

    def _prims(self) -> tuple[asyncio.Lock, asyncio.Event]:
        # Created lazily so the limiter can be built outside the loop that will use it.
        if self._lock is None or self._wake is None:
            self._lock, self._wake = asyncio.Lock(), asyncio.Event()
        return self._lock, self._wake

    async def acquire(self, tokens: int) -> Permit:
        lock, wake = self._prims()
        async with lock:
            while True:
                got = self.core.try_acquire(tokens, self._clock())
                if isinstance(got, Permit):
                    return replace(got, granted_wall=time.time())
                wake.clear()
                try:  # a release can end the wait early; otherwise sleep until the next expiry
                    await asyncio.wait_for(wake.wait(), None if math.isinf(got) else got)
                except asyncio.TimeoutError:
                    pass

    async def release(self, permit: Permit, actual_tokens: int | None = None, sent: bool = True) -> None:
        self.core.release(permit.id, actual_tokens, sent)
        self._prims()[1].set()

    async def pause(self, seconds: float) -> None:
        self.core.pause(seconds, self._clock())

    async def stats(self) -> dict[str, float]:
        return {"in_flight": float(self.core.in_flight())}


def limits_for(cfg) -> Limits:  # cfg: JudgeConfig (untyped to keep this module import-light)
    """Translate per-minute config budgets into per-window ``Limits``."""
    scale = cfg.rate_window_s / 60.0
    return Limits(
        requests=max(1, math.floor(cfg.requests_per_minute * scale)),
        tokens=None if cfg.tokens_per_minute is None else max(1, math.floor(cfg.tokens_per_minute * scale)),
        concurrency=cfg.max_concurrency,
        window_s=cfg.rate_window_s,
        margin_s=cfg.window_margin_s,
        lease_s=cfg.timeout_s + 30.0,
    )


# ------------------------------------------------------------------------- cluster-wide (Ray)


class LimiterService:
    """Body of the named Ray actor: one ``LocalLimiter`` that every judge worker calls.

    Defined as a plain class and turned into an actor lazily (``ray.remote``) so that importing
    this module does not import Ray. It runs as an async actor, so thousands of ``acquire`` calls
    can wait concurrently inside it while the FIFO lock serves them in order.
    """

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._inner = LocalLimiter(limits)
        if _was_restarted():
            # The grant log died with the previous instance: wait one full window so the grants
            # it made cannot be repeated on top of themselves.
            self._inner.core.pause(limits.window_s + limits.margin_s, time.monotonic())

    def limits(self) -> Limits:
        return self._limits

    def reconfigure(self, limits: Limits) -> None:
        """Adopt new budgets, keeping the grants already in the window."""
        self._limits = self._inner.core.limits = limits

    async def acquire(self, tokens: int) -> Permit:
        return await self._inner.acquire(tokens)

    async def release(self, permit: Permit, actual_tokens: int | None = None, sent: bool = True) -> None:
        await self._inner.release(permit, actual_tokens, sent)

    async def pause(self, seconds: float) -> None:
        await self._inner.pause(seconds)

    async def stats(self) -> dict[str, float]:
        return await self._inner.stats()


def _was_restarted() -> bool:
    try:
        import ray

        return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # outside an actor (unit tests)
        return False


class RayLimiterClient:
    """``AsyncLimiter`` backed by the named limiter actor (awaits Ray object refs)."""

    def __init__(self, handle) -> None:
        self.handle = handle

    async def acquire(self, tokens: int) -> Permit:
        return await self.handle.acquire.remote(tokens)

    async def release(self, permit: Permit, actual_tokens: int | None = None, sent: bool = True) -> None:
        await self.handle.release.remote(permit, actual_tokens, sent)

    async def pause(self, seconds: float) -> None:
        await self.handle.pause.remote(seconds)


def limiter_actor_name(judge_name: str) -> str:
    return f"rlsys-judge-limiter-{judge_name}"


def get_cluster_limiter(cfg, namespace: str = "rlsys"):
    """Get or create the cluster's single limiter actor for this judge (by name).

    Every driver and worker using the same judge name in the namespace shares one set of budgets
    -- also across jobs (training and a concurrent ``rlsys judge score``), which is why the actor
    is detached: it outlives the job that created it. An existing limiter with other budgets is
    reconfigured to the caller's (the latest config wins; a warning says so) rather than a
    second limiter being made, which would silently double the rate at the endpoint.
    """
    import ray

    limits = limits_for(cfg)
    # Restarted if its node dies; calls in flight are retried (a duplicate acquire only costs a
    # permit that expires with its lease).
    actor_cls = ray.remote(num_cpus=0, max_concurrency=10_000, max_restarts=-1, max_task_retries=3)(LimiterService)
    handle = actor_cls.options(
        name=limiter_actor_name(cfg.name), namespace=namespace, get_if_exists=True, lifetime="detached"
    ).remote(limits)
    existing = ray.get(handle.limits.remote())
    if existing != limits:
        log.warning("judge limiter %s: budgets changed from %s to %s", limiter_actor_name(cfg.name), existing, limits)
        ray.get(handle.reconfigure.remote(limits))
    return handle
