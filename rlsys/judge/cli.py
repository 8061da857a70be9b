"""``rlsys judge score <judge.yaml> --input stories.jsonl --output scores.jsonl``.

Input lines: ``{"id", "prompt", "story"}``. Output: one line per input, ``{"id", "score",
"masked": false}`` or ``{"id", "masked": true, "reason"}``. Same ``JudgeScorer`` as training.

Why it is built this way:

* no chunks: up to ``--in-flight`` stories are with the judge at once and a new one starts as
  soon as any finishes (``JudgeScorer.score_stream``), so a story that is retrying holds back
  no other;
* every result is appended to the output (and its verdict to the cache journal,
  ``<cache>.journal``) the moment it arrives, flushed at once and fsync'd at least every second:
  a kill at any moment leaves complete lines (a torn last line is cut off on resume), and a
  re-run skips every id already in the output and answers the rest from the cache where it can,
  so no answered request is sent again;
* lines are written in the order results arrive; when every input has its line, the file is
  rewritten atomically in input order and the journal is folded into the cache file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from rlsys.atomic import write_file
from rlsys.judge.cache import complete_lines
from rlsys.judge.client import JudgeFatalError
from rlsys.judge.config import JudgeConfigError, MissingApiKeyError, load_judge_config

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlsys judge", description="LLM judge tools")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score", help="score a JSONL file of stories")
    s.add_argument("config", help="judge YAML config")
    s.add_argument("--input", required=True, help="JSONL with id, prompt, story")
    s.add_argument("--output", required=True, help="JSONL to write (resumed if present)")
    s.add_argument("--cache", help="judge cache file (default: <output>.cache.json)")
    s.add_argument("--backend", choices=["local", "ray"], default="local", help="in-process client or Ray worker pool")
    s.add_argument("--ray-address", default=None, help="Ray cluster address for --backend ray (default: start a local one)")
    s.add_argument("--in-flight", "--chunk", dest="in_flight", type=int, default=256,
                   help="stories with the judge at once; a new one starts as soon as one finishes "
                        "(--chunk is its old name)")
    s.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


FSYNC_EVERY_S = 1.0


def _done_ids(path: Path) -> set[str]:
    """Ids already in the output; truncates a torn (unterminated/invalid) tail."""
    if not path.exists():
        return set()
    done: set[str] = set()
    good = 0
    with path.open("rb") as f:
        for line in f:
            try:
                rec = json.loads(line) if line.endswith(b"\n") else None
            except ValueError:
                rec = None
            if not isinstance(rec, dict) or "id" not in rec:
                break
            done.add(str(rec["id"]))
            good += len(line)
    if good != path.stat().st_size:
        log.warning("%s: truncating a partial last line", path)
        os.truncate(path, good)
    return done


class _Appender:
    """Append-only JSONL writer: each line flushed at once (a killed process loses nothing that
    was written), fsync'd at most every ``FSYNC_EVERY_S`` and on ``sync()`` (a host crash)."""

    def __init__(self, f: IO[str]) -> None:
        self.f, self._synced = f, time.monotonic()

    def write(self, rec: dict[str, Any]) -> None:
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        if time.monotonic() - self._synced >= FSYNC_EVERY_S:
            self.sync()

    def sync(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self._synced = time.monotonic()


def _in_input_order(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite the finished output atomically with its lines in input order (ids the input does
    not have, e.g. from an older input file, stay at the end in their order)."""
    lines = complete_lines(path)
    ids = [str(json.loads(x)["id"]) for x in lines]
    rank = {r["id"]: n for n, r in enumerate(rows)}
    order = sorted(range(len(lines)), key=lambda k: (rank.get(ids[k], len(rank)), k))
    if order != list(range(len(lines))):
        write_file(path, b"".join(lines[k] + b"\n" for k in order))


def _read_inputs(path: Path) -> list[dict[str, Any]]:
    rows, seen = [], set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            raise ValueError(f"{path}:{n}: not valid JSON") from None
        if not isinstance(rec, dict) or "id" not in rec:
            raise ValueError(f"{path}:{n}: missing 'id'")
        rid = str(rec["id"])
        if rid in seen:
            raise ValueError(f"{path}:{n}: duplicate id {rid!r}")
        seen.add(rid)
        rows.append({**rec, "id": rid})
    return rows


def _record(rid: str, res: dict[str, Any]) -> dict[str, Any]:
    if res["masked"]:
        return {"id": rid, "masked": True, "reason": res["reason"]}
    return {"id": rid, "score": res["score"], "masked": False, **({"note": res["reason"]} if res["reason"] else {})}


def _score(args: argparse.Namespace) -> int:
    from rlsys.judge.pool import JudgeScorer  # after arg parsing: keeps --help fast

    cfg = load_judge_config(args.config)
    out_path, cache_path = Path(args.output), Path(args.cache or f"{args.output}.cache.json")
    if args.in_flight < 1:
        raise ValueError(f"--in-flight must be >= 1, got {args.in_flight}")
    rows = _read_inputs(Path(args.input))
    done = _done_ids(out_path)
    todo = [r for r in rows if r["id"] not in done]
    started_ray = False
    if args.backend == "ray":
        import ray

        if not ray.is_initialized():
            ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=False)
            started_ray = True
    scorer = JudgeScorer(cfg, backend=args.backend)
    try:
        scorer.load_cache(cache_path)
        scorer.cache.journal(cache_path)  # every new verdict is on disk before its output line
        with out_path.open("a") as f, tqdm(total=len(rows), initial=len(rows) - len(todo), unit="story",
                                           disable=args.no_progress, file=sys.stderr) as bar:
            out = _Appender(f)
            try:
                ok = [r for r in todo if isinstance(r.get("prompt"), str) and isinstance(r.get("story"), str)]
                for r in todo:
                    if not (isinstance(r.get("prompt"), str) and isinstance(r.get("story"), str)):
                        out.write({"id": r["id"], "masked": True, "reason": "invalid_input:prompt and story must be strings"})
                        bar.update(1)
                for i, res in scorer.score_stream(ok, window=args.in_flight):
                    out.write(_record(ok[i]["id"], res))
                    bar.update(1)
            finally:
                out.sync()
        _in_input_order(out_path, rows)
        scorer.save_cache(cache_path)  # folds the journal into the cache file
        summary = scorer.metrics_summary()
        print(json.dumps({"judge_summary": summary}, sort_keys=True), file=sys.stderr)
    finally:
        scorer.close()
        if started_ray:
            import ray

            ray.shutdown()
    return 0


def main(argv: list[str]) -> int:
    """Entry point for ``rlsys judge ...``; returns a process exit code."""
    args = _parser().parse_args(argv)
    try:
        return _score(args)
    except (JudgeConfigError, MissingApiKeyError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except JudgeFatalError as e:
        print(f"error: {e} (every result so far is saved; re-run to resume)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
