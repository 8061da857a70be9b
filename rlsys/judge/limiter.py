"""Request/token/concurrency permits for a judge endpoint, shared by every worker in a cluster.

Why a sliding-window *log* rather than a token bucket: a bucket lets ``capacity + rate * W``
requests through in a window of length W, while a log enforces "at most L requests in any window
of length W" exactly, which is what "the endpoint never sees more than the limit" means.

Why each request stays in the log from its permit until ``W`` after its response arrived (not
``W`` after the permit): the endpoint counts a request when it *arrives*, which is somewhere
between our permit and our receiving the response -- a request delayed in the permit queue, the
client or the network arrives late. If a request leaves the log only once ``now >= response + W``,
then any request granted afterwards arrives at least ``W`` after it, so no ``L + 1`` arrivals can
share one server-side window, whatever the transit delay. A request we gave up on (timeout,
connection error) has no response to bound its arrival -- a busy endpoint may still take it out
of its queue and count it later -- so it stays ``late_s`` (the request timeout) longer. The price is that a slot is busy for
``W + latency`` rather than ``W``: the throughput ceiling is ``W / (W + latency + margin_s)`` of
the budget (0.99 for 5 s windows and 50 ms replies, more for 60 s windows).
``margin_s`` is extra window length on top, for endpoints that count in some other way.

Permits end with their holder. Every permit is tagged with the holder that asked for it (a judge
worker, ``"<pool id>/<n>"``); when the holder ends, its permits are treated like requests we gave
up on (the concurrency slot is back at once; ``W + late_s`` more in the window, since a request
it sent may still arrive) and its waiting acquires are refused. A holder ends when its pool
closes (``end(<pool id>)``, the run's shutdown path) or when Ray reports its actor dead: every
``CHECK_S`` the limiter pings the actors of the holders with permits out or acquires waiting.
Only a definite death ends a holder -- a slow or silent one is still alive -- so a live slow
request keeps counting. The lease (``lease_s``) stays as the backstop (a holder without a
registered actor, or one Ray cannot reach). An acquire whose caller stopped waiting (deadline,
cancelled story) is abandoned by its request id: cancelled in the limiter if it still waits
there, refused if it has not arrived yet, or -- granted already -- its permit is handed straight
back unused by the caller, which always awaits the reply. (Not ``ray.cancel``: a cancel racing
the grant marks the reply cancelled on the caller's side and the granted permit is lost until
its lease ends.)

``LimiterCore`` is the pure, clock-injected state machine (unit-tested without asyncio);
``LocalLimiter`` wraps it for one event loop; ``LimiterService`` hosts a ``LocalLimiter`` in a
named Ray actor so that all judge workers of the cluster draw from the same budgets, and
``RayLimiterClient`` gives that actor the same async interface as ``LocalLimiter``. A run that
attaches to the limiter with other budgets reconfigures it (the latest config wins; a warning
names the changed fields).

``cap`` lowers the budgets (never above the configured ones) when the endpoint says its limit is
lower (an ``x-ratelimit-limit-*`` header on a 429); ``pause`` stops all grants for a while (the
endpoint says the whole quota is used up until then).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, fields, replace
from typing import Any, Protocol

log = logging.getLogger(__name__)


class PermitTooLarge(ValueError):
    """A single request needs more tokens than one whole window allows: it can never run."""


class HolderGone(RuntimeError):
    """The holder asking for a permit has ended (its pool closed, or its actor died)."""


class AcquireAbandoned(RuntimeError):
    """The caller of this acquire stopped waiting for it (``LimiterService.abandon``)."""


def holder_group(holder: str) -> str:
    """``"<pool id>/<worker>"`` -> ``"<pool id>"``: ending a group ends each of its holders."""
    return holder.split("/", 1)[0]


@dataclass(frozen=True)
class Limits:
    """Budgets per window of ``window_s`` (+ ``margin_s``) and a concurrency cap."""

    requests: int
    tokens: int | None
    concurrency: int
    window_s: float
    margin_s: float = 0.0
    lease_s: float = 600.0  # an unreleased permit without a known holder is assumed over after this
    late_s: float = 0.0  # how long after we gave up on it (no response) a request may still arrive


@dataclass(frozen=True)
class Permit:
    """Proof of admission; hand it back with ``release`` once the response (or failure) is in."""

    id: int
    tokens: int


class LimiterCore:
    """Pure limiter state; ``now`` is always passed in so tests control time.

    Every permit is in the window log from its grant until ``span`` after its release (plus
    ``late_s`` if no response came, or if its holder ended first; after its lease ends if never
    released); while unreleased it also holds a concurrency slot.
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.configured = limits  # ``cap`` never goes above these
        self._open: dict[int, float] = {}  # permit id -> lease expiry, while in flight
        self._holder: dict[int, str] = {}  # open permit id -> its holder (if it named one)
        self._gone: set[str] = set()  # holders and holder groups that have ended
        self._closed: list[tuple[float, int]] = []  # heap of (leaves the window at, permit id)
        self._tokens: dict[int, int] = {}  # permit id -> tokens charged, for every permit in the window
        self._used = 0  # sum of _tokens
        self._paused_until = 0.0
        self._ids = itertools.count(1)

    @property
    def span(self) -> float:
        return self.limits.window_s + self.limits.margin_s

    def _charge(self, pid: int, tokens: int) -> None:
        self._used += tokens - self._tokens.get(pid, 0)
        self._tokens[pid] = tokens

    def _forget(self, pid: int) -> None:
        self._used -= self._tokens.pop(pid, 0)

    def _expire(self, now: float) -> None:
        for pid, until in list(self._open.items()):
            if until <= now:  # holder never reported back: assume the request is over
                del self._open[pid]
                self._holder.pop(pid, None)
                heapq.heappush(self._closed, (until + self.span + self.limits.late_s, pid))
        while self._closed and self._closed[0][0] <= now:
            _, pid = heapq.heappop(self._closed)
            self._forget(pid)

    def _kth_end(self, k: int) -> float:
        """When the (k+1)-th permit to leave the window leaves it (open ones: at lease end + span).
        Only the k+1 soonest closed ones can matter, so a full 60 s log is not sorted per call."""
        soonest = heapq.nsmallest(k + 1, self._closed) if k else self._closed[:1]
        late = self.span + self.limits.late_s
        ends = sorted([end for end, _ in soonest] + [until + late for until in self._open.values()])
        return ends[k]

    def try_acquire(self, tokens: int, now: float, holder: str | None = None) -> Permit | float:
        """Grant a permit (tagged with ``holder``), or return how many seconds to wait before
        asking again (a release may end the wait sooner). Raises ``HolderGone`` for an ended
        holder."""
        lim = self.limits
        if lim.tokens is not None and tokens > lim.tokens:
            raise PermitTooLarge(f"request needs {tokens} tokens, window budget is {lim.tokens}")
        if holder is not None and self.is_gone(holder):
            raise HolderGone(holder)
        self._expire(now)
        waits = [self._paused_until - now]
        in_window = len(self._open) + len(self._closed)
        if in_window >= lim.requests:
            waits.append(self._kth_end(in_window - lim.requests) - now)
        if lim.tokens is not None and self._used + tokens > lim.tokens:
            waits.append(self._when_tokens_fit(tokens, now))
        if len(self._open) >= lim.concurrency:
            waits.append(min(self._open.values()) - now)
        wait = max(waits)
        if wait > 0:
            return wait
        pid = next(self._ids)
        self._open[pid] = now + lim.lease_s
        if holder is not None:
            self._holder[pid] = holder
        self._charge(pid, tokens)
        return Permit(pid, tokens)

    def _when_tokens_fit(self, tokens: int, now: float) -> float:
        ends = sorted([(end, pid) for end, pid in self._closed]
                      + [(until + self.span + self.limits.late_s, pid) for pid, until in self._open.items()])
        used = self._used
        for end, pid in ends:
            used -= self._tokens.get(pid, 0)
            if used + tokens <= (self.limits.tokens or 0):
                return end - now
        return self.span

    def release(self, permit_id: int, actual_tokens: int | None = None, sent: bool = True,
                answered: bool = True, *, now: float) -> None:
        """The response (or the failure) is in: the permit stays in the window until
        ``now + span`` (``+ late_s`` if not ``answered``: a timeout or connection error, after
        which the request may still reach the endpoint); its token reservation is replaced by
        actual usage.

        ``sent=False`` refunds the permit entirely (the request was never sent, e.g. the
        circuit breaker opened while the caller waited for the permit)."""
        if self._open.pop(permit_id, None) is None:
            return  # unknown, expired or reclaimed: it is accounted for already
        self._holder.pop(permit_id, None)
        if not sent:
            self._forget(permit_id)
            return
        if actual_tokens is not None:
            self._charge(permit_id, actual_tokens)
        heapq.heappush(self._closed, (now + self.span + (0.0 if answered else self.limits.late_s), permit_id))

    def is_gone(self, holder: str) -> bool:
        return holder in self._gone or holder_group(holder) in self._gone

    def end_holder(self, holder: str, now: float) -> int:
        """``holder`` (or, given a pool id, each of its holders) has ended: its open permits are
        released as unanswered (a request it sent may still arrive: ``span + late_s`` more in
        the window) and its later acquires are refused. Returns how many permits it held."""
        self._gone.add(holder)
        mine = [pid for pid, h in self._holder.items() if h == holder or holder_group(h) == holder]
        for pid in mine:
            self.release(pid, answered=False, now=now)
        return len(mine)

    def holders(self) -> set[str]:
        """Holders with permits out."""
        return set(self._holder.values())

    def pause(self, seconds: float, now: float) -> None:
        """Grant nothing for ``seconds`` (the endpoint says its whole quota is used up)."""
        self._paused_until = max(self._paused_until, now + seconds)

    def cap(self, requests: int | None = None, tokens: int | None = None) -> bool:
        """Lower the per-window budgets to what the endpoint says it allows (never above the
        configured ones, never below 1). True if anything changed."""
        lim, conf = self.limits, self.configured
        new = lim
        if requests is not None:
            new = replace(new, requests=max(1, min(conf.requests, requests)))
        if tokens is not None:
            new = replace(new, tokens=max(1, tokens if conf.tokens is None else min(conf.tokens, tokens)))
        if new == lim:
            return False
        self.limits = new
        return True

    def reconfigure(self, limits: Limits) -> None:
        """Adopt new configured budgets, keeping the permits already in the window."""
        self.limits = self.configured = limits

    def in_flight(self) -> int:
        return len(self._open)


