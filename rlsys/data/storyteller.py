"""Reader and tiny synthetic generator for recipe C (QwenStoryteller2, text-only) frame sequences.

A row: ``frames`` -- the sequence, in order: ``[{"image": "image1", "description": str,
"entities": [{"id": "char1", "kind": "character"|"object"|"location", "name": str}]}, ...]``
(images numbered image1..imageN in list order; ids shaped like the reward's table ids: char<N>,
obj<N>, loc<N> by kind; ``entities`` may be empty or absent); ``synthetic`` (bool: true for a
shuffled sequence whose frames come from unrelated stories -- the reid reward's sign depends on
it, so it is required); ``prompt`` (optional: a chat list ending with the user's request, or a
string, which becomes the user message after the default system prompt; default: the card's
system prompt adapted to text, then a user message listing the frame descriptions and the
output format, see ``storyteller_messages``); ``uid`` (optional: ``st-`` and a hash of the row's
content, so the same sequence keeps its uid wherever it sits). Files are ``.parquet`` or
``.jsonl``; a directory is read like ``load_examples`` reads one. Malformed rows raise
:class:`DataError` naming file, row and field (``frames[2].entities[0].id``).
"""
from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Sequence

from rewards.storyteller import FORMAT_HINT, ID_PATTERNS, ID_PREFIXES
# The turn reader's row plumbing (located errors, chat-message checks, file resolution) and the
# POLARIS split filter are reused so every schema reports problems identically.
from rlsys.data.episodebench import DataError, _as_list, _as_structure, _message, _Row, load_unique_rows
from rlsys.data.polaris import _row_split
from rlsys.data.synth import check_rows_args, write_train_test

__all__ = ["SYSTEM_PROMPT", "StorytellerExample", "storyteller_messages", "parse_storyteller_row",
           "load_storyteller", "write_storyteller_dataset"]

# The card's recommended system prompt with "images" read as "frame descriptions" (text-only).
SYSTEM_PROMPT = ("You are an AI storyteller that can analyze sequences of frame descriptions and create creative "
                 "narratives. First think step-by-step to analyze characters, objects, settings, and narrative "
                 "structure. Then create a grounded story that maintains consistent character identity and object "
                 "references across frames. Use <think></think> tags to show your reasoning process before writing "
                 "the final story.")


@dataclass(frozen=True)
class StorytellerExample:
    """One frame sequence to tell a story about; ``synthetic`` marks a shuffled (incoherent) one."""

    uid: str
    messages: list[dict[str, str]]
    synthetic: bool
    frames: list[dict]


def storyteller_messages(frames: list[dict]) -> list[dict[str, str]]:
    """The default prompt: system prompt, then the frame descriptions in order. The format hint
    is ours: the card's model learned the tags in fine-tuning, a text-only policy has to be told."""
    listing = "\n".join(f"{f['image']}: {f['description']}" for f in frames)
    user = f"Frames, in order:\n{listing}\n\nGenerate a story based on these frames.\n{FORMAT_HINT}"
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


# ----------------------------------------------------------------------------- reader

def _entity(row: _Row, name: str, value: Any, seen: set[str]) -> dict[str, str]:
    value = _as_structure(value)
    if not isinstance(value, dict):
        raise row.fail(name, f"is {str(value)[:60]!r} (expected {{'id', 'kind', 'name'}})")
    kind = value.get("kind")
    if kind not in ID_PATTERNS:
        raise row.fail(f"{name}.kind", f"is {str(kind)[:40]!r} (expected one of {', '.join(ID_PATTERNS)})")
    entity_id = value.get("id")
    if not isinstance(entity_id, str) or not ID_PATTERNS[kind].fullmatch(entity_id):
        raise row.fail(f"{name}.id", f"is {str(entity_id)[:40]!r} (expected a {kind} id like {ID_PREFIXES[kind]}1)")
    if entity_id in seen:
        raise row.fail(f"{name}.id", f"is {entity_id!r}, listed twice in this frame")
    seen.add(entity_id)
    label = value.get("name")
    if not isinstance(label, str) or not label.strip():
        raise row.fail(f"{name}.name", f"is {str(label)[:40]!r} (expected a non-empty string)")
    return {"id": entity_id, "kind": kind, "name": label}


def _frame(row: _Row, k: int, value: Any) -> dict:
    name = f"frames[{k}]"
    value = _as_structure(value)
    if not isinstance(value, dict):
        raise row.fail(name, f"is {str(value)[:60]!r} (expected {{'image', 'description', 'entities'}})")
    if value.get("image") != f"image{k + 1}":  # numbered in order: the prompt and the tags say imageK
        raise row.fail(f"{name}.image", f"is {str(value.get('image'))[:40]!r} (expected 'image{k + 1}': "
                                        "frames are listed in order image1..imageN)")
    description = value.get("description")
    if not isinstance(description, str) or not description.strip():
        raise row.fail(f"{name}.description", f"is {str(description)[:40]!r} (expected a non-empty string)")
    entities = _as_list(value.get("entities"))
    entities = [] if entities is None else entities
    if not isinstance(entities, list):
        raise row.fail(f"{name}.entities", f"is a {type(entities).__name__} (expected a list)")
    seen: set[str] = set()
    return {"image": value["image"], "description": description,
            "entities": [_entity(row, f"{name}.entities[{i}]", e, seen) for i, e in enumerate(entities)]}


