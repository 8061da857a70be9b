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


def _pieces(text: str) -> tuple[list[tuple[bool, str]], int]:
    """`text` cut at its think tags, tags dropped: [(is reasoning, piece)] in order, and the
    index before which every piece is reasoning (the last orphan ``</think>``). A block never
    closed ends the scan: it and what follows belong to no piece. Linear in len(text)."""
    finder = OutsideFinder(text)
    pieces: list[tuple[bool, str]] = []
    orphan_cut = 0
    pos = 0   # start of the text not yet cut
    while True:
        tag = finder.find(THINK_TAG, pos)
        if tag is None:
            break
        if tag.group(1):  # an orphan </think>: everything before it is reasoning
            pieces.append((True, text[pos:tag.start()]))
            orphan_cut, pos = len(pieces), tag.end()
            continue
        pieces.append((False, text[pos:tag.start()]))
        close = _THINK_CLOSE.search(text, tag.end())
        if close is None:  # never closed: truncated reasoning, the rest is neither
            return pieces, orphan_cut
        pieces.append((True, text[tag.end():close.start()]))
        pos = close.end()
    pieces.append((False, text[pos:]))
    return pieces, orphan_cut


def answer_text(text: object) -> str:
    """The answer part of `text`, unstripped (whitespace matters to the blank penalty)."""
    if not isinstance(text, str):
        return ""
    pieces, orphan_cut = _pieces(text)
    return "".join(piece for i, (thought, piece) in enumerate(pieces) if not thought and i >= orphan_cut)


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
    pieces, orphan_cut = _pieces(text)
    return "".join(piece for i, (thought, piece) in enumerate(pieces) if thought or i < orphan_cut)
