"""Rewards of recipe C (QwenStoryteller2, contrastive DPO), text-only: structure, entity
re-identification and grounding of a story told over a sequence of frames.

Pure module (no Ray, vLLM or torch), like the rest of ``rewards/``.

Expected output
---------------
The card (``seeds/qwenstoryteller2.txt``) names the parts -- a ``<think>`` block analysing
characters, objects and settings in tables, then a story tagged with ``<gdi>`` (frame),
``<gdo>`` (entity), ``<gda>`` (action), ``<gdl>`` (location) -- but not their syntax. What the
card leaves open is marked *ours*::

    <think>
    | Character ID | Name | Description |
    |---|---|---|
    | char1 | Anna | a girl in a red coat |

    | Object ID | Name | Description |
    |---|---|---|
    | obj1 | kite | a paper kite |

    | Setting ID | Name | Description |
    |---|---|---|
    | loc1 | park | a windy park |
    </think>
    <gdi image1><gdo char1>Anna</gdo> <gda char1>flies</gda> a <gdo obj1>kite</gdo> in <gdl loc1>the park</gdl>.</gdi>
    <gdi image2>The wind takes the <gdo obj1>kite</gdo>, and <gdo char1>she</gdo> <gda char1>runs</gda> after it.</gdi>

* **Reasoning.** Exactly one think block: one ``<think>`` and then one ``</think>`` (the
  ``THINK_TAG`` of ``rewards/think.py``, case-insensitive), no other think tag anywhere (*ours*:
  the card asks for the reasoning "before writing the final story"; an unclosed or second block
  is not that). The tables are read from ``think_text`` and the story is ``answer_text`` -- the
  one ``<think>`` rule.
* **Tables** (*ours*: markdown). A table is a run of consecutive lines starting with ``|``:
  a header row, a separator row (cells of ``-`` with optional ``:``), data rows. Its kind comes
  from the header cell naming the id column (case and spacing ignored): "Character ID" ->
  character ids ``char<N>``, "Object ID" -> ``obj<N>``, "Setting ID" or "Location ID" ->
  ``loc<N>``. Tables without such a column (a plot table, say) are ignored. Every data row of a
  kind table must hold a well-shaped id in that column; tables of one kind (one per frame, say)
  are merged. At least one character id is required.
* **Story.** Frames are ``<gdi imageK>…</gdi>`` (K >= 1, each K at most once; *ours*: any
  order, text between frames allowed). Inside a frame: ``<gdo ID>mention</gdo>``,
  ``<gda ID>action</gda>``, ``<gdl ID>place</gdl>``; an opening tag may carry several ids
  separated by spaces or commas (*ours*, for group mentions like "the children"). Legal nesting:
  ``gdi`` only at top level; ``gdo``/``gda``/``gdl`` only directly inside a ``gdi`` and holding
  plain, non-blank text (no grounding tag), and a frame must hold some text (*ours*: empty tags
  would let a story farm links without telling anything). Every id in a ``gdo``/``gda``/``gdl``
  tag must appear in a table. Tag names are case-insensitive, ids are compared lower-cased;
  anything that starts like a grounding tag (``<gdo``, ``</gdi`` ...) but does not parse fails.

Scores
------
* ``structure_ok`` -- 1.0 when all of the above holds, else 0.0. It gates the two others.
* ``reid_reward(text, synthetic)`` -- entities are the ids of ``gdo``/``gda`` tags; a
  cross-frame link is an entity mentioned in >= 2 distinct frames;
  ``score = links / distinct entities`` (0 when none). Real sequence: ``+score``; synthetic
  (shuffled, frames from unrelated stories): ``-score`` -- the same links are penalised.
* ``grounding_reward`` -- in the story with the tags removed, candidates are pronouns
  (``PRONOUNS``, whole words, any case) and proper-noun-like words (a capital then lower-case
  letters, e.g. "Anna", but not "I" or "NASA") that do not start a sentence; the reward is the
  share of candidates inside a ``<gdo>`` tag (0 when there is none: nothing was grounded).
  *Ours*: a word starts a sentence at the start of a frame, of a line, of the story, after
  ``.``, ``!``, ``?`` or ``:``, and after an opening quote or bracket (a capital there is
  grammar, not a name; "Mr. Smith" therefore does not count "Smith"); words inside ``<gdl>``
  are no candidates (a place name is grounded there, to a location, and "Paris" must not be
  forced into an entity tag).

Untrusted input (model output is never trusted): every function returns a finite value in its
range for any input and never raises. Non-str output is not well formed. Work is bounded: an
output over ``MAX_OUTPUT_CHARS`` characters is rejected before any scan (the card generates at
most 4096 tokens, ~16k characters), one with over ``MAX_TAGS`` grounding tags stops there, tag
attributes are capped at ``MAX_ATTR_CHARS``, every regex is linear, and the parser is a
two-level state machine (no recursion), stopping at the first structural error.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

from rewards.think import THINK_TAG, answer_text, think_text

__all__ = ["MAX_OUTPUT_CHARS", "MAX_TAGS", "MAX_ATTR_CHARS", "PRONOUNS", "ID_PREFIXES", "ID_PATTERNS",
           "TABLE_ID_COLUMNS", "FORMAT_HINT", "Frame", "ParsedStory", "parse_story", "structure_ok", "reid_score",
           "reid_reward", "grounding_share", "grounding_reward", "st_struct", "st_reid", "st_ground"]

MAX_OUTPUT_CHARS = 100_000  # ~6x the card's 4096-token generation limit
MAX_TAGS = 10_000           # grounding tags (open + close) read before giving up
MAX_ATTR_CHARS = 256        # characters between a tag's name and its '>'
PRONOUNS = frozenset({"he", "she", "they", "him", "her", "them", "his", "hers", "their", "theirs"})
# Entity kind -> the prefix of its ids; an id is the prefix and a number ("char1"), lower-cased.
ID_PREFIXES: Mapping[str, str] = {"character": "char", "object": "obj", "location": "loc"}
ID_PATTERNS: Mapping[str, re.Pattern[str]] = {kind: re.compile(prefix + r"\d+") for kind, prefix in ID_PREFIXES.items()}
# A table's id column header (lower-cased, single-spaced) -> the kind of its ids.
TABLE_ID_COLUMNS: Mapping[str, str] = {"character id": "character", "object id": "object",
                                       "setting id": "location", "location id": "location"}
FORMAT_HINT = ("Format: inside <think></think>, write markdown tables: one with a 'Character ID' column "
               "(ids char1, char2, ...), optionally one with 'Object ID' (obj1, ...) and one with 'Setting ID' "
               "(loc1, ...). After </think>, write the story, one tagged block per frame: <gdi image1>...</gdi> for "
               "frame 1, <gdi image2>...</gdi> for frame 2, and so on; inside it tag "
               "each mention <gdo char1>Anna</gdo>, action <gda char1>runs</gda> and place <gdl loc1>the park</gdl>, "
               "using only ids from your tables.")

_FRAME_ID = re.compile(r"image[1-9]\d*")
_TAG_ID = re.compile(r"[a-z]+\d+")
_ENTITY_TAGS = ("gdo", "gda", "gdl")
_GD_START = re.compile(r"</?gd[ioal]\b", re.IGNORECASE)  # anything that starts like a grounding tag
_GD_TAG = re.compile(r"<(/?)(gd[ioal])(\s[^<>]{0,%d})?>" % MAX_ATTR_CHARS, re.IGNORECASE)
_SEPARATOR_CELL = re.compile(r":?-+:?")
# A word (letters only), or a mark after which the next word starts a sentence: a terminator,
# a line break, or an opening quote/bracket (one after whitespace; the story's first word starts
# a sentence anyway).
_TOKEN = re.compile(r"(?P<word>[^\W\d_]+)|[.!?:\n]|(?<=\s)[\"“‘'(\[]")


@dataclass(frozen=True)
class Frame:
    """One ``<gdi imageK>`` frame of the story."""

    image: str                   # "image1"
    entities: tuple[str, ...]    # ids of its gdo/gda tags, first mention first
    locations: tuple[str, ...]   # ids of its gdl tags


@dataclass(frozen=True)
class ParsedStory:
    """What ``parse_story`` read. Parsing stops at the first structural error (``reason``), so
    after a failure the later fields hold what was read up to it."""

    think_ok: bool = False    # exactly one closed think block
    tables_ok: bool = False   # the id tables parse and hold >= 1 character id
    story_ok: bool = False    # >= 1 frame, tags balanced and legally nested, every id known
    tables: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # kind -> ids
    frames: tuple[Frame, ...] = ()
    unknown_ids: tuple[str, ...] = ()    # tag ids no table lists
    reason: str = ""                     # why it is not well formed ("" when it is)
    plain_text: str = ""                 # the story without tags ("\n" at frame boundaries)
    spans: tuple[tuple[str, int, int], ...] = ()  # (gdo|gda|gdl, start, end) in plain_text

    @property
    def well_formed(self) -> bool:
        return self.think_ok and self.tables_ok and self.story_ok


class _Malformed(Exception):
    """A structural error; carries the reason (internal: never leaves ``parse_story``)."""


# ----------------------------------------------------------------------------- tables

def _cells(line: str) -> list[str]:
    """The cells of one markdown table row (outer pipes optional)."""
    s = line.strip()
    s = s[1:] if s.startswith("|") else s
    s = s[:-1] if s.endswith("|") else s
    return [c.strip() for c in s.split("|")]


def _table_blocks(think: str) -> list[list[str]]:
    """Runs of consecutive lines starting with '|'."""
    blocks: list[list[str]] = []
    current: list[str] = []
    for line in think.splitlines():
        if line.lstrip().startswith("|"):
            current.append(line)
        elif current:
            blocks.append(current)
            current = []
    if current:
        blocks.append(current)
    return blocks


def _id_column(header: list[str]) -> tuple[str, int] | None:
    """(kind, column index) of the first header cell naming an id column."""
    for i, cell in enumerate(header):
        kind = TABLE_ID_COLUMNS.get(" ".join(cell.lower().split()))
        if kind is not None:
            return kind, i
    return None


def _parse_tables(think: str) -> dict[str, tuple[str, ...]]:
    """kind -> ids (merged over that kind's tables, first listing first); raises _Malformed."""
    ids: dict[str, dict[str, None]] = {kind: {} for kind in ID_PATTERNS}  # dicts: ordered sets
    for block in _table_blocks(think):
        header = _cells(block[0])
        found = _id_column(header)
        if found is None:
            continue  # not an entity table
        kind, col = found
        name = header[col][:40]
        if len(block) < 2 or not all(_SEPARATOR_CELL.fullmatch(c) for c in _cells(block[1])):
            raise _Malformed(f"the table with column '{name}' has no separator row under its header")
        for n, line in enumerate(block[2:], start=1):
            cells = _cells(line)
            value = cells[col].lower() if col < len(cells) else ""
            if not ID_PATTERNS[kind].fullmatch(value):
                raise _Malformed(f"data row {n} of the table with column '{name}' has id {value[:40]!r} "
                                 f"(expected a {kind} id like {ID_PREFIXES[kind]}1)")
            ids[kind][value] = None
    return {kind: tuple(found) for kind, found in ids.items()}


# ----------------------------------------------------------------------------- story

class _StoryParser:
    """Two-level state machine over the story's grounding tags: a frame (gdi) may be open, and
    inside it one entity tag (gdo/gda/gdl). Built once per story; ``run`` raises _Malformed."""

    def __init__(self, story: str, known: set[str]) -> None:
        self.story, self.known = story, known
        self.frames: list[Frame] = []
        self.unknown: dict[str, None] = {}
        self.plain: list[str] = []
        self.plain_len = 0
        self.spans: list[tuple[str, int, int]] = []
        self.images: set[str] = set()
        self.frame: tuple[str, dict[str, None], dict[str, None]] | None = None  # image, entities, locations
        self.frame_has_text = False
        self.tag: tuple[str, tuple[str, ...], int] | None = None  # name, ids, start in plain text
        self.tag_text: list[str] = []

    def _text(self, piece: str) -> None:
        if piece:
            self.plain.append(piece)
            self.plain_len += len(piece)
            if self.frame is not None and not piece.isspace():
                self.frame_has_text = True
            if self.tag is not None:
                self.tag_text.append(piece)

    def run(self) -> None:
        pos = 0
        for n, start in enumerate(_GD_START.finditer(self.story), start=1):
            if n > MAX_TAGS:
                raise _Malformed(f"more than {MAX_TAGS} grounding tags")
            m = _GD_TAG.match(self.story, start.start())
            if m is None:
                raise _Malformed(f"malformed grounding tag at character {start.start()}: "
                                 f"{self.story[start.start():start.start() + 40]!r}")
            self._text(self.story[pos:m.start()])
            pos = m.end()
            name, attrs = m.group(2).lower(), (m.group(3) or "").lower()
            if m.group(1):
                self._close(name, attrs)
            else:
                self._open(name, tuple(attrs.replace(",", " ").split()))
        self._text(self.story[pos:])
        if self.tag is not None:
            raise _Malformed(f"<{self.tag[0]}> is never closed")
        if self.frame is not None:
            raise _Malformed(f"<gdi {self.frame[0]}> is never closed")
        if not self.frames:
            raise _Malformed("the story has no <gdi imageK> frame")

    def _open(self, name: str, ids: tuple[str, ...]) -> None:
        if self.tag is not None:
            raise _Malformed(f"<{name}> nested inside <{self.tag[0]}> (which holds plain text only)")
        if name == "gdi":
            if self.frame is not None:
                raise _Malformed(f"<gdi> nested inside <gdi {self.frame[0]}>")
            if len(ids) != 1 or not _FRAME_ID.fullmatch(ids[0]):
                raise _Malformed(f"<gdi> has id {' '.join(ids)[:40]!r} (expected one id like image1)")
            if ids[0] in self.images:
                raise _Malformed(f"frame {ids[0]} appears twice")
            self.images.add(ids[0])
            self.frame, self.frame_has_text = (ids[0], {}, {}), False
            self._text("\n")  # a frame starts a sentence (grounding) and separates frames' words
            return
        if self.frame is None:
            raise _Malformed(f"<{name}> outside a <gdi> frame")
        if not ids or not all(_TAG_ID.fullmatch(i) for i in ids):
            raise _Malformed(f"<{name}> has id {' '.join(ids)[:40]!r} (expected ids like char1)")
        for i in ids:
            if i not in self.known:
                self.unknown[i] = None  # collected, not fatal yet: ParsedStory lists them all
        self.tag, self.tag_text = (name, ids, self.plain_len), []

    def _close(self, name: str, attrs: str) -> None:
        if attrs.strip():
            raise _Malformed(f"</{name}> carries attributes")
        if self.tag is not None:
            tag, ids, start = self.tag
            if name != tag:
                raise _Malformed(f"</{name}> closes <{tag}>")
            if not "".join(self.tag_text).strip():
                raise _Malformed(f"<{tag} {' '.join(ids)[:40]}> is empty")
            assert self.frame is not None  # an entity tag only opens inside a frame
            self.frame[2 if tag == "gdl" else 1].update(dict.fromkeys(ids))
            self.spans.append((tag, start, self.plain_len))
            self.tag = None
            return
        if name == "gdi" and self.frame is not None:
            if not self.frame_has_text:
                raise _Malformed(f"frame {self.frame[0]} holds no text")
            image, entities, locations = self.frame
            self.frames.append(Frame(image, tuple(entities), tuple(locations)))
            self.frame = None
            self._text("\n")
            return
        raise _Malformed(f"</{name}> without a matching opening tag")


# ----------------------------------------------------------------------------- parse

def _think_ok(text: str) -> bool:
    """Exactly one <think> followed by one </think> (module docstring: ours)."""
    tags = [m.group(1) for m in THINK_TAG.finditer(text)]
    return tags == ["", "/"]


def parse_story(text: object) -> ParsedStory:
    """Read an output in the expected format (module docstring). Never raises."""
    if not isinstance(text, str):
        return ParsedStory(reason=f"the output is a {type(text).__name__}, not a string")
    if len(text) > MAX_OUTPUT_CHARS:
        return ParsedStory(reason=f"the output is longer than {MAX_OUTPUT_CHARS} characters")
    if not _think_ok(text):
        return ParsedStory(reason="expected exactly one closed <think>...</think> block")
    try:
        tables = _parse_tables(think_text(text))
    except _Malformed as e:
        return ParsedStory(think_ok=True, reason=str(e))
    if not tables["character"]:
        return ParsedStory(think_ok=True, tables=tables, reason="no character id in a 'Character ID' table")
    parser = _StoryParser(answer_text(text), {i for ids in tables.values() for i in ids})
    reason = ""
    try:
        parser.run()
    except _Malformed as e:
        reason = str(e)
    unknown = tuple(parser.unknown)
    if unknown and not reason:
        reason = f"ids not in any table: {', '.join(unknown)[:200]}"
    return ParsedStory(think_ok=True, tables_ok=True, story_ok=not reason, tables=tables,
                       frames=tuple(parser.frames), unknown_ids=unknown, reason=reason,
                       plain_text="".join(parser.plain), spans=tuple(parser.spans))


def structure_ok(text: object) -> float:
    """1.0 when the output is well formed (module docstring), else 0.0."""
    return 1.0 if parse_story(text).well_formed else 0.0


# ----------------------------------------------------------------------------- re-identification

def reid_score(parsed: ParsedStory) -> float:
    """Entities (gdo/gda ids) seen in >= 2 distinct frames / distinct entities; 0 when none.
    Frames are distinct by construction (an image id appears once)."""
    frames_of: dict[str, int] = {}
    for frame in parsed.frames:
        for entity in frame.entities:
            frames_of[entity] = frames_of.get(entity, 0) + 1
    if not frames_of:
        return 0.0
    return sum(1 for k in frames_of.values() if k >= 2) / len(frames_of)


def _is_synthetic(value: object) -> bool:
    """True / 1 mean synthetic; False / 0 mean real; anything else (None, "1", 1.0, ...) is read
    as real -- the reader makes the field a bool, so only a caller bypassing it gets here."""
    return value is True or (type(value) is int and value == 1)


def reid_reward(text: object, synthetic: object) -> float:
    """``+score`` on a real sequence, ``-score`` on a synthetic one; 0.0 unless well formed.
    In [-1, 1]."""
    parsed = parse_story(text)
    if not parsed.well_formed:
        return 0.0
    score = reid_score(parsed)
    return -score if _is_synthetic(synthetic) else score


# ----------------------------------------------------------------------------- grounding

def _candidates(parsed: ParsedStory) -> tuple[int, int]:
    """(grounded candidates, candidates) of the story (module docstring)."""
    spans, k = parsed.spans, 0
    grounded = total = 0
    at_start = True
    for m in _TOKEN.finditer(parsed.plain_text):
        word = m.group("word")
        if word is None:  # a sentence mark
            at_start = True
            continue
        starts, at_start = at_start, False
        pronoun = word.lower() in PRONOUNS
        if not pronoun and (starts or not (word[0].isupper() and word[1:].islower())):
            continue
        while k < len(spans) and spans[k][2] <= m.start():  # spans are in order and disjoint
            k += 1
        inside = spans[k][0] if k < len(spans) and spans[k][1] <= m.start() and m.end() <= spans[k][2] else ""
        if inside == "gdl":
            continue
        total += 1
        grounded += inside == "gdo"
    return grounded, total


def grounding_share(parsed: ParsedStory) -> float:
    """Share of the candidates inside a <gdo> tag; 0.0 when there is none."""
    grounded, total = _candidates(parsed)
    return grounded / total if total else 0.0


def grounding_reward(text: object) -> float:
    """``grounding_share`` of a well-formed output, else 0.0. In [0, 1]."""
    parsed = parse_story(text)
    return grounding_share(parsed) if parsed.well_formed else 0.0


# ----------------------------------------------------------------------------- channels
# The reward-channel registry passes the data row's fields by parameter name.

def st_struct(text: object) -> float:
    """Channel: ``structure_ok``."""
    return structure_ok(text)


def st_reid(text: object, synthetic: object) -> float:
    """Channel: ``reid_reward``; ``synthetic`` is the row's flag (bool, or 0/1; anything else is
    read as a real sequence, see ``_is_synthetic``)."""
    return reid_reward(text, synthetic)


def st_ground(text: object) -> float:
    """Channel: ``grounding_reward``."""
    return grounding_reward(text)


# ----------------------------------------------------------------------------- shaping (ours)

# Independent markers of the format, each found anywhere in the output (bounded: MAX_OUTPUT_CHARS).
_PROGRESS_MARKERS = (
    re.compile(r"<think>.*?</think>", re.IGNORECASE | re.DOTALL),   # a closed reasoning block
    re.compile(r"^\s*\|.*\b(?:character|object|setting|location)\s+id\b.*\|", re.IGNORECASE | re.MULTILINE),
    re.compile(r"<gdi\s+image\d+\s*>", re.IGNORECASE),               # a frame tag
    re.compile(r"<gdo\s+(?:char|obj)\d+[^>]*>", re.IGNORECASE),      # an entity tag
)


def format_progress(text: object) -> float:
    """*Ours*, not the card's: the share of four format markers present anywhere -- a closed think
    block, an id-table header, a ``<gdi imageK>`` frame tag, a ``<gdo ID>`` entity tag -- in
    [0, 1]. A base model that never saw the format (the card starts from an SFT model) earns 0 on
    every gated channel, so its groups tie and DPO gets no pair; this gives such a model a slope
    towards the format. Not gated; bounded like the rest (long outputs score 0)."""
    if not isinstance(text, str) or len(text) > MAX_OUTPUT_CHARS:
        return 0.0
    return sum(bool(m.search(text)) for m in _PROGRESS_MARKERS) / len(_PROGRESS_MARKERS)


def st_progress(text: object) -> float:
    """Channel: ``format_progress`` (shaping for base models; ours)."""
    return format_progress(text)
