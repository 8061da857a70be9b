"""``rlsys judge score <judge.yaml> --input stories.jsonl --output scores.jsonl``.

Input lines: ``{"id", "prompt", "story"}``. Output: one line per input, ``{"id", "score",
"masked": false}`` or ``{"id", "masked": true, "reason"}``, appended chunk by chunk and fsync'd,
so a re-run skips every id already in the output (a torn last line is truncated away) and judge
results are also kept in a cache file next to the output. Same ``JudgeScorer`` as training.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

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
    s.add_argument("--chunk", type=int, default=64, help="samples scored and written per step")
    s.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def _done_ids(path: Path) -> set[str]:
    """Ids already in the output; truncates a torn (unterminated/invalid) final line."""
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
        with out_path.open("a") as out, tqdm(total=len(rows), initial=len(rows) - len(todo), unit="story",
                                             disable=args.no_progress, file=sys.stderr) as bar:
            for i in range(0, len(todo), args.chunk):
                chunk = todo[i:i + args.chunk]
                bad = {r["id"] for r in chunk if not isinstance(r.get("prompt"), str) or not isinstance(r.get("story"), str)}
                ok = [r for r in chunk if r["id"] not in bad]
                res = dict(zip((r["id"] for r in ok), scorer.score_items(ok)))
                for r in chunk:
                    rec = (_record(r["id"], res[r["id"]]) if r["id"] in res
                           else {"id": r["id"], "masked": True, "reason": "invalid_input:prompt and story must be strings"})
                    out.write(json.dumps(rec) + "\n")
                out.flush()
                os.fsync(out.fileno())
                scorer.save_cache(cache_path)
                bar.update(len(chunk))
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
        print(f"error: {e} (completed chunks are saved; re-run to resume)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
