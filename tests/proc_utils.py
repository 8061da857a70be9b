"""Finding the processes a test started, by a string their command line contains (a private
Ray's temp dir): they are stopped by PID, never with `ray stop`."""
from __future__ import annotations

import os
from pathlib import Path


def pids_mentioning(text: str) -> list[int]:
    """PIDs of the live processes whose command line contains `text`."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if text in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                out.append(int(pid))
        except OSError:  # the process ended while we looked: it mentions nothing any more
            continue
    return out