class AsyncLimiter(Protocol):
    """Interface shared by the local and the Ray-backed limiter."""

    async def acquire(self, tokens: int) -> Permit: ...
    async def release(self, permit: Permit, actual_tokens: int | None = None, sent: bool = True,
                      answered: bool = True) -> None: ...
    async def pause(self, seconds: float) -> None: ...
    async def cap(self, requests_per_minute: float | None, tokens_per_minute: float | None) -> None: ...


class LocalLimiter:
    """Single-process limiter. Waiters are served in FIFO order (``asyncio.Lock`` is fair)."""

    def __init__(self, limits: Limits, clock=time.monotonic) -> None:
        self.core = LimiterCore(limits)
        self._clock = clock
        self._lock: asyncio.Lock | None = None
        self._wake: asyncio.Event | None = None
        self._waiting: Counter[str] = Counter()  # holder -> its acquires waiting

    def _prims(self) -> tuple[asyncio.Lock, asyncio.Event]:
        # Created lazily so the limiter can be built outside the loop that will use it.
        if self._lock is None or self._wake is None:
            self._lock, self._wake = asyncio.Lock(), asyncio.Event()
        return self._lock, self._wake

    async def acquire(self, tokens: int, holder: str | None = None) -> Permit:
        lock, wake = self._prims()
        if holder is not None:
            self._waiting[holder] += 1
        try:
            async with lock:
                while True:
                    got = self.core.try_acquire(tokens, self._clock(), holder)
                    if isinstance(got, Permit):
                        return got
                    wake.clear()
                    try:  # a release can end the wait early; otherwise sleep until the next expiry
                        await asyncio.wait_for(wake.wait(), got)
                    except asyncio.TimeoutError:
                        pass  # the wait ran its course: ask again
        finally:
            if holder is not None:
                self._waiting[holder] -= 1
                if not self._waiting[holder]:
                    del self._waiting[holder]

    async def release(self, permit: Permit, actual_tokens: int | None = None, sent: bool = True,
                      answered: bool = True) -> None:
        self.core.release(permit.id, actual_tokens, sent, answered, now=self._clock())
        self._prims()[1].set()

    async def pause(self, seconds: float) -> None:
        self.core.pause(seconds, self._clock())

    def end(self, holder: str) -> int:
        """``holder`` (or every holder of a group) has ended: see ``LimiterCore.end_holder``;
        its waiting acquires raise ``HolderGone``."""
        n = self.core.end_holder(holder, self._clock())
        self._prims()[1].set()
        return n

    def busy_holders(self) -> set[str]:
        """Holders with permits out or acquires waiting."""
        return self.core.holders() | set(self._waiting)

    async def cap(self, requests_per_minute: float | None, tokens_per_minute: float | None) -> None:
        """Lower the budgets to the endpoint's own per-minute limits (never above the config)."""
        scale = self.core.limits.window_s / 60.0
        req = None if requests_per_minute is None else math.floor(requests_per_minute * scale)
        tok = None if tokens_per_minute is None else math.floor(tokens_per_minute * scale)
        if self.core.cap(req, tok):
            lim = self.core.limits
            log.warning("judge limiter: the endpoint reports lower limits; now %d requests and %s tokens per %.3g s",
                        lim.requests, lim.tokens, lim.window_s)

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
        late_s=cfg.timeout_s,
    )


