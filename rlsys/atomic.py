"""The one way rlsys writes files a user relies on: complete or not there at all.

A file is written to a temporary sibling, flushed to disk and renamed over its destination
(rename(2) is atomic within a filesystem), so a kill at any moment leaves either the old
content or the new one. A directory is built in a temporary sibling and renamed into place the
same way; an existing destination is first renamed aside (rename cannot replace a non-empty
directory) and removed only after the new one is in place. Temporary names start with a dot
and contain ".tmp-", so readers and cleaners can tell them apart.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

TMP_TAG = ".tmp-"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # best effort: directory fsync is unsupported on some filesystems (not an error)
    finally:
        os.close(fd)


def write_file(path: str | os.PathLike, data: bytes | str) -> Path:
    """Atomically replace `path` with `data` (str is written as UTF-8)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_TAG}", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; outputs are meant to be read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def replace_dir(src: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Move the complete directory `src` to `dest`, replacing whatever is there."""
    src, dest = Path(src), Path(dest)
    old: Path | None = None
    if dest.exists() and not (dest.is_dir() and not any(dest.iterdir())):
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old{TMP_TAG}", dir=dest.parent))
        os.replace(dest, old / dest.name)
    os.replace(src, dest)
    _fsync_dir(dest.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dest


@contextlib.contextmanager
def staging_dir(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary sibling of `dest`; when the block succeeds it becomes `dest`
    (replacing any previous one), when it raises (or the process dies) `dest` is untouched."""
    dest = Path(dest).expanduser().resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}{TMP_TAG}", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; checkpoints and models are meant to be shared
    try:
        yield tmp
        replace_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temporaries(directory: str | os.PathLike) -> int:
    """Delete what killed writers left in `directory` (dot-names containing TMP_TAG)."""
    n = 0
    d = Path(directory)
    if not d.is_dir():
        return 0
    for p in d.iterdir():
        if p.name.startswith(".") and TMP_TAG in p.name:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            n += 1
    return n
