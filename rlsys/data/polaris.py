"""Reader and tiny synthetic generator for recipe B (POLARIS) prompt/story rows.

A row: ``prompt`` (a chat list ending with the user's request, or a plain string), ``story``
(the human reference), ``ground_truth_reasoning`` (optional), ``target_word_count`` (optional
when the prompt says "N words long"; if both are given they must agree) and ``uid`` (optional:
``row-<position>``). Files are ``.parquet`` or ``.jsonl``; a directory is read like
``load_examples`` reads one. Malformed rows raise :class:`DataError` naming file, row and field.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from rewards.judge_rubric import prompt_text
from rewards.polaris import target_word_count
# The turn reader's row plumbing (located errors, chat-message checks, file resolution) is reused
# so both schemas report problems identically.
from rlsys.data.episodebench import DataError, _as_list, _as_structure, _int, _message, _Row, load_unique_rows
from rlsys.data.synth import chat_message_type, check_rows_args, write_train_test

__all__ = ["PolarisExample", "parse_polaris_row", "load_polaris", "write_polaris_dataset", "polaris_synth_main"]


@dataclass(frozen=True)
class PolarisExample:
    """One story request: the chat prompt, the human reference story and the requested length."""

    uid: str
    messages: list[dict[str, str]]
    story: str
    target_word_count: int


def _prompt(row: _Row) -> list[dict[str, str]]:
    value = _as_list(row.record.get("prompt"))
    if isinstance(value, str) and value.strip():
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise row.fail("prompt", "is missing or empty (expected a chat list with the user's request, or a string)")
    chat = [_message(row, "prompt", i, m) for i, m in enumerate(value)]
    if chat[-1]["role"] != "user":
        raise row.fail("prompt", f"ends with a '{chat[-1]['role']}' message (expected the user's request last)")
    return chat


def _target(row: _Row, messages: list[dict[str, str]]) -> int:
    stated = target_word_count(prompt_text(messages))
    if row.record.get("target_word_count") is None:
        if stated is None:
            raise row.fail("target_word_count", "is missing and the prompt states no 'N words long'")
        return stated
    value = _int(row, {}, "target_word_count", 0)
    if value < 1:
        raise row.fail("target_word_count", f"is {value} (expected a positive word count)")
    if stated is not None and stated != value:
        raise row.fail("target_word_count", f"is {value} but the prompt asks for {stated} words")
    return value


def parse_polaris_row(record: Any, where: str, position: int = 0) -> PolarisExample:
    """Validate one raw record; ``where`` prefixes errors, ``position`` makes a missing uid."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with prompt, story, target_word_count, uid; "
                        f"got {type(record).__name__}")
    row = _Row(record, where)
    messages = _prompt(row)
    story = record.get("story")
    if not isinstance(story, str) or not story.strip():
        raise row.fail("story", f"is {str(story)[:40]!r} (expected the non-empty reference story)")
    if not isinstance(record.get("ground_truth_reasoning"), (str, type(None))):
        raise row.fail("ground_truth_reasoning", "is not a string")
    uid = record.get("uid", f"row-{position}")
    if isinstance(uid, bool) or not isinstance(uid, (str, int)) or not str(uid).strip():
        raise row.fail("uid", f"is {uid!r} (expected a non-empty string)")
    return PolarisExample(uid=str(uid), messages=messages, story=story, target_word_count=_target(row, messages))


def _row_split(record: Any) -> str:
    extra = _as_structure(record.get("extra_info")) if isinstance(record, dict) else None
    value = extra.get("split") if isinstance(extra, dict) else None
    return str(value or (record.get("split") if isinstance(record, dict) else "") or "")


def load_polaris(path: str | Path, split: str | None = None, limit: int | None = None) -> list[PolarisExample]:
    """Examples from a file or a dataset directory (``DIR/{split}.parquet|jsonl`` when ``split``).

    For a file, ``split`` keeps rows whose ``split`` / ``extra_info.split`` matches (rows without
    one are kept). Uids must be unique: rollouts and caches are keyed by them.
    """
    return load_unique_rows(path, split, limit, lambda record, where, position, _: parse_polaris_row(record, where, position),
                            keep=lambda record: split is None or _row_split(record) in ("", split))


