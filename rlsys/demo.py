"""`rlsys demo [RECIPE] [section.key=value ...]`: one command per recipe on the embedded model.

Makes the recipe's synthetic data when it is missing, then runs `rlsys train` on the recipe's
config. POLARIS needs a judge: with GEMINI_API_KEY set it is Gemini (configs/judge_gemini.yaml);
without, the command starts the rule-based stand-in judge on 127.0.0.1 (rlsys/judge/standin.py)
for the run's length and says so. Overrides go to `rlsys train` unchanged.
"""
from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

log = logging.getLogger(__name__)

GEMINI_KEY_ENV = "GEMINI_API_KEY"


@dataclass(frozen=True)
class Demo:
    config: str
    """The recipe's config (its data.path is where the synthetic data goes)."""
    make_data: Callable[[Path], object]
    """Writes the synthetic dataset into a directory (data.path's parent)."""
    judge: bool = False
    """Needs an LLM judge (the sq channel)."""


def _episodebench(out: Path) -> object:
    from rlsys.data.synth import write_dataset
    return write_dataset(out, 12, 1, "parquet", 0.0)


def _polaris(out: Path) -> object:
    from rlsys.data.polaris import write_polaris_dataset
    return write_polaris_dataset(out, 40, 0, "parquet")


def _storyteller(out: Path) -> object:
    from rlsys.data.storyteller import write_storyteller_dataset
    return write_storyteller_dataset(out, 30, 0, "parquet")


DEMOS = {
    "episodebench": Demo("configs/demo.yaml", _episodebench),
    "polaris": Demo("configs/polaris.yaml", _polaris, judge=True),
    "polaris-no-hri": Demo("configs/polaris_no_hri.yaml", _polaris, judge=True),
    "dpo": Demo("configs/storyteller_dpo.yaml", _storyteller),
}


def _standin_judge_config(base_url: str, where: Path) -> Path:
    """configs/judge_local.yaml pointed at the stand-in (no key, no price)."""
    from rlsys.atomic import write_file
    from rlsys.judge import load_judge_config

    cfg = load_judge_config("configs/judge_local.yaml").model_dump(mode="json")
    cfg.update(name="standin", base_url=base_url, model="rule-based-standin", api_key_env=None, timeout_s=60)
    return write_file(where / "judge_standin.yaml", yaml.safe_dump(cfg))  # atomic: a run's config refers to it


def demo_main(argv: list[str]) -> int:
    from rlsys.cli import _train
    from rlsys.config import ConfigError, TrainConfig, config_tree

    recipe = argv[0] if argv and "=" not in argv[0] else "episodebench"
    overrides = argv[1:] if argv and "=" not in argv[0] else list(argv)
    if recipe not in DEMOS:
        log.error("unknown demo %r; one of: %s", recipe, ", ".join(DEMOS))
        return 2
    demo = DEMOS[recipe]
    try:  # the data path after overrides, before anything checks that the file exists
        tree = config_tree(demo.config, overrides)
        data_path = Path(str(tree["data"]["path"]))
    except (ConfigError, KeyError, TypeError) as e:
        log.error("%s: no data.path (%s)", demo.config, e)
        return 2
    out_dir = Path(str((tree.get("train") or {}).get("output_dir", TrainConfig().output_dir)))
    if not data_path.is_file():
        log.info("making the %s demo data in %s", recipe, data_path.parent)
        demo.make_data(data_path.parent)
    judge = nullcontext(None)
    if demo.judge and not any(o.startswith("reward.judge=") for o in overrides):
        if os.environ.get(GEMINI_KEY_ENV):
            log.info("%s is set: the judge is Gemini (configs/judge_gemini.yaml)", GEMINI_KEY_ENV)
            overrides = [*overrides, "reward.judge=configs/judge_gemini.yaml"]
        else:
            from rlsys.judge.standin import StandinJudge
            judge = StandinJudge()
    with judge as standin:
        if standin is not None:
            log.warning("%s is not set: judging with the rule-based STAND-IN judge at %s (rules, not an LLM: "
                        "rlsys/judge/standin.py). Export %s to judge with Gemini.",
                        GEMINI_KEY_ENV, standin.base_url, GEMINI_KEY_ENV)
            out_dir.mkdir(parents=True, exist_ok=True)  # kept with the run, next to its config.yaml
            overrides = [*overrides, f"reward.judge={_standin_judge_config(standin.base_url, out_dir)}"]
        return _train([demo.config, *overrides])