def _frames(row: _Row) -> list[dict]:
    value = _as_list(row.record.get("frames"))
    if not isinstance(value, list) or not value:
        raise row.fail("frames", "is missing or empty (expected a list of {image, description, entities})")
    return [_frame(row, k, f) for k, f in enumerate(value)]


def _synthetic(row: _Row) -> bool:
    value = row.record.get("synthetic")
    if not isinstance(value, bool):  # 0/1 or "true" would hide a mislabelled column; the sign depends on it
        shown = "missing" if value is None else repr(value)[:40]
        raise row.fail("synthetic", f"is {shown} (expected true for a shuffled sequence, false for a real one)")
    return value


def _prompt(row: _Row, frames: list[dict]) -> list[dict[str, str]]:
    value = _as_list(row.record.get("prompt"))
    if value is None or value == "" or value == []:
        return storyteller_messages(frames)
    if isinstance(value, str):
        if not value.strip():
            raise row.fail("prompt", "is blank (leave it out for the default prompt)")
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": value}]
    if not isinstance(value, list):
        raise row.fail("prompt", f"is a {type(value).__name__} (expected a chat list or a string)")
    chat = [_message(row, "prompt", i, m) for i, m in enumerate(value)]
    if chat[-1]["role"] != "user":
        raise row.fail("prompt", f"ends with a '{chat[-1]['role']}' message (expected the user's request last)")
    return chat


def _derived_uid(messages: list[dict[str, str]], frames: list[dict], synthetic: bool) -> str:
    content = json.dumps([messages, frames, synthetic], sort_keys=True, ensure_ascii=False)
    return "st-" + hashlib.sha1(content.encode("utf-8")).hexdigest()[:12]


