"""The one `<think>` rule: which part of a policy output is reasoning and which is the answer.

Every recipe reads the answer through ``answer_text`` (recipe A parses its JSON from it; recipe
B's judge and penalties measure the story in it). The rule:

* closed ``<think>…</think>`` blocks are reasoning, wherever they are; text outside them is
  the answer (a preamble before the block and text between two blocks included);
* a ``</think>`` with no opening tag means the chat template opened the block in the prompt:
  everything before it is reasoning;
* a ``<think>`` that is never closed swallows the rest: the model ran out of tokens while
  still thinking, and whatever it drafted there is not an answer;
* tags are case-insensitive; a tag inside a string of a complete, parseable JSON object in the
  answer (``"I <think> so"``) is content, not a boundary (``rewards._jsonish.OutsideFinder``;
  bounded work on hostile input). Inside a reasoning block nothing is read as JSON: the first
  ``</think>`` ends it.

Non-str output has no answer: "". Pure, no Ray/vLLM.
"""
from __future__ import annotations

import re

from rewards._jsonish import OutsideFinder

THINK_TAG = re.compile(r"<(/?)think>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"</think>", re.IGNORECASE)


def answer_text(text: object) -> str:
    """The answer part of `text`, unstripped (whitespace matters to the blank penalty)."""
    if not isinstance(text, str):
        return ""
    finder = OutsideFinder(text)
    kept: list[str] = []
    pos = 0   # start of the answer text not yet kept
    while True:
        tag = finder.find(THINK_TAG, pos)
        if tag is None:
            break
        if tag.group(1):  # an orphan </think>: everything before it is reasoning
            kept, pos = [], tag.end()
            continue
        kept.append(text[pos:tag.start()])
        close = _THINK_CLOSE.search(text, tag.end())
        if close is None:  # never closed: the rest is reasoning
            return "".join(kept)
        pos = close.end()
    kept.append(text[pos:])
    return "".join(kept)


def strip_think(text: object) -> str:
    """The answer part of `text`, stripped."""
    return answer_text(text).strip()


def think_text(text: object) -> str:
    """The reasoning of `text` that ended, under the same rule as ``answer_text``: the content
    of its closed ``<think>…</think>`` blocks, in order, tags dropped. A ``</think>`` with no
    opening tag closes a block the chat template opened, so everything before it (answer text
    so far included) is reasoning. A block never closed is truncated reasoning: not included.
    "" when there is none, and for non-str input."""
    if not isinstance(text, str):
        return ""
    finder = OutsideFinder(text)
    pieces: list[tuple[bool, str]] = []  # (is reasoning, text) in order, tags dropped
    orphan_cut = 0  # pieces before this index are reasoning whatever their kind (last orphan close)
    pos = 0
    while True:
        tag = finder.find(THINK_TAG, pos)
        if tag is None:
            break
        if tag.group(1):  # an orphan </think>: everything before it is reasoning
            pieces.append((True, text[pos:tag.start()]))
            orphan_cut, pos = len(pieces), tag.end()
            continue
        close = _THINK_CLOSE.search(text, tag.end())
        if close is None:  # never closed: truncated reasoning, not part of the result
            break
        pieces.append((False, text[pos:tag.start()]))
        pieces.append((True, text[tag.end():close.start()]))
        pos = close.end()
    # One pass at the end (not a copy per orphan tag): linear even for "</think>" * 10**5.
    return "".join(piece for i, (thought, piece) in enumerate(pieces) if thought or i < orphan_cut)
