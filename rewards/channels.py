"""Reward channels: one mechanism for the built-in channels and for the user's own functions.

A *channel* is a named function that scores generated texts:

* ``per="sample"``: ``fn(text, **fields) -> float | None``
* ``per="group"``:  ``fn(texts, **fields) -> list[float | None]`` (one value per text; for
  rewards that compare a group's samples with each other, e.g. diversity)
* ``per="batch"``:  ``fn(batch) -> list[list[...]]`` with ``batch = [(texts, fields), ...]``:
  every group of a scoring call at once (the judge uses it so its workers see the whole backlog)

``fields`` are the example's fields (the data row's columns) that the function's signature
names -- all of them if it takes ``**kwargs`` -- plus the fixed ``kwargs`` of its configuration.
A function may be ``async`` (e.g. calling an HTTP scorer); its calls then run concurrently,
at most ``concurrency`` at a time. A sync function runs on a pool of ``concurrency`` threads.
Each call has a deadline (``timeout_s``).

Model output is untrusted, and so is a user's function: ``None``, ``Masked(reason)``, a
non-number, a non-finite value, an exception or a missed deadline mask that sample, with the
reason, and are counted; scoring never raises into the run. A masked sample's value is NaN and
it is ``valid=False``: it stays out of group statistics and the loss.

Pure asyncio: no Ray, vLLM or HTTP here (``rewards/builtin_channels.py`` registers the built-ins;
``actors/reward.py`` is the Ray shell).
"""
from __future__ import annotations

import asyncio
import functools
import inspect
import math
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

Per = Literal["sample", "group", "batch"]
REASON_CHARS = 300


@dataclass(frozen=True)
class Masked:
    """"No reward for this sample", with why. Returned by channels that know the reason."""
    reason: str


def active_channels(weights: dict[str, float]) -> list[str]:
    """The channels a run computes: those with a non-zero weight, in the weights' order."""
    return [c for c, w in weights.items() if w != 0]


def as_score(value: Any) -> float | Masked:
    """A channel's raw return value for one sample -> a finite float or ``Masked``."""
    if isinstance(value, Masked):
        return value
    if value is None:
        return Masked("returned None")
    try:
        x = float(value)
    except (TypeError, ValueError, OverflowError):
        return Masked(f"returned {_short(value)}, not a number")
    return x if math.isfinite(x) else Masked(f"returned {x!r}")


def _short(value: Any) -> str:
    try:
        text = repr(value)
    except Exception as e:  # a hostile __repr__ must not escape either
        text = f"<{type(value).__name__}: repr failed: {type(e).__name__}>"
    return text[:80]


def error_reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:REASON_CHARS]


def signature_fields(fn: Callable) -> tuple[set[str], set[str], bool]:
    """(required, optional, takes **kwargs) keyword names after the first (text) argument."""
    params = list(inspect.signature(fn).parameters.values())
    first = next((i for i, p in enumerate(params) if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD,
                                                                   p.VAR_POSITIONAL)), None)
    rest = [p for i, p in enumerate(params) if i != first and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    required = {p.name for p in rest if p.default is p.empty}
    optional = {p.name for p in rest if p.default is not p.empty}
    return required, optional, any(p.kind == p.VAR_KEYWORD for p in params)


@dataclass
class Channel:
    """A configured channel: the function and how to call it."""
    name: str
    fn: Callable[..., Any]
    per: Per = "sample"
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Fixed keyword arguments (from the configuration); they win over example fields."""
    timeout_s: float | None = 60.0
    """Deadline of one call; None for none (built-ins whose work is bounded)."""
    concurrency: int = 8
    """Calls in flight at once (async) or worker threads (sync)."""
    inline: bool = False
    """Call a sync function on the event loop itself: for cheap, trusted built-ins only
    (no thread hop, no deadline)."""

    def __post_init__(self) -> None:
        self.is_async = inspect.iscoroutinefunction(self.fn) or inspect.iscoroutinefunction(
            getattr(self.fn, "__call__", None))
        if self.per == "batch":
            self._required, self._optional, self._var_kw = set(), set(), False
        else:
            self._required, self._optional, self._var_kw = signature_fields(self.fn)
        self._pool: ThreadPoolExecutor | None = None
        self._sem: asyncio.Semaphore | None = None

    def missing_fields(self, fields: Sequence[str]) -> list[str]:
        """Required arguments neither in the example's fields nor in `kwargs`."""
        return sorted(self._required - set(fields) - set(self.kwargs))

    def call_kwargs(self, fields: dict[str, Any]) -> dict[str, Any]:
        names = fields.keys() if self._var_kw else (self._required | self._optional)
        return {**{k: fields[k] for k in names if k in fields}, **self.kwargs}

    async def score(self, batch: list[tuple[Sequence[Any], dict[str, Any]]], stats: Counter) -> list[list[float | Masked]]:
        """Scores for every text of every group of `batch`; never raises."""
        if self.per == "batch":
            raw = await self._call(self.fn, batch, {}, stats)
            if not isinstance(raw, Masked) and not (isinstance(raw, (list, tuple)) and len(raw) == len(batch)):
                raw = Masked(f"returned {_short(raw)}, not a list of {len(batch)} groups")
            return [_group_scores(raw if isinstance(raw, Masked) else raw[i], texts)
                    for i, (texts, _) in enumerate(batch)]
        if self.per == "group":
            raws = await asyncio.gather(*(self._call(self.fn, texts, self.call_kwargs(f), stats) for texts, f in batch))
            return [_group_scores(raw, texts) for raw, (texts, _) in zip(raws, batch)]
        flat = [(t, self.call_kwargs(f)) for texts, f in batch for t in texts]
        raws = await asyncio.gather(*(self._call(self.fn, t, kw, stats) for t, kw in flat))
        scores, pos = [], 0
        for texts, _ in batch:
            scores.append([as_score(r) for r in raws[pos:pos + len(texts)]])
            pos += len(texts)
        return scores

    async def _call(self, fn: Callable, first: Any, kwargs: dict[str, Any], stats: Counter) -> Any:
        """One call: its value, or Masked(reason) for an exception or a missed deadline."""
        stats["calls"] += 1
        try:
            if self.inline and not self.is_async:
                value = fn(first, **kwargs)
            else:
                value = await asyncio.wait_for(self._run(fn, first, kwargs), self.timeout_s)
            if inspect.isawaitable(value):  # a sync wrapper around a coroutine function
                value = await asyncio.wait_for(value, self.timeout_s)
            return value
        except asyncio.TimeoutError:
            stats["timeouts"] += 1
            return Masked(f"timed out after {self.timeout_s:g} s")
        except Exception as e:  # the function's own failure: this sample is masked, the run goes on
            stats["errors"] += 1
            return Masked(error_reason(e))

    async def _run(self, fn: Callable, first: Any, kwargs: dict[str, Any]) -> Any:
        if self.is_async:
            if self._sem is None:
                self._sem = asyncio.Semaphore(self.concurrency)
            async with self._sem:
                return await fn(first, **kwargs)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix=f"reward-{self.name}")
        # A call past its deadline keeps its thread until it returns (Python threads cannot be
        # killed); with every thread stuck, later calls miss their deadlines too: masked, counted.
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, first, **kwargs))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _group_scores(raw: Any, texts: Sequence[Any]) -> list[float | Masked]:
    if isinstance(raw, Masked):
        return [raw] * len(texts)
    try:
        values = list(raw)
    except TypeError:
        return [Masked(f"returned {_short(raw)}, not a list of {len(texts)} values")] * len(texts)
    if len(values) != len(texts):
        return [Masked(f"returned {len(values)} values for {len(texts)} samples")] * len(texts)
    return [as_score(v) for v in values]