def parse_storyteller_row(record: Any, where: str, position: int = 0) -> StorytellerExample:
    """Validate one raw record; ``where`` prefixes errors (``position`` is unused: a missing uid
    is derived from the content, not the position)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with frames, synthetic, prompt, uid; "
                        f"got {type(record).__name__}")
    row = _Row(record, where)
    frames = _frames(row)
    synthetic = _synthetic(row)
    messages = _prompt(row, frames)
    uid = record.get("uid")
    if uid is None:
        uid = _derived_uid(messages, frames, synthetic)
    if isinstance(uid, bool) or not isinstance(uid, (str, int)) or not str(uid).strip():
        raise row.fail("uid", f"is {uid!r} (expected a non-empty string)")
    return StorytellerExample(uid=str(uid), messages=messages, synthetic=synthetic, frames=frames)


def load_storyteller(path: str | Path, split: str | None = None, limit: int | None = None) -> list[StorytellerExample]:
    """Examples from a file or a dataset directory (``DIR/{split}.parquet|jsonl`` when ``split``).

    For a file, ``split`` keeps rows whose ``split`` / ``extra_info.split`` matches (rows without
    one are kept). Uids must be unique: rollouts and caches are keyed by them.
    """
    return load_unique_rows(path, split, limit,
                            lambda record, where, position, _: parse_storyteller_row(record, where, position),
                            keep=lambda record: split is None or _row_split(record) in ("", split))


# ----------------------------------------------------------------------------- synthetic data

_NAMES = ("Anna", "Ben", "Chen", "Dara", "Elif", "Farid", "Greta", "Hugo", "Ines", "Jonah", "Kira", "Luca",
          "Mira", "Nils", "Omar", "Priya", "Rosa", "Sami", "Tomas", "Yuki")
_OBJECTS = ("kite", "lantern", "bicycle", "letter", "umbrella", "violin", "map", "suitcase", "camera", "basket")
_PLACES = ("park", "harbour", "train station", "market", "library", "forest path", "rooftop", "kitchen")
# Frame templates; the slots a (protagonist), b (second character), obj and place say which
# entities the frame shows. Every template shows a, so a real story links a across frames.
_FRAMES = ("{a} walks into the {place} carrying a {obj}.",
           "{a} shows the {obj} to {b}.",
           "{b} laughs while {a} looks at the {obj}.",
           "{a} sits alone in the {place}, thinking.",
           "{a} and {b} argue near the {place}.",
           "{b} hands {a} the {obj} without a word.",
           "{a} hides the {obj} under a coat.",
           "Rain falls on the {place} as {a} waits for {b}.")
MIN_FRAMES, MAX_FRAMES = 3, 5


def _slots(template: str) -> list[str]:
    return [s for s in ("a", "b", "obj", "place") if "{" + s + "}" in template]


def _cast(rng: random.Random, names: list[str], objects: list[str], places: list[str]) -> dict[str, str]:
    """One story's cast, popping its names from the given pools (so casts drawn from the same
    pools never share a name)."""
    def pop(pool: list[str]) -> str:
        return pool.pop(rng.randrange(len(pool)))
    return {"a": pop(names), "b": pop(names), "obj": pop(objects), "place": pop(places)}


def _frame_row(k: int, template: str, cast: dict[str, str], ids: dict[str, str]) -> dict[str, Any]:
    kinds = {"a": "character", "b": "character", "obj": "object", "place": "location"}
    return {"image": f"image{k + 1}", "description": template.format(**cast),
            "entities": [{"id": ids[s], "kind": kinds[s], "name": cast[s]} for s in _slots(template)]}


def _synth_row(seed: int, i: int, synthetic: bool) -> dict[str, Any]:
    """One row from its own RNG ("seed:i"), so adding rows never changes earlier ones.

    Real: one cast (char1 = the protagonist, in every frame; char2, obj1, loc1) through 3-5
    frames. Synthetic: each frame comes from a different story with its own cast (no shared
    name, object or place) and is relabelled with fresh ids, so no id recurs across frames.
    """
    rng = random.Random(f"{seed}:{i}")
    n_frames = rng.randint(MIN_FRAMES, MAX_FRAMES)
    templates = [rng.choice(_FRAMES) for _ in range(n_frames)]
    names, objects, places = list(_NAMES), list(_OBJECTS), list(_PLACES)
    if not synthetic:
        cast = _cast(rng, names, objects, places)
        ids = {"a": "char1", "b": "char2", "obj": "obj1", "place": "loc1"}
        frames = [_frame_row(k, t, cast, ids) for k, t in enumerate(templates)]
    else:
        frames = []
        for k, t in enumerate(templates):  # frame k: characters char(2k+1), char(2k+2); obj(k+1); loc(k+1)
            ids = {"a": f"char{2 * k + 1}", "b": f"char{2 * k + 2}", "obj": f"obj{k + 1}", "place": f"loc{k + 1}"}
            frames.append(_frame_row(k, t, _cast(rng, names, objects, places), ids))
    return {"frames": frames, "synthetic": synthetic, "uid": f"storyteller-{seed}-{i:04d}"}


def _synthetic_rows(n: int, share: Fraction) -> list[bool]:
    """Row i is synthetic when floor((i+1) s) > floor(i s): exactly floor(n s) of n, spread
    evenly (so a train/test cut keeps about the share on both sides)."""
    return [math.floor((i + 1) * share) > math.floor(i * share) for i in range(n)]


def write_storyteller_dataset(out_dir: str | Path, n: int, seed: int, fmt: str = "parquet",
                              synthetic_share: float = 1 / 3, test_fraction: float = 0.2) -> dict[str, Path]:
    """Write ``train.<fmt>`` and ``test.<fmt>`` (the last ``test_fraction`` of ``n`` rows), each
    written atomically. ``synthetic_share`` of the rows are synthetic (default 1/3: the card's
    2:1 real-to-synthetic ratio). Deterministic: the same arguments give byte-identical files."""
    check_rows_args(n, fmt)
    if not (isinstance(synthetic_share, (int, float)) and 0 <= synthetic_share <= 1):
        raise ValueError(f"synthetic_share must be in [0, 1], got {synthetic_share!r}")
    share = Fraction(synthetic_share).limit_denominator(1000)  # 1/3 stays exactly 1/3
    rows = [_synth_row(seed, i, synthetic) for i, synthetic in enumerate(_synthetic_rows(n, share))]
    return write_train_test(out_dir, rows, test_fraction, fmt, _storyteller_schema)


def _storyteller_schema():
    import pyarrow as pa  # deferred: jsonl users need no pyarrow

    entity = pa.struct([("id", pa.string()), ("kind", pa.string()), ("name", pa.string())])
    frame = pa.struct([("image", pa.string()), ("description", pa.string()), ("entities", pa.list_(entity))])
    return pa.schema([("frames", pa.list_(frame)), ("synthetic", pa.bool_()), ("uid", pa.string())])


def storyteller_synth_main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``rlsys data synth-storyteller --out DIR [--n N] [--seed S] [--format parquet|jsonl]``."""
    from rlsys.data.synth import rows_dataset_cli

    return rows_dataset_cli(argv, "rlsys data synth-storyteller",
                            "Write a synthetic text-only frame-sequence dataset (recipe C): real sequences "
                            "and shuffled (synthetic) ones, 2:1.", 30, write_storyteller_dataset)
