"""Rule channels of recipe B (POLARIS): self-repetition, length and blank penalties.

Pure module (no Ray, vLLM or HTTP), like the rest of ``rewards/``. Every function takes the raw
policy output; only the story -- its answer part under the one ``<think>`` rule of
``rewards/think.py`` -- is measured, exactly the part the judge grades (an output that opens
``<think>`` and never closes it has no story).

Channels (all >= 0; the recipe's negative weights turn them into penalties):

* ``len_pen`` -- target t from the prompt. No penalty inside
  ``[t - clip(0.15 t, 350, 1000), t + clip(0.25 t, 600, 1500)]``; below the band
  ``1 - wc/lower``; above it ``min(1, wc/upper - 1)``. Words are whitespace-separated tokens.
* ``blank`` -- 1.0 if the story has fewer than 150 words or fewer than 10 % visible characters
  (printable, non-whitespace) among the characters after ``</think>``, else 0.0.
* ``rep`` -- self-repetition, our definition (RECIPES.md names only the ingredients)::

      rep = min(1.5, ngram + local + lines)
      ngram = 1 - distinct/total over the story's word 4-grams (words: lower-cased \\w+ runs)
      local = the same ratio in the worst window of 100 words (stride 50; the whole story if
              shorter), so a loop in one part of a long story is not diluted by the rest
      lines = share of lines (>= 3 words, compared lower-cased on their words) repeating an
              earlier line: copy-pasted paragraphs and refrains

  Each part is in [0, 1). Natural prose scores a few hundredths; a story stuck in a loop scores
  near 1 on every part, so the sum is capped at 1.5 (with weight -1.5 at most -2.25 reward).
  Only the first ``MAX_REP_CHARS`` characters of the story are measured (bounded work on
  hostile output): that is ~3x the longest target, and a story past it is already at the
  maximum length penalty.

Untrusted input (model output is never trusted): every function returns a finite value in its
range for any input. A non-str output (None, bytes, ...) is scored as the empty output -- no
story: blank 1.0, rep 0.0, len_pen as for 0 words. A prompt that is neither a string nor a chat
list reads as "" (no stated target). A target that is not a positive finite number (bool, str,
NaN, 0, an int too large for a float) means no target: len_pen 0.0.
"""
from __future__ import annotations

import math
import re

from rewards.judge_rubric import prompt_text as _prompt_text
from rewards.think import answer_text

__all__ = ["REP_CAP", "story_part", "word_count", "target_word_count", "length_bounds", "length_penalty",
           "blank_penalty", "repeated_ngram_ratio", "local_repetition_ratio", "duplicate_line_ratio",
           "self_repetition", "requested_word_count", "polaris_rule_channels"]

# "approximately 1,500 words long": thousands separators are allowed, else "1,500" would read as 500.
# The look-behind and possessive quantifiers keep the search linear on hostile text (a long run
# of digits would otherwise be re-scanned from each of its positions).
_TARGET = re.compile(r"(?<![\d,])(\d[\d,]*+)\s*+words?\s+long", re.IGNORECASE)
_MAX_TARGET_DIGITS = 9  # "10000000000 words long" is not a usable target
_WORD = re.compile(r"\w+")

BLANK_MIN_WORDS = 150
BLANK_MIN_VISIBLE_SHARE = 0.10
NGRAM = 4
WINDOW_WORDS, WINDOW_STRIDE = 100, 50
MIN_LINE_WORDS = 3  # shorter lines ("Yes.", "* * *") legitimately recur
REP_CAP = 1.5
MAX_REP_CHARS = 262_144


def story_part(output: str) -> str:
    """The story: the answer part of the output under the one ``<think>`` rule
    (``rewards.think.answer_text``), unstripped; ``visible_story`` is its strip. An output with
    ``<think>`` and no closing tag is all (truncated) reasoning: no story. Non-str: ""."""
    return answer_text(output)


def word_count(output: str) -> int:
    """Whitespace-separated words of the story part (0 for non-str output)."""
    return len(story_part(output).split())


def target_word_count(prompt_text: str) -> int | None:
    """Requested length from "... N words long" (the first such phrase); None if absent, 0,
    longer than 9 digits, or if ``prompt_text`` is not a str."""
    m = _TARGET.search(prompt_text) if isinstance(prompt_text, str) else None
    digits = m.group(1).replace(",", "") if m else ""
    if not digits or len(digits) > _MAX_TARGET_DIGITS:
        return None
    return int(digits) or None


