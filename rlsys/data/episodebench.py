"""Reader for the EpisodeBench turn-level schema (dataset ``story_generation_rl``).

One row is one turn of one story: ``prompt`` (chat messages: system + history + user),
``system_prompt``, ``conversation_history``, ``user_input``, ``target_response`` (a dict,
or a dict written as JSON / Python literal, holding the reference ``next_episode``),
``judge_system_prompt``, ``turn_index``, ``total_turns``, ``language`` and ``extra_info``
{index, split, story_id, total_turns, turn_index}. Files are ``.parquet`` or ``.jsonl``.

Rows are checked as they are read: a malformed row raises :class:`DataError` naming the
file, the row (0-based position among the file's records; for jsonl also the line) and
the field, so a bad dataset fails at load time rather than as a reward of 0 mid-run.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = ["DataError", "TurnExample", "read_rows", "parse_row", "load_examples"]

_ROLES = ("system", "user", "assistant")
_SUFFIXES = (".parquet", ".jsonl")


class DataError(ValueError):
    """A dataset file or row does not follow the turn-level schema."""


@dataclass(frozen=True)
class TurnExample:
    """One training/evaluation prompt with its graph-derived reference."""

    uid: str
    messages: list[dict[str, str]]
    reference_next_episode: str
    language: str
    story_id: str
    turn_index: int
    total_turns: int
    split: str


class _Row:
    """A raw record plus where it came from, so every check can say so."""

    def __init__(self, record: Any, where: str) -> None:
        self.where = where
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected an object with the turn fields, got {type(record).__name__}")
        self.record = record

    def fail(self, name: str, problem: str) -> DataError:
        return DataError(f"{self.where}: field '{name}' {problem}")


def _as_structure(value: Any) -> Any:
    """Decode a JSON or Python-literal string; other values pass through."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if not text or text[0] not in "[{":
        return value
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return value


def _as_list(value: Any) -> Any:
    """parquet readers may hand back numpy arrays or tuples for list columns."""
    value = _as_structure(value)
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    return list(value) if isinstance(value, tuple) else value


def _message(row: _Row, name: str, i: int, m: Any) -> dict[str, str]:
    """A chat message: {role, content}, or the ShareGPT form {from, value}."""
    if isinstance(m, dict) and "role" not in m and "from" in m:
        role = {"human": "user", "gpt": "assistant"}.get(m["from"], m["from"])
        m = {"role": role, "content": m.get("value")}
    if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
        raise row.fail(name, f"message {i} is {str(m)[:80]!r} (expected {{'role': one of "
                             f"{'/'.join(_ROLES)}, 'content': str}})")
    return {"role": m["role"], "content": m["content"]}


def _messages(row: _Row, name: str, required: bool) -> list[dict[str, str]]:
    value = _as_list(row.record.get(name))
    if value is None or value == "" or value == []:
        if required:
            raise row.fail(name, "is missing or empty (expected a list of chat messages)")
        return []
    if not isinstance(value, list):
        raise row.fail(name, f"is a {type(value).__name__} (expected a list of chat messages)")
    return [_message(row, name, i, m) for i, m in enumerate(value)]


def _chat(row: _Row) -> list[dict[str, str]]:
    """The prompt; rebuilt from system_prompt + conversation_history + user_input if absent."""
    if _as_list(row.record.get("prompt")) not in (None, "", []):
        chat = _messages(row, "prompt", required=True)
        name = "prompt"
    else:
        chat = []
        for name in ("system_prompt", "user_input"):
            if not isinstance(row.record.get(name), str) or not row.record[name].strip():
                raise row.fail(name, "is missing or empty (expected a string; needed because "
                                     "'prompt' is absent)")
        chat.append({"role": "system", "content": row.record["system_prompt"]})
        chat.extend(_messages(row, "conversation_history", required=False))
        chat.append({"role": "user", "content": row.record["user_input"]})
        name = "conversation_history"
    if chat[-1]["role"] != "user":
        raise row.fail(name, f"ends with a '{chat[-1]['role']}' message (expected the last "
                             "message to be the user's turn)")
    return chat


def _reference(row: _Row) -> str:
    target = _as_structure(row.record.get("target_response"))
    if not isinstance(target, dict) or "next_episode" not in target:
        raise row.fail("target_response", "has no 'next_episode' (expected a dict or "
                                          "dict-as-string with key next_episode)")
    value = target["next_episode"]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise row.fail("target_response", f"has next_episode={value!r} (expected a non-empty "
                                          "episode id string)")
    return str(value).strip()


def _int(row: _Row, extra: dict[str, Any], name: str, default: int) -> int:
    """An integer field, top level first, then extra_info; numeric strings accepted."""
    value = row.record.get(name, extra.get(name))
    if value is None:
        return default
    if isinstance(value, bool):
        raise row.fail(name, f"is {value!r} (expected an integer)")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise row.fail(name, f"is {value!r} (expected an integer)") from None
    if number != value and str(number) != str(value).strip():
        raise row.fail(name, f"is {value!r} (expected an integer)")
    if number < 0:
        raise row.fail(name, f"is {number} (expected >= 0)")
    return number


def parse_row(record: Any, where: str, position: int = 0) -> TurnExample:
    """Validate one raw record.

    ``where`` (e.g. "data/train.jsonl row 3") prefixes error messages; ``position`` stands in
    for extra_info.index in the uid when the row has none.
    """
    row = _Row(record, where)
    extra = _as_structure(record.get("extra_info"))
    if extra is None:
        extra = {}
    if not isinstance(extra, dict):
        raise row.fail("extra_info", f"is a {type(extra).__name__} (expected a dict with "
                                     "index, split, story_id, total_turns, turn_index)")
    messages = _chat(row)
    reference = _reference(row)
    turn = _int(row, extra, "turn_index", 0)
    total = _int(row, extra, "total_turns", turn + 1)
    if turn >= total:
        raise row.fail("turn_index", f"is {turn} but total_turns is {total} (expected turn_index < total_turns)")
    language = record.get("language", "")
    if not isinstance(language, str):
        raise row.fail("language", f"is {language!r} (expected a language code string)")
    story_id = str(extra.get("story_id", record.get("story_id", "")) or "")
    index = extra.get("index", position)
    return TurnExample(
        uid=f"{story_id}/{turn}/{index}", messages=messages, reference_next_episode=reference,
        language=language, story_id=story_id, turn_index=turn, total_turns=total,
        split=str(extra.get("split", record.get("split", "")) or ""),
    )


def read_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield (location, raw record) for every record of one .parquet or .jsonl file."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # deferred: only parquet users pay for the import

        try:
            # One file read as such: read_table goes through pyarrow.dataset, which imports
            # pandas (~50 MiB resident in the driver for nothing).
            with pq.ParquetFile(path) as file:
                records = file.read().to_pylist()
        except Exception as exc:  # pyarrow raises several types for a corrupt file
            raise DataError(f"{path}: not a readable parquet file ({exc})") from exc
        for i, record in enumerate(records):
            yield f"{path} row {i}", record
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as fh:
            row = 0
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                where = f"{path} row {row} (line {lineno})"
                try:
                    record = json.loads(line)
                except ValueError as exc:
                    raise DataError(f"{where}: not valid JSON ({exc})") from exc
                yield where, record
                row += 1
    else:
        raise DataError(f"{path}: unsupported file type (expected {' or '.join(_SUFFIXES)})")


def _files(path: Path, split: str | None) -> list[Path]:
    """A file, or in a directory the file named after the split (or every data file)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: no such file or directory")
    if split is not None:
        found = [path / f"{split}{s}" for s in _SUFFIXES if (path / f"{split}{s}").is_file()]
        if not found:
            raise DataError(f"{path}: no {split}.parquet or {split}.jsonl")
        return found[:1]
    found = sorted(p for p in path.iterdir() if p.suffix in _SUFFIXES)
    if not found:
        raise DataError(f"{path}: no .parquet or .jsonl files")
    return found


def load_unique_rows(path: str | Path, split: str | None, limit: int | None,
                     parse: Callable[[Any, str, int, Path], Any],
                     keep: Callable[[Any], bool] = lambda record: True) -> list:
    """Rows of a file or dataset directory, each validated by `parse(record, where, position,
    file)` (even when `keep(record)` then leaves it out), at most `limit` of them, with unique
    `uid`s: rollouts and caches are keyed by them."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    out: list = []
    seen: dict[str, str] = {}
    for file in _files(Path(path), split):
        for position, (where, record) in enumerate(read_rows(file)):
            if limit is not None and len(out) >= limit:
                return out
            example = parse(record, where, position, file)
            if not keep(record):
                continue
            if example.uid in seen:
                raise DataError(f"{where}: field 'uid' is {example.uid!r}, already used by {seen[example.uid]}")
            seen[example.uid] = where
            out.append(example)
    return out


def load_examples(path: str | Path, split: str | None = None,
                  limit: int | None = None) -> list[TurnExample]:
    """Load turn examples from a file or a dataset directory.

    ``split`` selects ``DIR/{split}.parquet|jsonl`` for a directory and, for any file,
    keeps only rows whose extra_info.split matches (rows without a split are kept).
    ``limit`` stops after that many examples. Every row read is validated.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    out: list[TurnExample] = []
    for file in _files(Path(path), split):
        for position, (where, record) in enumerate(read_rows(file)):
            if limit is not None and len(out) >= limit:
                return out
            example = parse_row(record, where, position)
            if split is None or example.split in ("", split):
                out.append(example)
    return out
