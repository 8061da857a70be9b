"""Lenient extraction of a dict from model output (helper of rewards.episodebench).

Small policies write JSON with prose around it, trailing commas, Python-style quoting
(``{'a': 'b'}``) or stop mid-object when they hit the token limit. The format reward
gives partial credit for "a dict after repair", so this module recovers what it can:

1. take the text from a ``{`` (or ``[``) to its match (string-aware), or, if the object is
   truncated, close the open string and brackets (also retrying after cutting back to the
   last complete element);
2. try ``json.loads``; then again without trailing commas; then ``ast.literal_eval`` with
   JSON literals (true/false/null) rewritten to Python's.

Model output is untrusted, so the work is bounded: at most ``MAX_STARTS`` bracket positions
are tried, a scan gives up past ``MAX_OBJECT_CHARS`` characters or ``MAX_DEPTH`` open
brackets (a real answer is a few kB and nests 4 or 5 deep; anything bigger is not
recovered), and the scanners jump between special characters with regexes instead of
walking every character.

``OutsideFinder`` answers "where is the next marker (a think tag, a code fence) that is
*not* content of a JSON string?": a marker inside a complete, parseable object is skipped.

Pure standard library; never raises on bad input (non-str input yields None).
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any, Callable, NamedTuple

_CLOSER = {"{": "}", "[": "]"}
_JSON_TO_PY = {"true": "True", "false": "False", "null": "None"}
# Bounds on the work per text (module docstring): bracket positions tried by extract_object,
# characters one value may span, and brackets open at once (json.loads itself copes with ~1000).
MAX_STARTS = 16
MAX_OBJECT_CHARS = 32_768
MAX_DEPTH = 128
_JSON_LITERAL = re.compile(r"\b(?:true|false|null)\b")
_TRAILING_COMMA = re.compile(r",(\s*[}\]])")
_SPECIAL = re.compile(r"[\"'{}\[\],]")
_STRING_END = {'"': re.compile(r'["\\]'), "'": re.compile(r"['\\]")}
_QUOTE = re.compile(r"[\"']")
# A complete string literal (unrolled loop: linear, no backtracking blow-up).
_STRING_LIT = {q: re.compile(f"{q}[^{q}\\\\]*(?:\\\\[\\s\\S][^{q}\\\\]*)*{q}") for q in "\"'"}
_PARSE_ERRORS = (ValueError, SyntaxError, TypeError, MemoryError, RecursionError, OverflowError)


class Scan(NamedTuple):
    """Outcome of walking one bracketed value (see ``scan``)."""

    end: int | None            # index of the matching bracket, None if not found
    stack: list[str]           # brackets still open where the scan stopped ([] = gave up)
    quote: str | None          # the open quote if the text ends inside a string
    comma: int | None          # last comma outside strings
    comma_stack: list[str]     # the bracket stack at that comma


_GIVE_UP = Scan(None, [], None, None, [])


def scan(text: str, start: int) -> Scan:
    """Walk ``text`` from the bracket at ``start``, tracking strings and brackets.

    Gives up (empty stack, so nothing is repaired) on a mismatched bracket, past
    ``MAX_DEPTH`` open brackets, or when the value runs past ``MAX_OBJECT_CHARS``.
    """
    limit = min(len(text), start + MAX_OBJECT_CHARS)
    stack: list[str] = []
    comma: int | None = None
    comma_stack: list[str] = []
    i = start
    while True:
        m = _SPECIAL.search(text, i, limit)
        if m is None:
            return _GIVE_UP if limit < len(text) else Scan(None, stack, None, comma, comma_stack)
        i = m.start()
        ch = text[i]
        if ch in "\"'":
            j = i + 1
            while True:  # skip the string, honouring backslash escapes
                e = _STRING_END[ch].search(text, j, limit)
                if e is None:
                    return _GIVE_UP if limit < len(text) else Scan(None, stack, ch, comma, comma_stack)
                if text[e.start()] == "\\":
                    j = e.start() + 2
                    continue
                i = e.start() + 1
                break
            continue
        if ch in _CLOSER:
            stack.append(ch)
            if len(stack) > MAX_DEPTH:
                return _GIVE_UP
        elif ch in "}]":
            if not stack or _CLOSER[stack[-1]] != ch:
                return _GIVE_UP
            stack.pop()
            if not stack:
                return Scan(i, [], None, comma, comma_stack)
        else:
            comma, comma_stack = i, list(stack)
        i += 1


def _outside_strings(text: str, fn: Callable[[str], str]) -> str:
    """Apply ``fn`` to each stretch of ``text`` that lies outside string literals.

    An unterminated string runs to the end of the text and is left as it is.
    """
    out: list[str] = []
    pos = 0
    while True:
        q = _QUOTE.search(text, pos)
        if q is None:
            out.append(fn(text[pos:]))
            return "".join(out)
        out.append(fn(text[pos:q.start()]))
        lit = _STRING_LIT[text[q.start()]].match(text, q.start())
        if lit is None:
            out.append(text[q.start():])
            return "".join(out)
        out.append(lit.group())
        pos = lit.end()


def _drop_trailing_commas(segment: str) -> str:
    return _TRAILING_COMMA.sub(r"\1", segment)


def _pythonise(segment: str) -> str:
    return _JSON_LITERAL.sub(lambda m: _JSON_TO_PY[m.group(0)], segment)


def loads(candidate: str) -> Any:
    """Try strict JSON, JSON without trailing commas, then a Python literal.

    Returns the first dict or list obtained, or None (any parse error means "not this one").
    """
    attempts = (
        lambda s: json.loads(s, strict=False),
        lambda s: json.loads(_outside_strings(s, _drop_trailing_commas), strict=False),
        lambda s: ast.literal_eval(_outside_strings(s, _pythonise)),
    )
    for attempt in attempts:
        try:
            value = attempt(candidate)
        except _PARSE_ERRORS:
            continue
        if isinstance(value, (dict, list)):
            return value
    return None


def _candidates(text: str, start: int) -> list[str]:
    s = scan(text, start)
    if s.end is not None:
        return [text[start:s.end + 1]]
    if not s.stack:  # gave up: nothing sensible to close
        return []
    closed = text[start:] + (s.quote or "") + "".join(_CLOSER[b] for b in reversed(s.stack))
    out = [closed]
    if s.comma is not None and s.comma > start:  # drop the half-written last element
        out.append(text[start:s.comma] + "".join(_CLOSER[b] for b in reversed(s.comma_stack)))
    return out


def _next_open(text: str, pos: int) -> int:
    hits = [i for i in (text.find("{", pos), text.find("[", pos)) if i != -1]
    return min(hits) if hits else -1


class OutsideFinder:
    """Find markers in ``text`` that lie outside complete, parseable JSON objects.

    A match counts unless a ``{`` between the search position and the match opens an object
    that closes after the match *and* parses (``loads``): that object's strings own the
    marker. Objects that are truncated or do not parse shield nothing, so prose such as
    "{it's a draft" cannot hide a tag. The bracket scans of one finder share a budget of
    ``MAX_SHIELD_SCANS``; once it is spent every match counts (bounded work on hostile text).
    """

    MAX_SHIELD_SCANS = 32

    def __init__(self, text: str) -> None:
        self.text = text
        self.scans_left = self.MAX_SHIELD_SCANS

    def _shield_end(self, lo: int, hi: int) -> int | None:
        """End of a parseable object opening in [lo, hi) and closing after ``hi``, or None."""
        text = self.text
        j = text.find("{", lo, hi)
        while j != -1 and self.scans_left > 0:
            self.scans_left -= 1
            s = scan(text, j)
            if s.end is None:
                j = text.find("{", j + 1, hi)
            elif s.end < hi:  # a whole object before the marker: its inner braces are its own
                j = text.find("{", s.end + 1, hi)
            elif loads(text[j:s.end + 1]) is not None:
                return s.end + 1
            else:
                j = text.find("{", j + 1, hi)
        return None

    def find(self, pattern: re.Pattern[str], pos: int = 0) -> re.Match[str] | None:
        """The first match of ``pattern`` at or after ``pos`` outside JSON objects, or None."""
        while True:
            m = pattern.search(self.text, pos)
            if m is None:
                return None
            end = self._shield_end(pos, m.start())
            if end is None:
                return m
            pos = max(end, m.start() + 1)


def extract_object(text: str) -> dict[str, Any] | None:
    """Return the first dict recoverable from ``text``, or None.

    An answer wrapped in a list (``[{...}]`` as the first bracket of the text) is not a
    dict and yields None, as it would for a strict parser; other lists (``[1]`` in prose,
    or a list inside an object that failed to parse) are skipped over.
    """
    if not isinstance(text, str):
        return None
    start = _next_open(text, 0)
    tries = 0
    while start != -1 and tries < MAX_STARTS:
        for candidate in _candidates(text, start):
            value = loads(candidate)
            if isinstance(value, dict):
                return value
            if isinstance(value, list):
                if tries == 0 and any(isinstance(v, dict) for v in value):
                    return None  # the answer itself is a list
                break
        tries += 1
        start = _next_open(text, start + 1)
    return None
