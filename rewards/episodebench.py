"""Rule rewards of recipe A (EpisodeBench): format, transition accuracy, length.

Pure functions: no ray, vllm or torch, so reward actors and tests import this cheaply.
The definitions follow RECIPES.md, recipe A (choices marked *ours* where sources are silent):

* R_fmt = 0.15·[```json fence] + 0.25·[dict after stripping <think> and repairing]
  + 0.6·[schema valid]; schema valid = ``plot_list`` a non-empty list and ``next_episode``
  present (strict mode: every plot well formed and ``next_episode`` a string).
* R_acc = 1 if the schema is valid and the stripped ``next_episode`` equals the reference.
* R_len = 1 inside [l_min, l_max] length units, Gaussian decay outside, 0 if schema invalid.

*ours* (where the public code differs or is silent): the fence is looked for after
removing ``<think>`` blocks (a fenced draft inside the reasoning earns nothing);
``"next_episode": null`` counts as absent; an integer id is read as its decimal string
(lenient mode only); ``strict`` gates accuracy and length as well as format; the length
count covers all Han ideograph blocks plus kana and Hangul (public: U+4E00..U+9FA5 only).

Markers inside JSON strings (*ours*): a story may quote a code fence or a think tag, so
the think tags, the fence opener (three backticks + "json") and the fence closer (three
backticks) are markers only outside the JSON answer. A marker is content when it lies inside
a complete, parseable object (a ``{`` before it that closes after it and loads, with the
repairs of ``rewards._jsonish``) opening in the answer text; reasoning blocks follow the one rule of
``rewards/think.py``. The fence opens at the first opener outside such an object and closes at
the first closer after it that is outside the object the fence holds (equivalently: of the
candidate ends, the first that leaves the object whole). If that object is truncated or does
not parse, the first closer ends the fence, as a plain regex would. Inside a reasoning block
nothing is read as JSON: the first ``</think>`` ends it.

Untrusted input: every public function returns a value for any input and never raises on
model output (bad length parameters are a configuration error: ValueError). A non-str
response (None, bytes, int) is no answer: fmt = acc = len = 0. Work is bounded so a huge
response scores in well under a second: see ``rewards._jsonish`` (objects over 32k
characters or nested deeper than 128 are not recovered; the marker checks share a budget of
32 bracket scans per text, after which every marker counts as a marker).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from rewards._jsonish import OutsideFinder, extract_object
from rewards.think import strip_think

__all__ = [
    "ParsedResponse",
    "parse_response",
    "strip_think",
    "format_reward",
    "accuracy_reward",
    "count_length_units",
    "length_reward",
    "score_episodebench",
]

# Weights of the three format indicators (public code's split of the card's 0.4 + 0.6).
W_FENCE, W_DICT, W_SCHEMA = 0.15, 0.25, 0.6

_FENCE_OPEN = re.compile(r"```json[ \t]*\r?\n?", re.IGNORECASE)
_FENCE_MARK = re.compile(r"```")

# Length units. Han ideographs (CJK Unified Ideographs, Extension A, Compatibility
# Ideographs, and the supplementary-plane Extensions B..F / Compatibility Supplement),
# Japanese kana and Hangul syllables each count as one unit: in these scripts a character
# is roughly what a word is in English. CJK punctuation (U+3000..U+303F) and full-width
# forms are not counted. An ASCII word is a maximal run of ASCII letters and digits, as in
# the public code, so "don't" counts 2 and "R2-D2" counts 2.
_CJK = re.compile(
    "[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
    "\u3040-\u309f\u30a0-\u30ff\uac00-\ud7af"
    "\U00020000-\U0002fa1f]"
)
_ASCII_WORD = re.compile(r"[A-Za-z0-9]+")


@dataclass(frozen=True)
class ParsedResponse:
    """What one policy response contained, as far as the rewards care.

    ``narrative_texts`` holds every narrative and utterance string of a schema-valid
    response (empty otherwise): the text the length reward counts.
    """

    fenced: bool
    obj: dict[str, Any] | None
    parse_ok: bool
    schema_valid: bool
    strict_valid: bool
    next_episode: str | None
    narrative_texts: list[str] = field(default_factory=list)


def _dialogue_ok(d: Any) -> bool:
    """A single role_dialogue dict: empty, or string name and string utterance."""
    if not isinstance(d, dict):
        return False
    if not d:
        return True
    return isinstance(d.get("name"), str) and isinstance(d.get("utterance"), str)


def _role_dialogue_ok(rd: Any) -> bool:
    """role_dialogue as the public code writes it (one dict) or as the card does (a list)."""
    if isinstance(rd, list):
        return all(_dialogue_ok(d) for d in rd)
    return _dialogue_ok(rd)


def _utterances(rd: Any) -> list[str]:
    dialogues = rd if isinstance(rd, list) else [rd]
    return [d["utterance"] for d in dialogues
            if isinstance(d, dict) and isinstance(d.get("utterance"), str)]


def _episode_id(value: Any) -> str | None:
    """Episode ids are strings; an integer id (``"next_episode": 3``) is read as "3"."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def parse_response(text: str) -> ParsedResponse:
    """Parse one response into the fields the rewards need. Never raises.

    Non-str input (None, bytes, ...) is no answer: every field empty, every reward 0.
    """
    answer = strip_think(text)
    finder = OutsideFinder(answer)
    # The fence opens outside any JSON object and closes at the first ``` after it that is
    # not inside the object it holds: a ``` in a narrative is content.
    fence_open = finder.find(_FENCE_OPEN)
    fence_close = finder.find(_FENCE_MARK, fence_open.end()) if fence_open else None
    fenced = fence_close is not None
    # Parse the fenced body when there is one: prose around it may contain braces.
    obj = extract_object(answer[fence_open.end():fence_close.start()]) if fenced else None
    if obj is None:
        obj = extract_object(answer)
    if obj is None:
        return ParsedResponse(fenced, None, False, False, False, None, [])

    plots = obj.get("plot_list")
    schema_valid = (isinstance(plots, list) and len(plots) > 0
                    and obj.get("next_episode") is not None)
    strict_valid = schema_valid and isinstance(obj["next_episode"], str) and all(
        isinstance(p, dict) and isinstance(p.get("narrative"), str)
        and "role_dialogue" in p and _role_dialogue_ok(p["role_dialogue"])
        for p in plots
    )
    texts: list[str] = []
    if schema_valid:
        for plot in plots:
            if not isinstance(plot, dict):
                continue
            if isinstance(plot.get("narrative"), str):
                texts.append(plot["narrative"])
            texts.extend(_utterances(plot.get("role_dialogue")))
    return ParsedResponse(
        fenced=fenced, obj=obj, parse_ok=True, schema_valid=schema_valid,
        strict_valid=strict_valid, next_episode=_episode_id(obj.get("next_episode")),
        narrative_texts=texts,
    )


