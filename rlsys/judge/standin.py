"""A rule-based stand-in for an LLM judge: an OpenAI-compatible chat-completions server on
127.0.0.1 that fills in the POLARIS rubric from rules, so recipe B runs without an account.

It is not an LLM and says so (`rlsys demo polaris` prints it; the replies' notes say it). The
rules reward what a judge would also reward in a story, crudely: enough words for the request,
varied vocabulary, several sentences, no loops. Every positive dimension gets the same share
of its points, `quality`:

    quality = length * variety * (1 - repetition)
    length     = min(1, words / 300)
    variety    = min(1, 1.5 * distinct words / words)   (lower-cased \\w+ runs)
    repetition = self_repetition(story) / 1.5           (rewards/polaris.py, in [0, 1])

and the repetition deduction gets `repetition` of its points; the other deductions, the bonus
and the penalty are 0. Deterministic, stdlib HTTP only, bounded work per request.
"""
from __future__ import annotations

import json
import logging
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from rewards.judge_rubric import POLARIS_RUBRIC, Rubric
from rewards.polaris import REP_CAP, self_repetition

log = logging.getLogger(__name__)

_STORY = re.compile(r"<<<STORY (\w+)>>>\n(.*)\n<<<END STORY \1>>>", re.DOTALL)
_WORD = re.compile(r"\w+")
_SENTENCE_END = re.compile(r"[.!?]")
FULL_LENGTH_WORDS = 300
MAX_BODY_BYTES = 8 << 20


def standin_verdict(story: str, rubric: Rubric = POLARIS_RUBRIC) -> dict:
    """The rubric parts the stand-in gives `story` (module docstring)."""
    words = _WORD.findall(story.lower())
    n = len(words)
    length = min(1.0, n / FULL_LENGTH_WORDS)
    variety = min(1.0, 1.5 * len(set(words)) / n) if n else 0.0
    sentences = len(_SENTENCE_END.findall(story))
    repetition = self_repetition(story) / REP_CAP
    quality = length * variety * (1.0 - repetition) * (1.0 if sentences >= 3 else 0.5)
    positive = {d.name: round(d.max_points * quality) for d in rubric.positive}
    negative = {d.name: round(d.max_points * repetition) if d.name == "repetition" else 0 for d in rubric.negative}
    return {"positive": positive, "negative": negative, "bonus": 0, "penalty": 0}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # one line per request would drown the training log
        pass

    def do_POST(self) -> None:
        size = int(self.headers.get("Content-Length", 0))
        if not self.path.endswith("/chat/completions") or not 0 < size <= MAX_BODY_BYTES:
            return self._send(404 if size else 400, {"error": "POST /v1/chat/completions with a JSON body"})
        try:
            body = json.loads(self.rfile.read(size))
            user = body["messages"][-1]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            return self._send(400, {"error": f"bad request: {type(e).__name__}"})
        m = _STORY.search(user) if isinstance(user, str) else None
        if m is None:
            return self._send(400, {"error": "no <<<STORY nonce>>> block in the last message"})
        nonce, story = m.group(1), m.group(2)
        content = json.dumps({"nonce": nonce, **standin_verdict(story), "overall": 0,
                              "notes": "rule-based stand-in judge (rlsys.judge.standin), not an LLM"})
        usage = {"prompt_tokens": len(user) // 4, "completion_tokens": len(content) // 4}
        return self._send(200, {"id": "standin", "object": "chat.completion", "model": body.get("model"),
                                "usage": usage, "choices": [{"index": 0, "finish_reason": "stop",
                                                             "message": {"role": "assistant", "content": content}}]})

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


class StandinJudge:
    """`with StandinJudge() as judge:` serves on 127.0.0.1:`port` (0: a free one) in a thread;
    `judge.base_url` is what a judge config's `base_url` takes."""

    def __init__(self, port: int = 0) -> None:
        self.httpd = _Server(("127.0.0.1", port), _Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="standin-judge", daemon=True)

    def __enter__(self) -> "StandinJudge":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=10)