# ------------------------------------------------------------------------- cluster-wide (Ray)

ABANDONED_MEMORY_S = 300.0  # how long an abandon that found no acquire waits for it to arrive
CHECK_S = 0.5  # how often the limiter checks that the holders with permits out are alive
PING_TIMEOUT_S = 30.0  # a holder that has not answered by then is taken as alive (and asked again)
SWEEP_S = 60.0  # how often idle registered holders are checked too (to forget dead ones)


class LimiterService:
    """Body of the named Ray actor: one ``LocalLimiter`` that every judge worker calls.

    Defined as a plain class and turned into an actor lazily (``ray.remote``) so that importing
    this module does not import Ray. It runs as an async actor, so thousands of ``acquire`` calls
    can wait concurrently inside it while the FIFO lock serves them in order. Holders registered
    with their actor (``register``) are pinged while they have permits out or acquires waiting;
    one that Ray reports dead ends (``end``), and its permits come back.
    """

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._inner = LocalLimiter(limits)
        self._actors: dict[str, Any] = {}  # holder -> its actor (has a cheap ``ready()``)
        self._pings: dict[str, asyncio.Task] = {}  # holder -> its liveness check in progress
        self._watcher: asyncio.Task | None = None
        self._acquiring: dict[str, asyncio.Task] = {}  # request id -> its acquire waiting here
        self._abandoned: dict[str, float] = {}  # request id -> when abandoned before it arrived
        if _was_restarted():
            # The log died with the previous instance: wait one full window so the requests it
            # let through cannot be repeated on top of themselves.
            self._inner.core.pause(limits.window_s + limits.margin_s, time.monotonic())

    def limits(self) -> Limits:
        return self._limits

    def reconfigure(self, limits: Limits) -> None:
        """Adopt new budgets, keeping the permits already in the window."""
        self._limits = limits
        self._inner.core.reconfigure(limits)

    async def acquire(self, tokens: int, holder: str | None = None, request: str | None = None) -> Permit:
        """A permit; ``request`` (unique per call) lets the caller ``abandon`` the wait."""
        if request is None:
            return await self._inner.acquire(tokens, holder)
        if self._abandoned.pop(request, None) is not None:
            raise AcquireAbandoned(request)
        waiting = asyncio.get_running_loop().create_task(self._inner.acquire(tokens, holder))
        self._acquiring[request] = waiting
        try:
            return await waiting
        except asyncio.CancelledError:
            if waiting.cancelled() and request not in self._acquiring:  # abandoned, not shut down
                raise AcquireAbandoned(request) from None
            raise
        finally:
            self._acquiring.pop(request, None)

    async def abandon(self, request: str) -> None:
        """The caller of acquire ``request`` stopped waiting: cancel it here, or refuse it when it
        arrives. One granted already is the caller's to hand back (it awaits the reply)."""
        waiting = self._acquiring.pop(request, None)
        if waiting is not None:
            waiting.cancel()
            return
        now = time.monotonic()
        for rid in [r for r, t in self._abandoned.items() if now - t > ABANDONED_MEMORY_S]:
            del self._abandoned[rid]  # answered before the abandon arrived: nothing will come
        self._abandoned[request] = now

    async def release(self, permit: Permit, actual_tokens: int | None = None, sent: bool = True,
                      answered: bool = True) -> None:
        await self._inner.release(permit, actual_tokens, sent, answered)

    async def register(self, holder: str, actor: Any) -> None:
        """Tie ``holder`` to ``actor``: when Ray reports the actor dead, the holder ends."""
        if self._inner.core.is_gone(holder):
            return
        self._actors[holder] = actor
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def end(self, holder: str) -> int:
        """``holder`` -- or, given a pool id, every holder of that pool -- has ended: its permits
        come back now (``LimiterCore.end_holder``). Returns how many it held."""
        for h in [h for h in self._actors if h == holder or holder_group(h) == holder]:
            del self._actors[h]
        return self._inner.end(holder)

    async def _watch(self) -> None:
        loop, sweep_every, n = asyncio.get_running_loop(), max(1, round(SWEEP_S / CHECK_S)), 0
        while self._actors:
            await asyncio.sleep(CHECK_S)
            n += 1
            due = set(self._actors) if n % sweep_every == 0 else self._inner.busy_holders() & self._actors.keys()
            for holder in due - self._pings.keys():
                self._pings[holder] = loop.create_task(self._ping(holder, self._actors[holder]))

    async def _ping(self, holder: str, actor: Any) -> None:
        from ray.exceptions import ActorDiedError

        try:
            await asyncio.wait_for(asyncio.wrap_future(actor.ready.remote().future()), PING_TIMEOUT_S)
        except ActorDiedError:
            if holder in self._actors:
                n = await self.end(holder)
                if n:
                    log.warning("judge limiter: holder %s died; its %d permits are back", holder, n)
        except Exception as e:  # alive but busy, or unreachable for now: asked again next round
            log.debug("judge limiter: holder %s did not answer (%s)", holder, type(e).__name__)
        finally:
            self._pings.pop(holder, None)

    async def pause(self, seconds: float) -> None:
        await self._inner.pause(seconds)

    async def cap(self, requests_per_minute: float | None, tokens_per_minute: float | None) -> None:
        await self._inner.cap(requests_per_minute, tokens_per_minute)

    async def current_limits(self) -> Limits:
        """The budgets in force now (``limits()`` is the configured ones)."""
        return self._inner.core.limits

    async def stats(self) -> dict[str, float]:
        return await self._inner.stats()


