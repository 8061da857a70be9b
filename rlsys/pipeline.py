"""Where each step's scored groups come from: now (synchronous), or prefetched while the learner
trains (`algorithm.max_staleness: 1`, the default).

Asynchronous mode runs the rollout one step ahead. At step n, as soon as step n's groups are in
hand, a background thread takes step n+1's prompts and generates and scores them with the
engines' current weights (policy version v) while the learner trains on step n's groups
(v -> v+1). Before the weights are broadcast the driver waits for that thread
(`wait_engines_idle`): weights change between generation requests, never inside one, so every
sample is generated entirely by one policy version, recorded in its `policy_version`. Step n+1
then trains on samples one version old. The queue between the stages holds at most one step's
groups, so a slow judge or learner cannot make memory grow.

A group more than `max_staleness` versions old when trained on is dropped and counted
(`async/dropped_stale_groups`) or, with `algorithm.stale_groups: regenerate`, its prompts are
generated and scored again by the current policy before the step trains, once
(`async/regenerated_groups`; the engines are idle then: the prefetch is consumed and the next
one not started). With one step of lookahead samples are one version old, within the bound, so
nothing is stale on the normal path; the check states the bound where the samples enter
training whatever the schedule. The lookahead is one step (the config refuses
`max_staleness > 1`): the broadcast waits for the engines, so each update overlaps exactly one
step's rollout, and a deeper queue would only make samples older. `max_staleness: 0` takes none
of these paths: each step generates and trains on the current policy's samples, exactly the
synchronous algorithm.

Checkpoints record the stream position *before* the prefetched prompts (`stream_state`), so a
resumed run regenerates them instead of skipping them (with the checkpoint's weights: a resumed
asynchronous run is not bit-identical to an uninterrupted one; a synchronous one is).
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable

from rlsys.data.stream import PromptStream

log = logging.getLogger(__name__)

# collect(stream, step, examples): generate, score and screen `step`'s groups
# (rlsys.steps.collect_groups): prompts from `stream`, or exactly `examples` when given
Collect = Callable[[PromptStream, int, "list | None"], tuple[list[list[dict]], dict[str, float]]]


def drop_stale(groups: list[list[dict]], version: int, max_staleness: int
               ) -> tuple[list[list[dict]], list[list[dict]], dict[str, float]]:
    """Split the groups into those whose oldest sample is at most `max_staleness` policy versions
    behind `version` (the learner's, about to train on them) and the older ones; metrics on the
    staleness of what is kept."""
    kept, stale, ages = [], [], []
    for g in groups:
        age = version - min(int(s["policy_version"]) for s in g)
        if age > max_staleness:
            stale.append(g)
            continue
        kept.append(g)
        ages += [version - int(s["policy_version"]) for s in g]
    return kept, stale, {"async/dropped_stale_groups": float(len(stale)),
                         "async/staleness_mean": sum(ages) / len(ages) if ages else 0.0,
                         "async/staleness_max": float(max(ages, default=0))}


class RolloutPipeline:
    """Each step's groups, from `collect(stream)` (generate + score + screen: rlsys.steps), run
    in the caller's thread or one step ahead in a background thread (see the module docstring)."""

    def __init__(self, collect: Collect, stream: PromptStream, max_staleness: int, last_step: int, timeout_s: float,
                 stale_groups: str = "drop"):
        if stale_groups not in ("drop", "regenerate"):
            raise ValueError(f"stale_groups must be 'drop' or 'regenerate', not {stale_groups!r}")
        self.collect, self.stream, self.max_staleness = collect, stream, max_staleness
        self.last_step, self.timeout_s, self.stale_groups = last_step, timeout_s, stale_groups
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="rlsys-rollout") if max_staleness >= 1 else None
        self._pending: Future | None = None
        self._pending_from: dict[str, int] | None = None   # stream position before the prefetch
        self._idle_wait = 0.0

    @property
    def asynchronous(self) -> bool:
        return self._pool is not None

    def groups(self, step: int, version: int) -> tuple[list[list[dict]], dict[str, float]]:
        """Step `step`'s groups (prefetched, or collected now) and their metrics; `version`: the
        learner's policy version that will train on them."""
        t0 = time.perf_counter()
        if self._pending is not None:
            groups, metrics = self._result()
        else:
            groups, metrics = self.collect(self.stream, step, None)
        groups, stale, ages = drop_stale(groups, version, self.max_staleness)
        regenerated = 0
        if stale and self.stale_groups == "regenerate":
            groups, metrics = self._regenerate(step, groups, stale, metrics)
            regenerated, ages = len(stale), drop_stale(groups, version, self.max_staleness)[2]
            ages["async/dropped_stale_groups"] = 0.0
        if stale:
            log.warning("%s %d groups older than algorithm.max_staleness=%d", "regenerated" if regenerated
                        else "dropped", len(stale), self.max_staleness)
        waited = time.perf_counter() - t0
        metrics = {**metrics, **ages, "async/regenerated_groups": float(regenerated),
                   "async/rollout_wait_s": waited, "async/engine_idle_wait_s": self._idle_wait}
        self._idle_wait = 0.0
        return groups, metrics

    def _regenerate(self, step: int, kept: list[list[dict]], stale: list[list[dict]], metrics: dict[str, float]
                    ) -> tuple[list[list[dict]], dict[str, float]]:
        """The stale groups' prompts generated and scored again, now, by the current policy (the
        engines are idle: no prefetch runs), appended to the kept groups; counters and times of
        the extra round added to the step's. Once: what comes back is current, never stale."""
        by_uid = {e.uid: e for e in self.stream.examples}
        again, extra = self.collect(self.stream, step, [by_uid[g[0]["prompt_uid"]] for g in stale])
        groups = kept + again
        for gi, g in enumerate(groups):
            for s in g:
                s["group"] = gi
        merged = dict(metrics)
        for k, v in extra.items():
            if k.startswith(("time/", "rollout/")):
                merged[k] = merged.get(k, 0.0) + v
        merged["rollout/groups"] = float(len(groups))
        return groups, merged

    def prefetch(self, step: int) -> None:
        """Asynchronous mode: start generating step+1's groups now (the engines' weights are those
        of the policy about to be trained; none after the last step)."""
        if self._pool is None or step >= self.last_step or self._pending is not None:
            return
        self._pending_from = self.stream.state()
        self._pending = self._pool.submit(self.collect, self.stream, step + 1, None)

    def wait_engines_idle(self) -> None:
        """Block until the prefetch (if any) is done, so the weights may change; its groups are
        kept for the next step. A failure in it is raised here, naming what failed."""
        if self._pending is not None:
            t0 = time.perf_counter()
            try:
                self._pending.result(timeout=self.timeout_s)
            except FutureTimeout:
                raise TimeoutError(f"the prefetched rollout did not finish within {self.timeout_s:.0f}s "
                                   "(cluster.actor_timeout_s)") from None
            self._idle_wait += time.perf_counter() - t0

    def _result(self) -> tuple[list[list[dict]], dict[str, float]]:
        fut, self._pending, self._pending_from = self._pending, None, None
        try:
            return fut.result(timeout=self.timeout_s)
        except FutureTimeout:
            raise TimeoutError(f"the prefetched rollout did not finish within {self.timeout_s:.0f}s "
                               "(cluster.actor_timeout_s)") from None

    @property
    def queued_steps(self) -> int:
        """Steps of groups generated (or generating) ahead of the learner: the queue's depth."""
        return int(self._pending is not None)

    def stream_state(self) -> dict[str, int]:
        """The stream position a checkpoint records: before any prefetched (untrained) prompts."""
        return dict(self._pending_from) if self._pending_from is not None else self.stream.state()

    def close(self) -> None:
        """Wait for a prefetch still running (its actors are about to be shut down), then stop."""
        if self._pool is None:
            return
        if self._pending is not None:
            try:
                self._pending.result(timeout=self.timeout_s)
            except Exception as e:  # the run is ending (perhaps because of this very failure): report, go on
                log.warning("prefetched rollout ended with %s: %s", type(e).__name__, e)
            self._pending = None
        self._pool.shutdown(wait=True)


def stage_metrics(step_s: float, metrics: dict[str, Any]) -> dict[str, float]:
    """Per-stage busy time and the step's ratio to the slowest stage (1.0 = perfect overlap)."""
    busy = {"generate": metrics.get("time/generate", 0.0) + metrics.get("time/reward_wait", 0.0),
            "train": metrics.get("time/train", 0.0),
            "sync": metrics.get("time/sync", 0.0)}
    slowest = max(busy.values()) or 1e-9
    return {**{f"async/busy_{k}_s": v for k, v in busy.items()}, "async/step_over_slowest_stage": step_s / slowest}
