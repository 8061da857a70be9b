"""``JudgeScorer``: the one entry point training and the CLI use to score stories.

Synchronous from the caller's side; internally a private event-loop thread drives either one
in-process ``JudgeClient`` (``backend="local"``) or the autoscaling Ray actor pool
(``backend="ray"``). For every sample it: extracts the judge-visible prompt/story, answers from
the cache (or from an identical sample earlier in the same call), sends the rest to the judge
once, caches successes, and returns ``{score, masked, reason}``. Masked samples carry a reason and
``score=None`` -- never a substitute value. Which groups keep enough scored samples for GRPO is
decided once, for every channel, by ``rlsys.batching.screen_groups``.

No barriers: stories are sent one by one through a window of at most ``window`` in progress,
and a new one starts as soon as any one finishes, so a story that is retrying (backoff, a
Retry-After, a slow reply) holds back no other. ``score_stream`` hands each result to the caller
as it arrives (the CLI writes it at once); ``score_items`` (training) collects them.
"""

from __future__ import annotations

import asyncio
import logging
import queue
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Sequence

from rewards.channels import LoopThread
from rewards.judge_rubric import POLARIS_RUBRIC, Rubric, judge_visible_prompt, visible_story
from rlsys.judge.cache import JudgeCache, cache_key
from rlsys.judge.client import JudgeClient
from rlsys.judge.config import JudgeConfig
from rlsys.judge.limiter import AsyncLimiter, LocalLimiter, limits_for
from rlsys.judge.metrics import JudgeMetrics

log = logging.getLogger(__name__)

STREAM_WINDOW = 256  # default stories in progress for score_stream (the CLI's --in-flight)
WIND_DOWN_S = 30.0  # how long a finished or abandoned stream may take to cancel its requests
_END = object()  # the drive coroutine's last message on the results queue


class JudgeStalledError(RuntimeError):
    """No result arrived for longer than any story may take: something is stuck, not slow."""


class _LocalBackend:
    def __init__(self, cfg: JudgeConfig, rubric: Rubric, metrics: JudgeMetrics, limiter: AsyncLimiter | None) -> None:
        self.client = JudgeClient(cfg, limiter or LocalLimiter(limits_for(cfg)), metrics, rubric)
        self.workers: list[Any] = [self.client]

    async def score_one(self, prompt: str, story: str) -> dict[str, Any]:
        return await self.client.score(prompt, story)

    async def settle(self) -> None:
        """Nothing to scale down in-process."""

    def close(self, loop: LoopThread) -> None:
        loop.run(self.client.aclose(), WIND_DOWN_S)