def _was_restarted() -> bool:
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():  # not in an actor; and asking would start a Ray
        return False
    try:
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # outside an actor
        return False


class RayLimiterClient:
    """``AsyncLimiter`` backed by the named limiter actor (awaits Ray object refs); its permits
    are tagged with ``holder`` (see the module docstring)."""

    def __init__(self, handle, holder: str | None = None) -> None:
        self.handle, self.holder = handle, holder
        self._giving_back: set[asyncio.Task] = set()
        self._requests = itertools.count()
        self._prefix = f"{holder or 'anon'}#{uuid.uuid4().hex[:12]}#"

    async def acquire(self, tokens: int) -> Permit:
        request = f"{self._prefix}{next(self._requests)}"
        ref = self.handle.acquire.remote(tokens, self.holder, request)
        try:
            return await ref
        except asyncio.CancelledError:  # we stopped waiting; the limiter has not
            task = asyncio.get_running_loop().create_task(self._give_back(ref, request))
            self._giving_back.add(task)
            task.add_done_callback(self._giving_back.discard)
            raise

    async def _give_back(self, ref, request: str) -> None:
        """Abandon an acquire nobody waits for, or hand its permit back unused if already granted."""
        await self.handle.abandon.remote(request)
        try:
            permit = await ref
        except Exception as e:  # abandoned before a grant (or refused): nothing to give back
            log.debug("judge limiter: abandoned acquire ended without a permit (%s)", type(e).__name__)
            return
        await self.release(permit, sent=False)

    async def release(self, permit: Permit, actual_tokens: int | None = None, sent: bool = True,
                      answered: bool = True) -> None:
        await self.handle.release.remote(permit, actual_tokens, sent, answered)

    async def pause(self, seconds: float) -> None:
        await self.handle.pause.remote(seconds)

    async def cap(self, requests_per_minute: float | None, tokens_per_minute: float | None) -> None:
        await self.handle.cap.remote(requests_per_minute, tokens_per_minute)


