"""``JudgeScorer``: the one entry point training and the CLI use to score stories.

Synchronous from the caller's side; internally a private event-loop thread drives either one
in-process ``JudgeClient`` (``backend="local"``) or the autoscaling Ray actor pool
(``backend="ray"``). For every sample it: extracts the judge-visible prompt/story, answers from
the cache (or from an identical sample earlier in the same batch), sends the rest to the judge
once, caches successes, and returns ``{score, masked, reason}``. Masked samples carry a reason and
``score=None`` -- never a substitute value. Which groups keep enough scored samples for GRPO is
decided once, for every channel, by ``rlsys.batching.screen_groups``.
"""

from __future__ import annotations

from typing import Any, Literal

from rewards.channels import LoopThread
from rewards.judge_rubric import POLARIS_RUBRIC, Rubric, judge_visible_prompt, visible_story
from rlsys.judge.cache import JudgeCache, cache_key
from rlsys.judge.client import JudgeClient, score_all
from rlsys.judge.config import JudgeConfig
from rlsys.judge.limiter import AsyncLimiter, LocalLimiter, limits_for
from rlsys.judge.metrics import JudgeMetrics


class _LocalBackend:
    def __init__(self, cfg: JudgeConfig, rubric: Rubric, metrics: JudgeMetrics, limiter: AsyncLimiter | None) -> None:
        self.client = JudgeClient(cfg, limiter or LocalLimiter(limits_for(cfg)), metrics, rubric)
        self.workers: list[Any] = [self.client]

    async def score_many(self, items: list[tuple[str, str]]) -> list[dict[str, Any]]:
        return await score_all(self.client, items)

    def close(self, loop: LoopThread) -> None:
        loop.run(self.client.aclose())


class JudgeScorer:
    """Build once per run: ``JudgeScorer(cfg, backend="ray")``; see docs/JUDGE.md."""

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

    def score_items(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Score independent samples (no group rule): one result per item, same order."""
        results = self._score_flat(items)
        self._count(results)
        return results

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

    def __enter__(self) -> "JudgeScorer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _count(self, results: list[dict[str, Any]]) -> None:
        self.metrics.inc("scored", sum(not r["masked"] for r in results))
        self.metrics.inc("masked", sum(r["masked"] for r in results))

    def _score_flat(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        results: list[dict[str, Any] | None] = [None] * len(items)
        waiting: dict[str, list[int]] = {}  # cache key -> indices wanting that verdict
        todo: list[tuple[str, str, str]] = []  # (key, prompt, story) sent to the judge once
        for i, item in enumerate(items):
            prompt, story = judge_visible_prompt(item["prompt"]), visible_story(item["story"])
            if not story:  # nothing to judge: SQ 0 by rule (blank_penalty punishes it separately)
                self.metrics.inc("empty_stories")
                results[i] = {"score": 0.0, "masked": False, "reason": "empty_story", "cached": False}
                continue
            key = cache_key(self.cfg.model, self._fingerprint, prompt, story)
            if (hit := self.cache.get(key)) is not None:
                self.metrics.inc("cache_hits")
                results[i] = {"score": hit["score"], "masked": False, "reason": None, "cached": True}
            elif key in waiting:
                waiting[key].append(i)
            else:
                waiting[key] = [i]
                todo.append((key, prompt, story))
        outcomes = self._loop.run(self._backend.score_many([(p, s) for _, p, s in todo])) if todo else []
        for (key, _, _), out in zip(todo, outcomes):
            if out["score"] is not None:
                self.cache.put(key, {"score": out["score"], "overall": out["overall"]})
            for n, i in enumerate(waiting[key]):
                if n and out["score"] is not None:
                    self.metrics.inc("cache_hits")
                results[i] = {"score": out["score"], "masked": out["score"] is None,
                              "reason": out["reason"], "cached": n > 0}
        return [r for r in results if r is not None]
