"""Pure retry helpers: exponential backoff with jitter, Retry-After and rate-limit header
parsing, circuit breaker.

Kept apart from the HTTP client so each rule is unit-tested with an injected clock/RNG.
"""

from __future__ import annotations

import email.utils
import random
import re
from dataclasses import dataclass
from typing import Mapping

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?)(ms|h|m|s)")


def backoff_delay(failures: int, base_s: float, max_s: float, jitter: float, rng: random.Random) -> float:
    """Delay before retry number ``failures`` (1-based): ``min(max, base * 2**(failures-1))``
    with a random fraction ``jitter`` taken off, so workers that failed together do not retry
    together."""
    full = min(max_s, base_s * (2 ** max(0, failures - 1)))
    return full * (1.0 - jitter * rng.random())


def parse_retry_after(headers: Mapping[str, str], now_epoch: float) -> float | None:
    """Seconds to wait from a 429's headers, or None if absent/unreadable.

    ``retry-after-ms`` (sent by OpenAI) wins because it is more precise; ``Retry-After`` may be
    delta-seconds (fractions accepted) or an HTTP-date.
    """
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now_epoch)


def parse_duration(value: str) -> float | None:
    """Seconds from a rate-limit reset value: a plain number of seconds, or OpenAI's Go-style
    durations ("20ms", "1.5s", "6m0s", "1h2m3s"). None if unreadable."""
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(value):
        if m.start() != pos:
            return None
        n, unit = float(m.group(1)), m.group(2)
        total += n / 1000.0 if unit == "ms" else n * {"s": 1.0, "m": 60.0, "h": 3600.0}[unit]
        pos = m.end()
    return total if pos == len(value) and pos > 0 else None


@dataclass(frozen=True)
class ServerLimits:
    """What a 429's rate-limit headers say about the whole quota, not just this request."""

    requests_per_minute: float | None = None  # x-ratelimit-limit-requests
    tokens_per_minute: float | None = None  # x-ratelimit-limit-tokens
    exhausted_for_s: float | None = None  # remaining 0 until x-ratelimit-reset-*: nobody gets through


def parse_rate_limit_headers(headers: Mapping[str, str]) -> ServerLimits:
    """OpenAI-style ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` headers (limits
    per minute, as OpenAI documents them). Missing or unreadable values are None."""
    def number(name: str) -> float | None:
        try:
            v = float(headers.get(name, ""))
        except ValueError:
            return None
        return v if v >= 0 else None

    exhausted: list[float] = []
    for kind in ("requests", "tokens"):
        reset = headers.get(f"x-ratelimit-reset-{kind}")
        if number(f"x-ratelimit-remaining-{kind}") == 0 and reset is not None:
            seconds = parse_duration(reset)
            if seconds is not None:
                exhausted.append(seconds)
    rpm, tpm = number("x-ratelimit-limit-requests"), number("x-ratelimit-limit-tokens")
    return ServerLimits(rpm if rpm else None, tpm if tpm else None, max(exhausted) if exhausted else None)


class CircuitBreaker:
    """closed -> (``threshold`` consecutive failures) -> open -> (``reset_after_s``) -> half-open.

    In half-open exactly one probe is let through; its success closes the breaker, its failure
    re-opens it. While open, callers wait instead of sending, so a dead endpoint receives one
    probe per ``reset_after_s`` per worker instead of a retry storm.
    """

    def __init__(self, threshold: int, reset_after_s: float) -> None:
        self.threshold = threshold
        self.reset_after_s = reset_after_s
        self.state = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._probe_out = False
        self._probe_at = 0.0

    def before(self, now: float) -> float:
        """0 if a request may be sent now, else seconds to wait before asking again."""
        if self.state == "open":
            remaining = self._opened_at + self.reset_after_s - now
            if remaining > 0:
                return remaining
            self.state, self._probe_out = "half_open", False
        if self.state == "half_open":
            # A probe that never reported back (cancelled) is given up after reset_after_s.
            if self._probe_out and now - self._probe_at < self.reset_after_s:
                return min(1.0, self.reset_after_s / 10)
            self._probe_out, self._probe_at = True, now
        return 0.0

    def success(self) -> None:
        self.state, self._failures, self._probe_out = "closed", 0, False

    def failure(self, now: float) -> bool:
        """Record a transport failure; True if this call opened the breaker."""
        self._failures += 1
        if self.state == "half_open" or self._failures >= self.threshold:
            opened = self.state != "open"
            self.state, self._opened_at, self._probe_out = "open", now, False
            return opened
        return False