def limiter_actor_name(judge_name: str) -> str:
    return f"rlsys-judge-limiter-{judge_name}"


def get_cluster_limiter(cfg, namespace: str = "rlsys"):
    """Get or create the cluster's single limiter actor for this judge (by name).

    Every driver and worker using the same judge name in the namespace shares one set of budgets
    -- also across jobs (training and a concurrent ``rlsys judge score``), which is why the actor
    is detached: it outlives the job that created it (the permits of a run's workers end with
    them, so the next run under the same name starts at once). An existing limiter with other
    budgets is reconfigured to the caller's (the latest config wins, for every job using the
    name; a warning names the changed fields) rather than a second limiter being made, which
    would silently double the rate at the endpoint.
    """
    import ray

    limits = limits_for(cfg)
    # Restarted if its node dies; calls in flight are retried (a duplicate acquire only costs a
    # permit that ends with its holder or its lease).
    actor_cls = ray.remote(num_cpus=0, max_concurrency=10_000, max_restarts=-1, max_task_retries=3)(LimiterService)
    name = limiter_actor_name(cfg.name)
    handle = actor_cls.options(name=name, namespace=namespace, get_if_exists=True, lifetime="detached").remote(limits)
    existing = ray.get(handle.limits.remote())
    if existing != limits:
        changed = ", ".join(f"{f.name} {getattr(existing, f.name)} -> {getattr(limits, f.name)}"
                            for f in fields(Limits) if getattr(existing, f.name) != getattr(limits, f.name))
        log.warning("judge limiter %s: reconfigured to this run's settings (%s); the latest config applies to "
                    "every job using judge name %r", name, changed, cfg.name)
        ray.get(handle.reconfigure.remote(limits))
    return handle
