"""`rlsys` command line: train, eval, demo, data synth, judge score, config-help, channels.

Configuration and data problems are reported as one readable message and exit code 2, before
any cluster is started.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys

USAGE = """rlsys <command> ...
  train <recipe.yaml> [section.key=value ...] [--resume auto|PATH]
                                                run GRPO (starts or joins Ray); --resume continues
                                                from a checkpoint (train.save_every)
  eval <recipe.yaml> --model CKPT [--model CKPT2] [--k 7] [--limit N] [--out DIR]
                                                sample k per prompt, score, report the model
                                                card's metrics (table, eval.json, eval.png)
  data synth --out DIR [--stories N] [--seed S] synthetic EpisodeBench data (recipe A)
  data synth-polaris --out DIR [--n N] [--seed S] synthetic prompt/story data (recipe B)
  data synth-storyteller --out DIR [--n N] [--seed S]
                                                synthetic real/shuffled frame sequences (recipe C)
  judge score <judge.yaml> --input F --output F score stories with an LLM judge
  config-help                                   every config key with its docstring
  channels                                      the built-in reward channels (reward.weights names)
  demo [episodebench|polaris|polaris-no-hri|dpo] [section.key=value ...]
                                                one recipe on the embedded model: its data made if
                                                missing; POLARIS judged by Gemini with GEMINI_API_KEY,
                                                else by a rule-based stand-in on 127.0.0.1"""


def _setup_logging(log_file: str | None = None) -> None:
    """INFO to the console and, for `train`, everything to the run's train.log. The per-step
    metric lines go to the file only: on the console the progress bar shows them."""
    console = logging.StreamHandler()
    handlers: list[logging.Handler] = [console]
    if log_file:
        console.addFilter(lambda record: record.name != "rlsys.tracking")
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _channels() -> int:
    from rewards.registry import BUILTIN_CHANNELS

    for b in BUILTIN_CHANNELS.values():
        needs = f"  [data: {', '.join(b.requires)}]" if b.requires else ""
        print(f"  {b.name:<9} per {b.per:<6} {b.doc}{needs}")
    print("Your own: reward.functions (see README, 'Your own task').")
    return 0


def _config_help() -> int:
    from pydantic import BaseModel

    from rlsys.config import RunConfig

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
                continue
            default = "required" if field.is_required() else f"default {field.default!r}"
            doc = " ".join((field.description or "").split())
            print(f"{prefix}{name}  ({default})\n    {doc}")
    walk(RunConfig, "")
    return 0


def _train(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="rlsys train")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted.key=value")
    p.add_argument("--resume", metavar="auto|PATH", default=None,
                   help="continue from a checkpoint: 'auto' = the newest complete one in "
                        "train.output_dir/checkpoints (a fresh start if there is none), or a checkpoint directory")
    args = p.parse_args(argv)
    from rlsys.config import ConfigError, load_config
    from rlsys.data.episodebench import DataError
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"rlsys: {e}", file=sys.stderr)
        return 2
    from pathlib import Path
    Path(cfg.train.output_dir).mkdir(parents=True, exist_ok=True)
    _setup_logging(str(Path(cfg.train.output_dir) / "train.log"))
    from tqdm.contrib.logging import logging_redirect_tqdm

    from rlsys.checkpoint import resolve
    from rlsys.cluster import ActorFailure, PlacementError
    from rlsys.train import train

    def last_checkpoint() -> str:
        last = resolve("auto", cfg.train.output_dir)
        return f"{last} (continue with --resume auto)" if last else "none"

    # `ray job stop`, `kill` and schedulers send SIGTERM first: unwind through train()'s cleanup
    # (engines stop and free their shared memory, logs are closed) instead of dying mid-write.
    # A second SIGTERM during that cleanup kills at once.
    sigterm_received = False

    def on_sigterm(signum, frame):
        nonlocal sigterm_received
        sigterm_received = True
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated()
    signal.signal(signal.SIGTERM, on_sigterm)
    log = logging.getLogger("rlsys")
    try:
        with logging_redirect_tqdm():
            train(cfg, resume=args.resume)
    except BaseException as e:
        # Terminated can surface wrapped: raised while Ray's Cython code runs a Python callback
        # (deserialising a result in ray.get), it comes out as a SystemError. Whatever the
        # unwinding raised, a run that received SIGTERM was stopped by it.
        if sigterm_received:
            log.error("stopped by SIGTERM. Last checkpoint: %s", last_checkpoint())
            return 128 + signal.SIGTERM
        if isinstance(e, (DataError, ValueError)):  # includes ConfigError and CheckpointError
            log.error("%s", e)
            return 2
        if isinstance(e, (ActorFailure, PlacementError)):
            log.error("run failed: %s. Last checkpoint: %s", e, last_checkpoint())
            return 1
        raise
    return 0


class Terminated(BaseException):
    """SIGTERM arrived (raised in the main thread so that every cleanup runs; a BaseException so
    that no `except Exception` on the way swallows it)."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        return _train(rest)
    if cmd == "data" and rest[:1] == ["synth"]:
        _setup_logging()
        from rlsys.data.synth import synth_main
        return synth_main(rest[1:]) or 0
    if cmd == "data" and rest[:1] == ["synth-polaris"]:
        _setup_logging()
        from rlsys.data.polaris import polaris_synth_main
        return polaris_synth_main(rest[1:]) or 0
    if cmd == "data" and rest[:1] == ["synth-storyteller"]:
        _setup_logging()
        from rlsys.data.storyteller import storyteller_synth_main
        return storyteller_synth_main(rest[1:]) or 0
    if cmd == "judge":
        _setup_logging()
        from rlsys.judge.cli import main as judge_main
        return judge_main(rest)
    if cmd == "channels":
        return _channels()
    if cmd == "eval":
        _setup_logging()
        from rlsys.evaluate import eval_main
        return eval_main(rest)
    if cmd == "demo":
        _setup_logging()
        from rlsys.demo import demo_main
        return demo_main(rest)
    if cmd == "config-help":
        return _config_help()
    print(f"rlsys: unknown command {' '.join(argv[:2])!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