# ----------------------------------------------------------------------------- synthetic data

_HEROES = ("a lighthouse keeper", "a retired astronaut", "a young baker", "an old cartographer",
           "a night-shift nurse", "a travelling clockmaker", "a stray cat", "a beekeeper")
_TURNS = ("finds a letter written by their future self", "must cross a frozen lake before dawn",
          "hears a song nobody else can hear", "inherits a house that moves at night",
          "is asked to keep a secret for a stranger", "loses the one thing they swore to protect")
_PLACES = ("a fishing village", "a city under siege", "a desert railway stop", "a mountain monastery",
           "a floating market", "an island with no name")
_SENTENCES = ("{Hero} woke before the bells of {place} and listened to the wind.",
              "Nobody in {place} spoke of the old promise, yet everyone kept it.",
              "The {thing} lay on the table, heavier than it had any right to be.",
              "By noon the streets had emptied, and {hero} walked them alone.",
              "Some choices arrive quietly, the way rain begins.",
              "{Hero} remembered a voice, a kitchen, a window left open in winter.",
              "There was a price, and {hero} had always known who would pay it.",
              "When evening came, the {thing} was gone, and so was the fear.")
_THINGS = ("lantern", "key", "map", "letter", "compass", "jar of honey")
TARGETS = (200, 300, 400, 600, 800, 1000)  # CPU-sized; the recipe's buckets run to 12k words


def _synth_row(seed: int, i: int) -> dict[str, Any]:
    """One row from its own RNG ("seed:i"), so adding rows never changes earlier ones.

    The reference story is placeholder text stitched from a few template sentences (repetitive
    by construction): enough to exercise the schema, not a model of good writing.
    """
    rng = random.Random(f"{seed}:{i}")
    hero, turn, place, thing = rng.choice(_HEROES), rng.choice(_TURNS), rng.choice(_PLACES), rng.choice(_THINGS)
    target = rng.choice(TARGETS)
    fill = dict(hero=hero, Hero=hero[0].upper() + hero[1:], place=place, thing=thing)
    words, paragraphs = 0, []
    while words < target:  # reference of about the requested length, in paragraphs of 4 sentences
        para = " ".join(rng.choice(_SENTENCES).format(**fill) for _ in range(4))
        paragraphs.append(para)
        words += len(para.split())
    request = (f"Write a story about {hero} who {turn}, set in {place}. "
               f"The story should be approximately {target} words long.")
    return {"prompt": [{"role": "user", "content": request}], "story": "\n\n".join(paragraphs),
            "ground_truth_reasoning": f"Open in {place}; let the {thing} carry the turn; end on a choice.",
            "target_word_count": target, "uid": f"polaris-{seed}-{i:04d}"}


def write_polaris_dataset(out_dir: str | Path, n: int, seed: int, fmt: str = "parquet",
                          test_fraction: float = 0.2) -> dict[str, Path]:
    """Write ``train.<fmt>`` and ``test.<fmt>`` (the last ``test_fraction`` of ``n`` rows).

    Deterministic: the same arguments give byte-identical files.
    """
    check_rows_args(n, fmt)
    return write_train_test(out_dir, [_synth_row(seed, i) for i in range(n)], test_fraction, fmt, _polaris_schema)


def _polaris_schema():
    import pyarrow as pa  # deferred: jsonl users need no pyarrow

    return pa.schema([("prompt", pa.list_(chat_message_type())), ("story", pa.string()),
                      ("ground_truth_reasoning", pa.string()), ("target_word_count", pa.int64()),
                      ("uid", pa.string())])


def polaris_synth_main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``rlsys data synth-polaris --out DIR [--n N] [--seed S] [--format parquet|jsonl]``."""
    from rlsys.data.synth import rows_dataset_cli

    return rows_dataset_cli(argv, "rlsys data synth-polaris",
                            "Write a synthetic POLARIS (recipe B) prompt/story dataset.", 40, write_polaris_dataset)
