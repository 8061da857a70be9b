"""Whole-run checkpoints: everything a run needs to continue exactly where it stopped.

Layout under `<train.output_dir>/checkpoints/`::

    step-000004/
        learner/        DeepSpeed state of every rank: partitioned weights, optimizer, RNG
        hf/             Hugging Face export of the policy (transformers and vLLM load it)
        judge_cache-<i>.json   reward-side state (recipe B)
        state.json      driver: step, policy version, prompt-stream position, config -- written last
    latest              the name of the newest complete checkpoint -- moved last

A checkpoint is built under a temporary name and renamed into place only when complete, then
`latest` is replaced (rlsys.atomic), so a kill at any moment leaves the previous checkpoint
loadable and `--resume auto` uses it. Only the last `train.keep_checkpoints` are kept.

The learner's files are written by every rank into the same directory: on a multi-node cluster
`train.output_dir` must be on storage every node sees (shared filesystem).
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rlsys.atomic import remove_stale_temporaries, staging_dir, write_file

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
LATEST = "latest"
_NAME = re.compile(r"^step-(\d+)$")
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from, said in words."""


@dataclass
class RunState:
    """The driver's part of a checkpoint."""
    step: int
    policy_version: int
    stream: dict[str, int]
    config: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def is_complete(ckpt: Path) -> bool:
    return (ckpt / STATE_FILE).is_file()


def save(run, output_dir: str | Path, state: RunState, keep: int) -> Path:
    """Write a checkpoint of `run` (a GRPORun) at `state.step`, move `latest`, prune old ones."""
    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(root)  # what a killed earlier save left behind
    dest = root / f"step-{state.step:06d}"
    with staging_dir(dest) as tmp:
        run.save_checkpoint(str(tmp))
        write_file(tmp / STATE_FILE, json.dumps(asdict(state), indent=1))
    write_file(root / LATEST, dest.name + "\n")
    for old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def save_if_due(run, cfg, step: int, stream_state: dict[str, int]) -> Path | None:
    """Checkpoint after `step` when `train.save_every` says so (and after the last step);
    `stream_state`: the prompt stream's position after the last trained prompts."""
    tc = cfg.train
    if not tc.save_every or (step % tc.save_every and step != tc.steps):
        return None
    path = save(run, tc.output_dir, RunState(step, run.version, dict(stream_state), cfg.model_dump(mode="json")),
                tc.keep_checkpoints)
    log.info("checkpoint: %s", path)
    return path


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


def resolve(resume: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: None (start fresh), `auto` (the newest complete one in
    this run's directory, None if there is none), or an explicit checkpoint directory."""
    if not resume:
        return None
    if resume == "auto":
        root = checkpoints_dir(output_dir)
        pointer = root / LATEST
        if pointer.is_file():
            named = root / pointer.read_text().strip()
            if is_complete(named):
                return named
            log.warning("%s names %s, which is not a complete checkpoint; using the newest complete one",
                        pointer, named.name)
        found = complete_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume).expanduser()
    if path.is_dir() and (path / LATEST).is_file():  # a checkpoints/ directory was given
        path = path / (path / LATEST).read_text().strip()
    if not is_complete(path):
        raise CheckpointError(f"--resume {resume}: {path} is not a complete rlsys checkpoint "
                              f"(no {STATE_FILE}); give a checkpoints/step-N directory or 'auto'")
    return path


def load_state(ckpt: Path) -> RunState:
    data = json.loads((ckpt / STATE_FILE).read_text())
    if data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{ckpt}: checkpoint format {data.get('format_version')!r}, "
                              f"this rlsys reads {FORMAT_VERSION}")
    return RunState(**data)


# Settings that change what a resumed run computes, or the layout of the learner's DeepSpeed
# state (ranks, ZeRO stage: `learner.zero_stage: auto` picks one rank's stage by the weights'
# dtype): a mismatch is reported, not silently mixed.
_MUST_MATCH = ("seed", "model.path", "data.path", "data.format", "rollout.prompts_per_step",
               "rollout.group_size", "learner.num_ranks", "learner.zero_stage")


def config_differences(saved: dict, current: dict) -> list[str]:
    """Dotted keys of `_MUST_MATCH` whose values differ between the checkpoint and this run."""
    def get(tree, dotted):
        for k in dotted.split("."):
            tree = tree.get(k) if isinstance(tree, dict) else None
        return tree
    return [f"{k}: checkpoint {get(saved, k)!r}, now {get(current, k)!r}"
            for k in _MUST_MATCH if get(saved, k) != get(current, k)]


def start_state(ckpt: Path | None, config: dict) -> RunState:
    """Where a run starts: step 0, or the checkpoint's state. A checkpoint made under settings
    that change what the run computes (seed, model, data, batch shape, ranks, ZeRO stage) is refused."""
    if ckpt is None:
        return RunState(step=0, policy_version=0, stream={"epoch": 0, "index": 0}, config=config)
    state = load_state(ckpt)
    diffs = config_differences(state.config, config)
    if diffs:
        raise CheckpointError(f"cannot resume from {ckpt}: the configuration differs in "
                              + "; ".join(diffs) + " (use the checkpoint's settings or another output_dir)")
    return state
