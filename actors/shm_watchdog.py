"""Unlinks a vLLM engine's shared-memory ring buffers once the rollout actor that owns them is
gone, however it went (SIGKILL, OOM kill, `ray job stop`): a killed engine cannot clean up after
itself, and each leaked /dev/shm segment holds up to ~400 MB of the machine's memory.

Started by `RolloutWorker` as its own process session (so it outlives the actor):
    python shm_watchdog.py <actor pid> <segment name> ...
It waits for the actor to exit, then for no live process to map the segments (the engine's own
processes follow their parent within seconds), then unlinks those that are still there. A
clean shutdown has already unlinked them: then there is nothing to do.
"""
from __future__ import annotations

import os
import sys
import time

POLL_S = 1.0
GRACE_S = 120.0  # how long the engine's processes may keep a segment mapped after the actor died


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _mapped(names: set[str]) -> set[str]:
    found: set[str] = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps") as f:
                found.update(n for line in f if "/dev/shm/" in line for n in names if line.rstrip().endswith(n))
        except OSError:  # the process ended while we read: it maps nothing any more
            continue
    return found


def main(argv: list[str]) -> int:
    owner, names = int(argv[0]), set(argv[1:])
    while _alive(owner):
        time.sleep(POLL_S)
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline:
        left = {n for n in names if os.path.exists(f"/dev/shm/{n}")}
        if not left:
            return 0
        if not _mapped(left):
            for n in left:
                try:
                    os.unlink(f"/dev/shm/{n}")
                except FileNotFoundError:  # unlinked by someone else meanwhile: fine
                    pass
            return 0
        time.sleep(POLL_S)
    return 1  # still mapped after the grace period: a live process uses them, leave them


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
