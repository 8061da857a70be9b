"""Cache of judge verdicts keyed by a hash of (judge model, rubric, prompt, story).

The key uses the *judge-visible* prompt and story (length sentence removed, reasoning before
``</think>`` stripped), so outputs that differ only in hidden reasoning share one verdict. Only
successful scores are cached: a masked sample is retried on the next run instead of being
remembered as a failure. Files are written to a temporary sibling and ``os.replace``d, so a
crash mid-save leaves the previous file intact (saved with checkpoints).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from rlsys.atomic import write_file

FORMAT_VERSION = 1


def cache_key(model: str, rubric_fingerprint: str, prompt: str, story: str) -> str:
    """SHA-256 over length-prefixed fields (no ambiguity between field boundaries)."""
    h = hashlib.sha256()
    for part in (model, rubric_fingerprint, prompt, story):
        b = part.encode()
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


class JudgeCache:
    """In-memory ``key -> verdict`` map with atomic JSON persistence."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> dict[str, Any] | None:
        return self._entries.get(key)

    def put(self, key: str, verdict: dict[str, Any]) -> None:
        """Store a verdict: a JSON-serialisable dict with at least ``score``."""
        if verdict.get("score") is None:
            raise ValueError("only scored verdicts are cached")
        self._entries[key] = verdict

    def save(self, path: str | Path) -> None:
        write_file(path, json.dumps({"version": FORMAT_VERSION, "entries": self._entries}))

    def load(self, path: str | Path) -> int:
        """Merge entries from ``path`` (missing file = nothing); return how many were read."""
        path = Path(path)
        if not path.exists():
            return 0
        data = json.loads(path.read_text())
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported judge cache version {data.get('version')!r}")
        entries = data.get("entries", {})
        self._entries.update(entries)
        return len(entries)