def _usable_target(target: object) -> float | None:
    """``target`` as a positive finite float, or None (module docstring: no target)."""
    if isinstance(target, bool) or not isinstance(target, (int, float)):
        return None
    try:
        t = float(target)
    except OverflowError:  # an int beyond float range: not a real word count
        return None
    return t if math.isfinite(t) and t > 0 else None


def _clip(x: float, lo: float, hi: float) -> float:
    return min(hi, max(lo, x))


def length_bounds(target: int) -> tuple[float, float]:
    """The no-penalty band ``[lower, upper]`` for a target of ``target`` words."""
    return target - _clip(0.15 * target, 350, 1000), target + _clip(0.25 * target, 600, 1500)


def length_penalty(story: str, target: int | None) -> float:
    """0 inside the band, rising linearly to 1 for an empty story / a story 2x the upper edge.

    No target, no penalty. For targets up to 350 words the lower edge t - 350 is <= 0, so there
    is no "too short" side; the blank penalty still punishes stories under 150 words.
    """
    target = _usable_target(target)
    if target is None:
        return 0.0
    wc = word_count(story)
    lower, upper = length_bounds(target)
    if lower > 0 and wc < lower:
        return 1.0 - wc / lower
    if wc > upper:
        return min(1.0, wc / upper - 1.0)
    return 0.0


def blank_penalty(story: str) -> float:
    """1.0 for a (nearly) blank story: < 150 words, or < 10 % visible characters after ``</think>``."""
    raw = story_part(story)
    words = raw.split()  # str.split() splits on exactly the characters str.isspace() accepts
    if len(words) < BLANK_MIN_WORDS:
        return 1.0
    solid = "".join(words)
    # Fast path in C; the per-character loop only runs when there is something unprintable.
    visible = len(solid) if solid.isprintable() else sum(ch.isprintable() for ch in solid)
    return 1.0 if visible < BLANK_MIN_VISIBLE_SHARE * len(raw) else 0.0


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def repeated_ngram_ratio(words: list[str], n: int = NGRAM) -> float:
    """``1 - distinct/total`` over the word n-grams; 0.0 when there is no n-gram."""
    total = len(words) - n + 1
    if total <= 0:
        return 0.0
    return 1.0 - len({tuple(words[i:i + n]) for i in range(total)}) / total


def local_repetition_ratio(words: list[str], window: int = WINDOW_WORDS, stride: int = WINDOW_STRIDE) -> float:
    """The repeated-n-gram ratio of the worst window (the last window is aligned to the end)."""
    if len(words) <= window:
        return repeated_ngram_ratio(words)
    starts = list(range(0, len(words) - window + 1, stride))
    if starts[-1] != len(words) - window:
        starts.append(len(words) - window)
    return max(repeated_ngram_ratio(words[s:s + window]) for s in starts)


def duplicate_line_ratio(text: str, min_words: int = MIN_LINE_WORDS) -> float:
    """Share of lines with >= ``min_words`` words that repeat an earlier such line (0.0 for non-str)."""
    if not isinstance(text, str):
        return 0.0
    lines = [" ".join(w) for w in map(_words, text.splitlines()) if len(w) >= min_words]
    return 1.0 - len(set(lines)) / len(lines) if lines else 0.0


def self_repetition(story: str) -> float:
    """``min(1.5, ngram + local + lines)`` of the story part (module docstring)."""
    text = story_part(story)[:MAX_REP_CHARS]
    words = _words(text)
    return min(REP_CAP, repeated_ngram_ratio(words) + local_repetition_ratio(words) + duplicate_line_ratio(text))


def requested_word_count(prompt: object, target: object = None) -> object:
    """The length a row asks for: its ``target`` (target_word_count) when given, else the
    "N words long" of the prompt (a string or a chat list); ``length_penalty`` judges whether
    it is usable."""
    return target if target is not None else target_word_count(_prompt_text(prompt))


def polaris_rule_channels(story: str, prompt_text: str | list[dict], target: int | None = None) -> dict[str, float]:
    """``{"rep", "len_pen", "blank"}`` for one output. ``target`` (the row's target_word_count)
    wins over the length stated in the prompt; a prompt may also be a chat list. Never raises
    (module docstring: untrusted input)."""
    target = requested_word_count(prompt_text, target)
    return {"rep": self_repetition(story), "len_pen": length_penalty(story, target), "blank": blank_penalty(story)}