async def score_channels(channels: Sequence[Channel], groups: list[dict], stats: Counter) -> list[dict[str, list]]:
    """Every channel over every group, concurrently. `groups`: [{"texts", "example"}] ->
    [{channel: [value per text], "valid": [...], "mask_reason": [...]}]; a masked sample's values
    are NaN and its reason is the first channel's (in `channels` order) that masked it, as
    "<channel>: <reason>". `stats` gains reward_time/<ch>_s, reward_masked/<ch>, reward_errors/<ch>,
    reward_timeouts/<ch>."""
    batch = [(list(g["texts"]), dict(g["example"])) for g in groups]

    async def timed(ch: Channel) -> list[list[float | Masked]]:
        t0, own = time.perf_counter(), Counter()
        try:
            return await ch.score(batch, own)
        finally:
            stats[f"reward_time/{ch.name}_s"] += time.perf_counter() - t0
            stats[f"reward_errors/{ch.name}"] += own["errors"]
            stats[f"reward_timeouts/{ch.name}"] += own["timeouts"]

    per_channel = await asyncio.gather(*(timed(ch) for ch in channels))
    out = []
    for gi, (texts, _) in enumerate(batch):
        n = len(texts)
        scored: dict[str, list] = {}
        valid, reasons = [True] * n, [None] * n
        for ch, scores in zip(channels, per_channel):
            row = scores[gi]
            scored[ch.name] = [math.nan if isinstance(s, Masked) else s for s in row]
            for j, s in enumerate(row):
                if isinstance(s, Masked):
                    stats[f"reward_masked/{ch.name}"] += 1
                    if valid[j]:
                        valid[j], reasons[j] = False, f"{ch.name}: {s.reason}"[:REASON_CHARS]
        scored["valid"], scored["mask_reason"] = valid, reasons
        out.append(scored)
    return out


class LoopThread:
    """A private asyncio loop on its own thread, so sync callers (a Ray actor method, a caller
    already inside a loop) can block on coroutines, and async functions that keep clients bound to
    a loop (httpx, aiohttp) see the same loop on every call."""

    def __init__(self, name: str = "rlsys-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro, timeout_s: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


class ChannelScorer:
    """Sync front of `score_channels` for one process: owns the loop and the channels' pools."""

    def __init__(self, channels: Sequence[Channel]) -> None:
        self.channels = list(channels)
        self.stats: Counter = Counter()
        self._loop = LoopThread("reward-channels")

    def score_groups(self, groups: list[dict]) -> list[dict[str, list]]:
        return self._loop.run(score_channels(self.channels, groups, self.stats))

    def pop_metrics(self) -> dict[str, float]:
        """Counters and seconds since the last call, as floats."""
        out = {k: float(v) for k, v in self.stats.items()}
        self.stats = Counter()
        return out

    def close(self) -> None:
        for ch in self.channels:
            ch.close()
        self._loop.close()
