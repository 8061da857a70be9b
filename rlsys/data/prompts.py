"""The generic dataset format (`data.format: prompt`), for your own task.

A `.jsonl` or `.parquet` file (or a directory holding `{split}.jsonl|parquet`) with a `prompt`
column: a string (one user message) or a list of chat messages `{role, content}`. An optional
`uid` column names each row (default: `<file name>:<row>`). Every other column is passed to the
reward functions (`reward.functions`) as a keyword argument, like TRL's dataset columns: a
function `def reward(text, keyword): ...` receives each row's `keyword`.
Bad rows fail with file, row and field before Ray starts.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rlsys.data.episodebench import _Row, load_unique_rows
from rlsys.data.polaris import _prompt


@dataclass(frozen=True)
class PromptExample:
    uid: str
    messages: list[dict[str, str]]
    extra: dict[str, Any] = field(default_factory=dict)
    """Every other column of the row (reward functions get them as keyword arguments)."""


def _plain(value: Any) -> Any:
    """parquet readers hand back numpy scalars/arrays; reward functions get plain Python."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return value.tolist()
    return value.item() if hasattr(value, "item") and not isinstance(value, (str, bytes)) else value


def parse_prompt_row(record: Any, where: str, default_uid: str) -> PromptExample:
    row = _Row(record, where)
    uid = record.get("uid", default_uid)
    if not isinstance(uid, (str, int)) or isinstance(uid, bool) or str(uid) == "":
        raise row.fail("uid", f"is {uid!r} (expected a non-empty string or integer)")
    extra = {k: _plain(v) for k, v in record.items() if k not in ("prompt", "uid", "messages")}
    return PromptExample(str(uid), _prompt(row), extra)


def load_prompts(path: str | Path, split: str | None = None, limit: int | None = None) -> list[PromptExample]:
    """Examples from a file or a dataset directory; uids must be unique."""
    return load_unique_rows(path, split, limit,
                            lambda record, where, position, file: parse_prompt_row(record, where, f"{file.name}:{position}"))


def example_fields(example: Any) -> dict[str, Any]:
    """What a reward actor sees of an example: its fields, with a generic row's extra columns
    flattened in (so `fn(text, keyword=...)` gets the row's `keyword`)."""
    fields = asdict(example)
    for k, v in (fields.pop("extra", None) or {}).items():
        fields.setdefault(k, v)
    return fields