def _as_parsed(parsed: ParsedResponse | str | None) -> ParsedResponse:
    """The reward functions also take the raw output (any type) and parse it themselves."""
    return parsed if isinstance(parsed, ParsedResponse) else parse_response(parsed)


def _valid(parsed: ParsedResponse, strict: bool) -> bool:
    return parsed.strict_valid if strict else parsed.schema_valid


def format_reward(parsed: ParsedResponse | str | None, strict: bool = False) -> float:
    """R_fmt in [0, 1]: 0.15 fence + 0.25 parsed dict + 0.6 schema (strict if asked)."""
    parsed = _as_parsed(parsed)
    return (W_FENCE * parsed.fenced + W_DICT * parsed.parse_ok
            + W_SCHEMA * _valid(parsed, strict))


def accuracy_reward(parsed: ParsedResponse | str | None, reference_next_episode: str | int,
                    *, strict: bool = False) -> float:
    """R_acc: 1.0 if the schema is valid and next_episode equals the reference, else 0.

    A reference that is not a str or int (None, say) matches nothing: 0.
    """
    parsed = _as_parsed(parsed)
    reference = _episode_id(reference_next_episode)
    if not _valid(parsed, strict) or not reference or parsed.next_episode is None:
        return 0.0
    return float(parsed.next_episode == reference)


def count_length_units(texts: list[str] | str | None) -> int:
    """CJK characters plus ASCII words over all texts (ranges documented above).

    A single string counts as one text; None and non-str items count 0.
    """
    if isinstance(texts, str):
        texts = [texts]
    elif not isinstance(texts, (list, tuple)):
        return 0
    return sum(_count_units(t) for t in texts if isinstance(t, str))


def _count_units(text: str) -> int:
    # subn counts without building a list of every match (cheap on a huge text).
    return _CJK.subn("", text)[1] + _ASCII_WORD.subn("", text)[1]


def length_reward(parsed: ParsedResponse | str | None, l_min: int = 80, l_max: int = 100,
                  sigma: float = 10.0, *, strict: bool = False) -> float:
    """R_len: 1 for n in [l_min, l_max], exp(-½((n-edge)/σ)²) outside, 0 if invalid.

    Bad parameters are a configuration error (ValueError), never a property of the output.
    """
    _check_length_params(l_min, l_max, sigma)
    parsed = _as_parsed(parsed)
    if not _valid(parsed, strict):
        return 0.0
    n = count_length_units(parsed.narrative_texts)
    if l_min <= n <= l_max:
        return 1.0
    z = (n - (l_min if n < l_min else l_max)) / sigma
    # Past 40 sigmas exp(-z²/2) is 0.0 in float64 anyway; squaring a huge z would overflow.
    return 0.0 if abs(z) > 40.0 else math.exp(-0.5 * z * z)


def _check_length_params(l_min: int, l_max: int, sigma: float) -> None:
    if not 0 <= l_min <= l_max:
        raise ValueError(f"length bounds must satisfy 0 <= l_min <= l_max, got {l_min}, {l_max}")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")


def score_episodebench(text: str, reference_next_episode: str | int, *,
                       l_min: int = 80, l_max: int = 100, sigma: float = 10.0,
                       strict: bool = False) -> dict[str, float]:
    """All three rule channels for one response: {"fmt", "acc", "len"}.

    ``strict`` tightens "schema valid" for every channel, so a response that fails the
    strict schema gets no accuracy or length credit either.
    """
    parsed = parse_response(text)  # non-str text: no answer, all channels 0
    return {
        "fmt": format_reward(parsed, strict),
        "acc": accuracy_reward(parsed, reference_next_episode, strict=strict),
        "len": length_reward(parsed, l_min, l_max, sigma, strict=strict),
    }
