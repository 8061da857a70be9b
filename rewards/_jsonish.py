"""Lenient extraction of a dict from model output (helper of rewards.episodebench).

Small policies write JSON with prose around it, trailing commas, Python-style quoting
(``{'a': 'b'}``) or stop mid-object when they hit the token limit. The format reward
gives partial credit for "a dict after repair", so this module recovers what it can:

1. take the text from a ``{`` (or ``[``) to its match (string-aware), or, if the object is
   truncated, close the open string and brackets (also retrying after cutting back to the
   last complete element);
2. try ``json.loads``; then again without trailing commas; then ``ast.literal_eval`` with
   JSON literals (true/false/null) rewritten to Python's.

Pure standard library; never raises on bad input.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

_CLOSER = {"{": "}", "[": "]"}
_JSON_TO_PY = {"true": "True", "false": "False", "null": "None"}
# How many "{" positions to try before giving up (bounds the work on garbage output).
_MAX_STARTS = 16
_JSON_LITERAL = re.compile(r"\b(?:true|false|null)\b")
_TRAILING_COMMA = re.compile(r",(\s*[}\]])")


def _scan(text: str, start: int) -> tuple[int | None, list[str], str | None, int | None, list[str]]:
    """Walk ``text`` from the bracket at ``start``, tracking strings and brackets.

    Returns (end index of the matching bracket or None, the bracket stack at the end, the
    open quote character if the text ends inside a string, the index of the last comma
    outside strings, and the bracket stack at that comma).
    """
    stack: list[str] = []
    quote: str | None = None
    escaped = False
    last_comma: int | None = None
    comma_stack: list[str] = []
    for i in range(start, len(text)):
        ch = text[i]
        if quote is not None:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = None
            continue
        if ch in "\"'":
            quote = ch
        elif ch in _CLOSER:
            stack.append(ch)
        elif ch in "}]":
            if not stack or _CLOSER[stack[-1]] != ch:
                return None, stack, None, last_comma, comma_stack  # mismatched: give up
            stack.pop()
            if not stack:
                return i, [], None, last_comma, comma_stack
        elif ch == ",":
            last_comma, comma_stack = i, list(stack)
    return None, stack, quote, last_comma, comma_stack


def _outside_strings(text: str, fn) -> str:
    """Apply ``fn`` to each stretch of ``text`` that lies outside string literals."""
    out: list[str] = []
    buf: list[str] = []
    quote: str | None = None
    escaped = False
    for ch in text:
        if quote is None:
            if ch in "\"'":
                out.append(fn("".join(buf)))
                buf = []
                quote = ch
                out.append(ch)
            else:
                buf.append(ch)
            continue
        out.append(ch)
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == quote:
            quote = None
    out.append(fn("".join(buf)) if quote is None else "".join(buf))
    return "".join(out)


def _drop_trailing_commas(segment: str) -> str:
    return _TRAILING_COMMA.sub(r"\1", segment)


def _pythonise(segment: str) -> str:
    return _JSON_LITERAL.sub(lambda m: _JSON_TO_PY[m.group(0)], segment)


def _loads(candidate: str) -> Any:
    """Try strict JSON, JSON without trailing commas, then a Python literal.

    Returns the first dict or list obtained, or None.
    """
    attempts = (
        lambda s: json.loads(s, strict=False),
        lambda s: json.loads(_outside_strings(s, _drop_trailing_commas), strict=False),
        lambda s: ast.literal_eval(_outside_strings(s, _pythonise)),
    )
    for attempt in attempts:
        try:
            value = attempt(candidate)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(value, (dict, list)):
            return value
    return None


def _candidates(text: str, start: int) -> list[str]:
    end, stack, quote, comma, comma_stack = _scan(text, start)
    if end is not None:
        return [text[start:end + 1]]
    if not stack:  # a mismatched bracket: nothing sensible to close
        return []
    closed = text[start:] + (quote or "") + "".join(_CLOSER[b] for b in reversed(stack))
    out = [closed]
    if comma is not None and comma > start:  # drop the half-written last element
        out.append(text[start:comma] + "".join(_CLOSER[b] for b in reversed(comma_stack)))
    return out


def _next_open(text: str, pos: int) -> int:
    hits = [i for i in (text.find("{", pos), text.find("[", pos)) if i != -1]
    return min(hits) if hits else -1


def extract_object(text: str) -> dict[str, Any] | None:
    """Return the first dict recoverable from ``text``, or None.

    An answer wrapped in a list (``[{...}]`` as the first bracket of the text) is not a
    dict and yields None, as it would for a strict parser; other lists (``[1]`` in prose,
    or a list inside an object that failed to parse) are skipped over.
    """
    start = _next_open(text, 0)
    tries = 0
    while start != -1 and tries < _MAX_STARTS:
        for candidate in _candidates(text, start):
            value = _loads(candidate)
            if isinstance(value, dict):
                return value
            if isinstance(value, list):
                if tries == 0 and any(isinstance(v, dict) for v in value):
                    return None  # the answer itself is a list
                break
        tries += 1
        start = _next_open(text, start + 1)
    return None
