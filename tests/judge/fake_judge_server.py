"""A real, fault-injecting OpenAI-compatible judge server on 127.0.0.1 (stdlib only).

Used by the judge tests and by benchmarks/judge_throughput.py. The verdict is a deterministic
function of the story text (``expected_sq``), so a test can check that each score belongs to its
own story. Faults are chosen either per story -- a story containing ``[[FAULTS:429,500,ok]]``
gets those outcomes on its 1st, 2nd, 3rd... request, then normal replies -- or at random with
``fault_rates``. Every arrival is timestamped so tests can check the request/token limit in any
window; the server also enforces its own limit (``rate_limit`` per ``rate_window_s``) and counts
violations. ``transit_s`` / ``transit_jitter_s`` hold each request "in transit" (a fixed plus a
uniformly random delay) before it arrives, i.e. before it is timestamped and counted against the
limit, so a client whose limiter only counts permit-to-send time gets refused. With
``ratelimit_headers`` an over-limit 429 also carries OpenAI's ``x-ratelimit-*`` headers (the limit
per minute, 0 remaining, and when a slot frees up).

Fault kinds: 429 (with Retry-After / retry-after-ms), 500, 503, 401 (echoes the Authorization
header in its body, to test that errors never carry it), slow (reply after ``slow_s``),
drop (close without reply), nonjson (HTML body), badscore (prose "8/10"), outofrange,
obey (returns the first {...} found in the story: a judge fooled into copying a fake score),
prefix (story's text, then valid JSON), echo (valid JSON whose notes quote the story), fenced.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import random
import re
import select
import socket
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from rewards.judge_rubric import POLARIS_RUBRIC, compute_overall

_STORY = re.compile(r"<<<STORY (\w+)>>>\n(.*)\n<<<END STORY \1>>>", re.DOTALL)
_FAULTS = re.compile(r"\[\[FAULTS:([\w,]+)\]\]")
FAULT_KINDS = ("429", "500", "503", "slow", "drop", "nonjson", "badscore", "outofrange")


def verdict_parts(story: str) -> dict:
    """Deterministic rubric parts derived from a hash of the story."""
    h = hashlib.sha256(story.encode()).digest()
    r = POLARIS_RUBRIC
    pos = {d.name: h[i] % (d.max_points + 1) for i, d in enumerate(r.positive)}
    neg = {d.name: h[10 + i] % (d.max_points // 2 + 1) for i, d in enumerate(r.negative)}
    return {"positive": pos, "negative": neg, "bonus": h[20] % (r.bonus_max + 1), "penalty": 0}


def expected_sq(story: str) -> float:
    p = verdict_parts(story)
    return compute_overall(POLARIS_RUBRIC, p["positive"], p["negative"], p["bonus"], p["penalty"]) / 100.0


def max_in_window(times: list[float], window: float) -> int:
    """Largest number of timestamps inside any half-open window of length ``window``."""
    s, best, i = sorted(times), 0, 0
    for j, t in enumerate(s):
        while t - s[i] >= window:
            i += 1
        best = max(best, j - i + 1)
    return best


def max_sum_in_window(events: list[tuple[float, int]], window: float) -> int:
    s, best, i, acc = sorted(events), 0, 0, 0
    for t, v in s:
        acc += v
        while t - s[i][0] >= window:
            acc -= s[i][1]
            i += 1
        best = max(best, acc)
    return best


class FakeJudgeServer:
    def __init__(self, *, rate_limit: int | None = None, rate_window_s: float = 1.0, latency_s: float = 0.0,
                 fault_rates: dict[str, float] | None = None, seed: int = 0, retry_after: str = "1",
                 retry_after_ms: str | None = None, slow_s: float = 2.0, transit_s: float = 0.0,
                 transit_jitter_s: float = 0.0, ratelimit_headers: bool = False) -> None:
        self.rate_limit, self.rate_window_s, self.latency_s = rate_limit, rate_window_s, latency_s
        self.transit_s, self.transit_jitter_s, self.ratelimit_headers = transit_s, transit_jitter_s, ratelimit_headers
        self.fault_rates, self.rng = fault_rates or {}, random.Random(seed)
        self.transit_rng = random.Random(seed + 1)  # own stream: transit on/off keeps the fault sequence
        self.retry_after, self.retry_after_ms, self.slow_s = retry_after, retry_after_ms, slow_s
        self.lock = threading.Lock()
        self.arrivals: list[float] = []  # monotonic arrival time of every request
        self.tokens: list[tuple[float, int]] = []  # (arrival, tokens charged) for 2xx replies
        self.per_story: Counter[str] = Counter()  # requests per story text
        self.story_arrivals: dict[str, list[tuple[float, str]]] = {}  # story -> [(time, outcome)]
        self.auth_headers: set[str] = set()
        self.over_limit = 0
        self.refused_at: list[float] = []  # arrival time of every request refused for the limit
        self.in_flight = self.max_in_flight = 0
        self.default_mode: str | None = None  # e.g. "500" to simulate a dead endpoint
        self.httpd = _Server(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def start(self) -> "FakeJudgeServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _choose(self, story: str, k: int) -> str:
        m = _FAULTS.search(story)
        if m:
            plan = m.group(1).split(",")
            if k < len(plan):
                return plan[k]
        if self.default_mode:
            return self.default_mode
        for kind, p in self.fault_rates.items():
            if self.rng.random() < p:
                return kind
        return "ok"

    def _admit(self, story: str) -> tuple[float, str]:
        with self.lock:
            now = time.monotonic()
            self.arrivals.append(now)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            k = self.per_story[story]
            self.per_story[story] += 1
            recent = len(self.arrivals) - bisect.bisect_right(self.arrivals, now - self.rate_window_s)
            if self.rate_limit is not None and recent > self.rate_limit:
                self.over_limit += 1
                self.refused_at.append(now)
                mode = "over_limit"
            else:
                mode = self._choose(story, k)
            self.story_arrivals.setdefault(story, []).append((now, mode))
            return now, mode

    def _transit(self) -> None:
        """Hold the request back as if it were still on the wire (before it is counted)."""
        if self.transit_s or self.transit_jitter_s:
            with self.lock:
                extra = self.transit_rng.random() * self.transit_jitter_s
            time.sleep(self.transit_s + extra)

    def _limit_headers(self, now: float) -> dict[str, str]:
        """OpenAI-style rate-limit headers for an over-limit refusal (limit per minute, 0 left,
        time until the oldest arrival in the window leaves it)."""
        with self.lock:
            start = bisect.bisect_right(self.arrivals, now - self.rate_window_s)
            oldest = self.arrivals[start] if start < len(self.arrivals) else now
        reset = max(0.0, oldest + self.rate_window_s - now)
        return {"x-ratelimit-limit-requests": f"{(self.rate_limit or 0) * 60 / self.rate_window_s:g}",
                "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": f"{reset * 1000:.0f}ms"}

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:
                try:
                    body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                except ValueError:  # the client gave up (timed out) before its body was sent
                    self.close_connection = True
                    return
                server.auth_headers.add(self.headers.get("Authorization", ""))
                user = body["messages"][-1]["content"]
                m = _STORY.search(user)
                nonce, story = (m.group(1), m.group(2)) if m else ("", "")
                server._transit()
                now, mode = server._admit(story)
                try:
                    if server.latency_s:
                        time.sleep(server.latency_s)
                    server._respond(self, mode, nonce, story, body, now)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    with server.lock:
                        server.in_flight -= 1

        return Handler

    def _respond(self, h, mode: str, nonce: str, story: str, body: dict, now: float) -> None:
        if mode in ("429", "over_limit"):
            headers = {"Retry-After": self.retry_after}
            if self.retry_after_ms:
                headers["retry-after-ms"] = self.retry_after_ms
            if mode == "over_limit" and self.ratelimit_headers:
                headers.update(self._limit_headers(now))
            return _send(h, 429, b'{"error": "rate limited"}', headers)
        if mode in ("500", "503"):
            return _send(h, int(mode), b'{"error": "server error"}')
        if mode == "401":
            return _send(h, 401, json.dumps({"error": "bad key", "got": h.headers.get("Authorization")}).encode())
        if mode == "drop":
            h.close_connection = True
            h.connection.shutdown(2)
            return None
        if mode == "slow" and not _wait_unless_closed(h, self.slow_s):
            return None  # the client gave up: like vLLM, stop working on it (frees the slot)
        if mode == "nonjson":
            return _send(h, 200, b"<html>upstream error</html>", {"Content-Type": "text/html"})
        verdict = {"nonce": nonce, **verdict_parts(story), "overall": 100, "notes": "solid"}
        content = json.dumps(verdict)
        if mode == "badscore":
            content = "I would give this story an 8/10."
        elif mode == "outofrange":
            content = json.dumps({**verdict, "positive": {**verdict["positive"], "plot_structure": 99}})
        elif mode == "obey":
            fake = re.search(r"\{.*\}", story, re.DOTALL)
            content = fake.group(0) if fake else content
        elif mode == "prefix":
            content = story[:200] + "\n" + content
        elif mode == "echo":
            content = json.dumps({**verdict, "notes": story})
        elif mode == "fenced":
            content = "```json\n" + content + "\n```"
        chars = sum(len(m["content"]) for m in body["messages"])
        usage = {"prompt_tokens": chars // 4, "completion_tokens": len(content) // 4}
        with self.lock:
            self.tokens.append((now, usage["prompt_tokens"] + usage["completion_tokens"]))
        reply = {"id": "x", "object": "chat.completion", "model": body.get("model"), "usage": usage,
                 "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}]}
        return _send(h, 200, json.dumps(reply).encode())


def _wait_unless_closed(h, seconds: float) -> bool:
    """Sleep up to ``seconds``; False as soon as the client closes the connection."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        readable, _, _ = select.select([h.connection], [], [], 0.02)
        if readable and h.connection.recv(1, socket.MSG_PEEK) == b"":
            h.close_connection = True
            return False
    return True


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # the default listen backlog (5) drops connects under bursts
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        # Clients that time out or die close their sockets: expected here, not worth a traceback.
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


def _send(h, status: int, payload: bytes, headers: dict | None = None) -> None:
    h.send_response(status)
    h.send_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.send_header("Content-Length", str(len(payload)))
    h.end_headers()
    h.wfile.write(payload)
