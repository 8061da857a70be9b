"""Cache of judge verdicts keyed by a hash of (judge model, rubric, prompt, story).

The key uses the *judge-visible* prompt and story (length sentence removed, reasoning before
``</think>`` stripped), so outputs that differ only in hidden reasoning share one verdict. Only
successful scores are cached: a masked sample is retried on the next run instead of being
remembered as a failure.

Two ways to persist it, both safe against a kill at any moment:

* ``save``: the whole cache to a temporary sibling, then ``os.replace`` (training saves it with
  each checkpoint);
* ``journal``: every new verdict appended as one JSON line to ``<path>.journal`` and flushed as
  it arrives (``rlsys judge score``), so a killed run loses no answered request. ``load`` reads
  the snapshot and its journal; ``save`` to the same path folds the journal into the snapshot.
  A torn last line (a crash mid-write) is cut off, never parsed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import IO, Any

from rlsys.atomic import write_file

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
FSYNC_EVERY_S = 1.0  # flushed per entry (survives a killed process); fsync'd at most this often


def cache_key(model: str, rubric_fingerprint: str, prompt: str, story: str) -> str:
    """SHA-256 over length-prefixed fields (no ambiguity between field boundaries)."""
    h = hashlib.sha256()
    for part in (model, rubric_fingerprint, prompt, story):
        b = part.encode()
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def journal_path(path: str | Path) -> Path:
    return Path(f"{path}.journal")


def complete_lines(path: Path) -> list[bytes]:
    """The file's complete lines; a torn (unterminated) tail is truncated away so that appends
    start on a fresh line."""
    data = path.read_bytes()
    good = data.rfind(b"\n") + 1
    if good != len(data):
        log.warning("%s: truncating a partial last line (%d bytes)", path, len(data) - good)
        os.truncate(path, good)
    return data[:good].splitlines()


class JudgeCache:
    """In-memory ``key -> verdict`` map with atomic snapshots and an optional append-only journal."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Any]] = {}
        self._journal: IO[str] | None = None
        self._journal_path: Path | None = None
        self._synced = 0.0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> dict[str, Any] | None:
        return self._entries.get(key)

    def put(self, key: str, verdict: dict[str, Any]) -> None:
        """Store a verdict: a JSON-serialisable dict with at least ``score``; journaled at once
        when a journal is open."""
        if verdict.get("score") is None:
            raise ValueError("only scored verdicts are cached")
        self._entries[key] = verdict
        if self._journal is not None:
            self._journal.write(json.dumps({"key": key, "verdict": verdict}) + "\n")
            self._journal.flush()  # in the OS now: survives a SIGKILL of this process
            if time.monotonic() - self._synced >= FSYNC_EVERY_S:
                self._sync()

    def _sync(self) -> None:
        if self._journal is not None:
            os.fsync(self._journal.fileno())
            self._synced = time.monotonic()

    def journal(self, path: str | Path) -> None:
        """From now on append every new verdict to ``<path>.journal`` (``path`` is the snapshot)."""
        self.close_journal()
        jp = journal_path(path)
        jp.parent.mkdir(parents=True, exist_ok=True)
        if jp.exists():
            complete_lines(jp)  # cut a torn tail so the next entry starts on its own line
        self._journal, self._journal_path = jp.open("a"), jp
        self._synced = time.monotonic()

    def close_journal(self) -> None:
        """Stop journaling; an empty journal (folded into a snapshot by ``save``) is removed."""
        if self._journal is not None and self._journal_path is not None:
            self._sync()
            self._journal.close()
            if self._journal_path.exists() and self._journal_path.stat().st_size == 0:
                self._journal_path.unlink()
            self._journal = self._journal_path = None

    def save(self, path: str | Path) -> None:
        """Atomic snapshot. If this cache journals next to ``path``, the journal is folded in
        (emptied once the snapshot that holds its entries is in place)."""
        write_file(path, json.dumps({"version": FORMAT_VERSION, "entries": self._entries}))
        if self._journal is not None and self._journal_path == journal_path(path):
            self._journal.truncate(0)
            self._journal.flush()
            self._sync()

    def load(self, path: str | Path) -> int:
        """Merge entries from ``path`` and its journal (missing files = nothing); return how
        many were read."""
        path = Path(path)
        n = 0
        if path.exists():
            data = json.loads(path.read_text())
            if data.get("version") != FORMAT_VERSION:
                raise ValueError(f"{path}: unsupported judge cache version {data.get('version')!r}")
            entries = data.get("entries", {})
            self._entries.update(entries)
            n += len(entries)
        jp = journal_path(path)
        if jp.exists():
            bad = 0
            for line in complete_lines(jp):
                try:
                    rec = json.loads(line)
                    key, verdict = rec["key"], rec["verdict"]
                except (ValueError, KeyError, TypeError):
                    bad += 1
                    continue
                if isinstance(verdict, dict) and verdict.get("score") is not None:
                    self._entries[key] = verdict
                    n += 1
                else:
                    bad += 1
            if bad:
                log.warning("%s: skipped %d unreadable journal lines", jp, bad)
        return n
