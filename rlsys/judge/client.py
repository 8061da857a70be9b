"""Async client for one OpenAI-compatible ``/chat/completions`` judge endpoint.

One ``score()`` call turns (prompt, story) into either a rubric score or a masked outcome with a
reason; it never invents a score. Every HTTP attempt first takes a permit from the (possibly
cluster-wide) limiter and hands it back when the response (or the failure) is in, so the limiter
counts the request until it has certainly arrived. Failure handling:

* 429 -> slows the pool as much as the server asks and no more: Retry-After (or a backoff, if
  absent) delays *this* request only; the others keep their pace. Only what the server says
  about the whole quota reaches every worker, through the shared limiter: OpenAI-style
  ``x-ratelimit-limit-*`` below our budget lowers the budget to it, and ``remaining 0`` with
  ``x-ratelimit-reset-*`` pauses all grants until that reset. ``pause_cluster_on_429`` (off by
  default) also pauses everyone for every Retry-After, for endpoints that punish continued
  traffic. A 429 does not use up the attempt budget, only the sample deadline.
* 5xx, timeouts, connection errors, non-JSON bodies -> exponential backoff with jitter, up to
  ``retry.max_attempts``; they also feed the circuit breaker.
* a reply that does not satisfy the rubric schema -> re-asked up to ``retry.parse_retries``.
* 401/403/404 -> ``JudgeFatalError`` (bad key, model or URL: retrying cannot help). The client
  then refuses to send anything more: its other concurrent stories raise the same error.

The API key lives only in the httpx client's default headers (which httpx redacts in reprs); it is
never logged, returned or put in an exception message.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from rewards.judge_rubric import POLARIS_RUBRIC, ParseFailure, Rubric, build_judge_messages, parse_judge_reply
from rlsys.judge.config import JudgeConfig
from rlsys.judge.limiter import AsyncLimiter, PermitTooLarge
from rlsys.judge.metrics import JudgeMetrics
from rlsys.judge.resilience import (CircuitBreaker, ServerLimits, backoff_delay, parse_rate_limit_headers,
                                    parse_retry_after)

log = logging.getLogger(__name__)

FATAL_STATUSES = (401, 403, 404)
_TRANSIENT_COUNTER = {"5xx": "http_5xx", "timeout": "timeouts", "conn": "connection_errors",
                      "bad_response": "bad_responses"}


class JudgeFatalError(RuntimeError):
    """The endpoint rejects us for a reason retries cannot fix (auth, model, URL)."""


@dataclass
class _Attempt:
    kind: str  # ok | parse | 429 | 5xx | 4xx | timeout | conn | bad_response
    reason: str = ""
    score: Any = None
    retry_after: float | None = None
    status: int = 0
    tokens: int | None = None
    limits: ServerLimits | None = None  # what a 429's headers say about the whole quota
    answered: bool = True  # False: no response (timeout, connection error), it may still arrive


class JudgeClient:
    """Scores one story at a time; run many ``score()`` coroutines concurrently."""

    def __init__(self, cfg: JudgeConfig, limiter: AsyncLimiter, metrics: JudgeMetrics,
                 rubric: Rubric = POLARIS_RUBRIC, rng: random.Random | None = None) -> None:
        self.cfg, self.limiter, self.metrics, self.rubric = cfg, limiter, metrics, rubric
        headers = {"Content-Type": "application/json"}
        key = cfg.api_key()  # fails here, at start-up, naming the env var
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        self._http = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(cfg.timeout_s, connect=cfg.connect_timeout_s),
            limits=httpx.Limits(max_connections=cfg.max_concurrency, max_keepalive_connections=cfg.max_concurrency),
        )
        self._url = f"{cfg.base_url}/chat/completions"
        self._host = urlsplit(cfg.base_url).netloc
        self._breaker = CircuitBreaker(cfg.circuit_breaker.failure_threshold, cfg.circuit_breaker.reset_after_s)
        self._rng = rng or random.Random()
        self._fatal: JudgeFatalError | None = None  # once set, nothing more is sent

    def __repr__(self) -> str:
        return f"JudgeClient(name={self.cfg.name!r}, host={self._host!r}, model={self.cfg.model!r})"

    async def aclose(self) -> None:
        await self._http.aclose()

    def _body(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.cfg.model, "messages": messages,
                                "temperature": self.cfg.temperature, "max_tokens": self.cfg.max_output_tokens}
        if self.cfg.response_format == "json_object":
            body["response_format"] = {"type": "json_object"}
        return {**body, **self.cfg.extra_body}

    def _estimate_tokens(self, messages: list[dict[str, str]]) -> int:
        chars = sum(len(m["content"]) for m in messages)
        return int(chars / self.cfg.chars_per_token) + 8 * len(messages) + self.cfg.max_output_tokens

    async def score(self, prompt: str, story: str) -> dict[str, Any]:
        """Judge-visible prompt and story -> ``{score, overall, reason}`` (score None = masked)."""
        messages, nonce = build_judge_messages(self.rubric, prompt, story)
        body, est = self._body(messages), self._estimate_tokens(messages)
        deadline = time.monotonic() + self.cfg.retry.sample_deadline_s
        tries = {"transport": 0, "parse": 0}
        attempts, last = 0, "none"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return self._masked(f"deadline_exceeded:{last}")
            if self._fatal is not None:  # another story met a fatal error: send nothing more
                raise JudgeFatalError(str(self._fatal))
            try:
                permit = await asyncio.wait_for(self.limiter.acquire(est), remaining)
            except PermitTooLarge:
                return self._masked("too_many_tokens")
            except asyncio.TimeoutError:
                return self._masked(f"deadline_exceeded:{last}")
            # Ask the breaker only now, right before sending: it may have opened while we waited.
            wait = self._breaker.before(time.monotonic())
            if wait > 0 or self._fatal is not None:
                await self.limiter.release(permit, sent=False)
                await asyncio.sleep(min(wait, max(0.0, deadline - time.monotonic())))
                last = "circuit_open"
                continue
            if attempts:
                self.metrics.inc("retries")
            attempts += 1
            att = _Attempt("conn", "cancelled", answered=False)
            try:
                att = await self._attempt(body, nonce)
            finally:
                await self.limiter.release(permit, att.tokens, answered=att.answered)
            if att.kind == "ok":
                self.metrics.inc("responses_ok")
                return {"score": att.score.sq, "overall": att.score.overall, "reason": None}
            last = att.reason or att.kind
            outcome = await self._after_failure(att, tries)
            if isinstance(outcome, dict):
                return outcome
            await asyncio.sleep(min(outcome, max(0.0, deadline - time.monotonic())))

    async def _after_failure(self, att: _Attempt, tries: dict[str, int]) -> dict[str, Any] | float:
        """Count a failed attempt; return a masked outcome, or how long to wait before retrying."""
        policy = self.cfg.retry
        if att.kind == "parse":
            self.metrics.inc("parse_failures")
            tries["parse"] += 1
            return self._masked(f"parse_error:{att.reason}") if tries["parse"] > policy.parse_retries else 0.0
        if att.kind == "429":
            return await self._after_429(att)
        if att.kind == "4xx":
            self.metrics.inc("http_4xx")
            if att.status in FATAL_STATUSES:
                self._fatal = JudgeFatalError(f"judge '{self.cfg.name}': HTTP {att.status} from {self._host} "
                                              f"(check model, base_url and the key in ${self.cfg.api_key_env})")
                raise self._fatal
            return self._masked(f"http_{att.status}")
        # 5xx, timeout, connection error, non-JSON body: transient -> back off, feed the breaker
        self.metrics.inc(_TRANSIENT_COUNTER[att.kind])
        tries["transport"] += 1
        if self._breaker.failure(time.monotonic()):
            self.metrics.inc("circuit_opens")
            log.warning("judge %s: circuit opened after %s", self.cfg.name, att.reason)
        if tries["transport"] >= policy.max_attempts:
            return self._masked(f"{att.reason or att.kind}:after_{tries['transport']}_attempts")
        return backoff_delay(tries["transport"], policy.backoff_base_s, policy.backoff_max_s, policy.jitter, self._rng)

    async def _after_429(self, att: _Attempt) -> float:
        """The 429 policy (module docstring): delay this request by Retry-After; tell the shared
        limiter only what the server says about the whole quota. Returns the delay."""
        policy = self.cfg.retry
        self.metrics.inc("http_429")
        delay = att.retry_after if att.retry_after is not None else backoff_delay(
            1, policy.backoff_base_s, policy.backoff_max_s, policy.jitter, self._rng)
        delay = min(policy.max_retry_after_s, delay)
        lim = att.limits or ServerLimits()
        if lim.requests_per_minute is not None or lim.tokens_per_minute is not None:
            await self.limiter.cap(lim.requests_per_minute, lim.tokens_per_minute)
        pause = min(policy.max_retry_after_s, lim.exhausted_for_s) if lim.exhausted_for_s is not None else 0.0
        if self.cfg.pause_cluster_on_429:
            pause = max(pause, delay)
        if pause > 0:
            self.metrics.inc("pool_pauses")
            await self.limiter.pause(pause)
        return max(delay, pause)

    def _masked(self, reason: str) -> dict[str, Any]:
        self.metrics.inc("failures")
        log.info("judge %s: sample masked (%s)", self.cfg.name, reason)
        return {"score": None, "overall": None, "reason": reason}

    async def _attempt(self, body: dict[str, Any], nonce: str) -> _Attempt:
        """One HTTP exchange, classified. Never raises for network/HTTP problems."""
        self.metrics.inc("requests")
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(self.cfg.timeout_s):  # total, not per-read, time limit
                resp = await self._http.post(self._url, json=body)
        except (TimeoutError, httpx.TimeoutException):
            return _Attempt("timeout", "timeout", answered=False)
        except httpx.HTTPError as e:  # connection refused/reset, protocol errors
            return _Attempt("conn", f"connection_error:{type(e).__name__}", answered=False)
        self.metrics.observe_latency(time.monotonic() - t0)
        status = resp.status_code
        if status == 429:
            self._breaker.success()  # the endpoint is alive, only busy
            return _Attempt("429", "http_429", retry_after=parse_retry_after(resp.headers, time.time()), status=status,
                            limits=parse_rate_limit_headers(resp.headers))
        if status >= 500:
            return _Attempt("5xx", f"http_{status}", status=status)
        self._breaker.success()
        if status >= 400:
            return _Attempt("4xx", f"http_{status}", status=status)
        try:
            data = resp.json()
            content = data["choices"][0]["message"]["content"]
            usage = data.get("usage") or {}
            t_in, t_out = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return _Attempt("bad_response", "bad_response")
        self.metrics.inc("tokens_in", t_in)
        self.metrics.inc("tokens_out", t_out)
        tokens = t_in + t_out if usage else None
        parsed = parse_judge_reply(self.rubric, content if isinstance(content, str) else None, nonce)
        if isinstance(parsed, ParseFailure):
            return _Attempt("parse", parsed.reason, tokens=tokens)
        return _Attempt("ok", score=parsed, tokens=tokens)