class JudgeScorer:
    """Build once per run: ``JudgeScorer(cfg, backend="ray")``; see docs/JUDGE.md.

    One caller thread at a time (training's reward actor and the CLI each have one)."""

    def __init__(self, cfg: JudgeConfig, backend: Literal["local", "ray"] = "local",
                 rubric: Rubric = POLARIS_RUBRIC, limiter: AsyncLimiter | None = None,
                 namespace: str = "rlsys") -> None:
        cfg.api_key()  # fail at start-up, naming the env var, before anything else starts
        self.cfg, self.rubric = cfg, rubric
        self.metrics = JudgeMetrics(cfg.price_input_per_1m, cfg.price_output_per_1m)
        self.cache = JudgeCache()
        self._fingerprint = rubric.fingerprint()
        if backend == "ray":
            from rlsys.judge.actor_pool import JudgeActorPool

            self._backend: Any = JudgeActorPool(cfg, rubric, self.metrics, namespace)
        else:
            self._backend = _LocalBackend(cfg, rubric, self.metrics, limiter)
        self._loop = LoopThread("judge-loop")  # after the backend: a failed start-up leaves no thread behind

    # ------------------------------------------------------------------ public API

    def score_items(self, items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Score independent samples (no group rule): one result per item, same order. All
        misses are in progress at once (the limiter paces the requests), without barriers."""
        results: list[dict[str, Any] | None] = [None] * len(items)
        for i, res in self.score_stream(items, window=None):
            results[i] = res
        return [r for r in results if r is not None]

    def score_stream(self, items: Sequence[dict[str, Any]],
                     window: int | None = STREAM_WINDOW) -> Iterator[tuple[int, dict[str, Any]]]:
        """Yield ``(index in items, result)`` for every item, each as soon as it is known:
        cache hits and empty stories first, then judge results in the order they arrive.

        At most ``window`` stories are with the judge at once (None: all of them); a new one
        starts as soon as one finishes. A verdict is in the cache (and its journal, if one is
        open) before it is yielded. A ``JudgeFatalError`` is raised after the results that
        arrived before it; leaving the loop early cancels the requests still in progress.
        """
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 or None, got {window}")
        ready: list[tuple[int, dict[str, Any]]] = []
        waiting: dict[str, list[int]] = {}  # cache key -> indices wanting that verdict
        todo: list[tuple[str, str, str]] = []  # (key, prompt, story) sent to the judge once
        for i, item in enumerate(items):
            prompt, story = judge_visible_prompt(item["prompt"]), visible_story(item["story"])
            if not story:  # nothing to judge: SQ 0 by rule (blank_penalty punishes it separately)
                self.metrics.inc("empty_stories")
                ready.append((i, {"score": 0.0, "masked": False, "reason": "empty_story", "cached": False}))
                continue
            key = cache_key(self.cfg.model, self._fingerprint, prompt, story)
            if (hit := self.cache.get(key)) is not None:
                self.metrics.inc("cache_hits")
                ready.append((i, {"score": hit["score"], "masked": False, "reason": None, "cached": True}))
            elif key in waiting:
                waiting[key].append(i)
            else:
                waiting[key] = [i]
                todo.append((key, prompt, story))
        stream = _Stream(queue.Queue())
        if todo:
            asyncio.run_coroutine_threadsafe(self._drive([(p, s) for _, p, s in todo], window, stream), self._loop.loop)
        got = 0
        try:
            for i, res in ready:
                yield i, self._counted(res)
            while got < len(todo):
                msg = self._next(stream)
                if msg is _END:
                    stream.ended = True
                    if stream.error is not None:
                        raise stream.error  # a fatal endpoint error, after the results before it
                    raise RuntimeError("judge stream ended before every story had a result")
                n, out = msg
                got += 1
                key = todo[n][0]
                if out["score"] is not None:
                    self.cache.put(key, {"score": out["score"], "overall": out["overall"]})
                for k, i in enumerate(waiting[key]):
                    if k and out["score"] is not None:
                        self.metrics.inc("cache_hits")
                    yield i, self._counted({"score": out["score"], "masked": out["score"] is None,
                                            "reason": out["reason"], "cached": k > 0})
        finally:
            if todo and not stream.ended:
                if got < len(todo):  # left early (an error, or the caller stopped): cancel the rest
                    self._loop.loop.call_soon_threadsafe(_Stream.cancel, stream)
                self._wait_for_end(stream)

    def metrics_summary(self) -> dict[str, float]:
        s = self.metrics.summary()
        s["workers"] = float(len(self._backend.workers))
        s["workers_peak"] = float(getattr(self._backend, "peak_workers", len(self._backend.workers)))
        s["cache_size"] = float(len(self.cache))
        return s

    def save_cache(self, path: str) -> None:
        self.cache.save(path)

    def load_cache(self, path: str) -> int:
        return self.cache.load(path)

    def close(self) -> None:
        self._backend.close(self._loop)
        self._loop.close()
        self.cache.close_journal()

    def __enter__(self) -> "JudgeScorer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _counted(self, res: dict[str, Any]) -> dict[str, Any]:
        self.metrics.inc("masked" if res["masked"] else "scored")
        return res

    def _stall_s(self) -> float:
        """Longest a story may take, all resubmissions to new Ray workers included."""
        tries = self.cfg.workers.max_resubmits + 1
        return tries * (self.cfg.retry.sample_deadline_s + self.cfg.timeout_s) + 60.0

    def _next(self, stream: "_Stream") -> Any:
        try:
            return stream.out.get(timeout=self._stall_s())
        except queue.Empty:
            raise JudgeStalledError(f"judge '{self.cfg.name}': no result for {self._stall_s():.0f} s, longer than "
                                    "any story may take (retry.sample_deadline_s)") from None

    def _wait_for_end(self, stream: "_Stream") -> None:
        """Wait (bounded) until the drive has cancelled what it had in progress and scaled down."""
        try:
            while stream.out.get(timeout=WIND_DOWN_S) is not _END:
                pass  # results of stories the caller no longer wants: dropped
        except queue.Empty:
            log.warning("judge %s: requests still in progress %.0f s after the stream ended", self.cfg.name, WIND_DOWN_S)
            return
        stream.ended = True
        if stream.error is not None and not isinstance(stream.error, asyncio.CancelledError):
            log.warning("judge %s: stream stopped with %s", self.cfg.name, type(stream.error).__name__)

    async def _drive(self, jobs: list[tuple[str, str]], window: int | None, stream: "_Stream") -> None:
        """Keep up to ``window`` jobs in progress; put ``(job index, outcome)`` on the stream's
        queue as each finishes, and ``_END`` last, whatever happens."""
        stream.task = asyncio.current_task()
        done: asyncio.Queue = asyncio.Queue()
        pending: set[asyncio.Task] = set()
        cap = len(jobs) if window is None else window
        nxt = 0

        def fill() -> None:
            nonlocal nxt
            while nxt < len(jobs) and len(pending) < cap:
                task = asyncio.ensure_future(self._backend.score_one(*jobs[nxt]))
                task.add_done_callback(lambda t, n=nxt: done.put_nowait((n, t)))
                pending.add(task)
                nxt += 1

        def deliver(n: int, task: asyncio.Task) -> None:
            pending.discard(task)
            if task.cancelled():
                raise asyncio.CancelledError()
            if (exc := task.exception()) is not None:
                while not done.empty():  # hand over what finished before failing
                    m, other = done.get_nowait()
                    pending.discard(other)
                    if not other.cancelled() and other.exception() is None:
                        stream.out.put((m, other.result()))
                raise exc
            stream.out.put((n, task.result()))

        try:
            if not stream.stop:
                fill()
            while pending:
                deliver(*await done.get())  # each story has its own deadline (sample_deadline_s)
                fill()
        except BaseException as e:
            stream.error = e
            raise
        finally:
            for task in pending:
                task.cancel()
            if pending:
                stopped, late = await asyncio.wait(pending, timeout=WIND_DOWN_S)
                for task in stopped:  # retrieved, so asyncio does not log them as lost errors
                    if not task.cancelled():
                        task.exception()
                if late:
                    log.warning("judge %s: %d requests did not stop within %.0f s", self.cfg.name, len(late), WIND_DOWN_S)
            try:
                await self._backend.settle()
            finally:
                stream.out.put(_END)


@dataclass
class _Stream:
    """One ``score_stream`` call: results flow loop -> caller through ``out``."""

    out: queue.Queue
    task: asyncio.Task | None = None  # the drive, once it runs
    stop: bool = False  # the caller left: do not start (or cancel) the drive
    ended: bool = False  # the caller has seen _END
    error: BaseException | None = None  # what ended the drive, if not success

    def cancel(self) -> None:
        """On the loop thread: stop the drive (before it starts, or while it runs)."""
        self.stop = True
        if self.task is not None:
            self.task.cancel()
