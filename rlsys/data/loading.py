"""Pick the reader for a run's data: ``data.format`` names the row schema of ``data.path``."""
from __future__ import annotations

from rlsys.config import DataConfig


def load_for_config(data_cfg: DataConfig) -> list:
    """Examples for the loop: ``TurnExample`` (episodebench), ``PolarisExample`` (polaris),
    ``StorytellerExample`` (storyteller) or ``PromptExample`` (prompt: your own task, see
    rlsys.data.prompts).

    Both carry ``uid`` and ``messages``, all the rollout side needs; the reward actor reads the
    rest of the example (``dataclasses.asdict``) for its recipe.
    """
    if data_cfg.format == "polaris":
        from rlsys.data.polaris import load_polaris

        return load_polaris(data_cfg.path, split=data_cfg.split, limit=data_cfg.limit)
    if data_cfg.format == "storyteller":
        from rlsys.data.storyteller import load_storyteller

        return load_storyteller(data_cfg.path, split=data_cfg.split, limit=data_cfg.limit)
    if data_cfg.format == "prompt":
        from rlsys.data.prompts import load_prompts

        return load_prompts(data_cfg.path, split=data_cfg.split, limit=data_cfg.limit)
    if data_cfg.format == "episodebench":
        from rlsys.data.episodebench import load_examples

        return load_examples(data_cfg.path, split=data_cfg.split, limit=data_cfg.limit)
    raise ValueError(f"data.format {data_cfg.format!r} has no reader")


def check_reward_fields(reward_cfg, channels: list[str], examples: list, source: str) -> None:
    """Fail before Ray starts when an active reward channel needs a field (data column) that
    some rows lack, naming the channel, the field, the data file and the fixes."""
    from rewards.registry import missing_fields
    from rlsys.config import ConfigError
    from rlsys.data.prompts import example_fields

    per_row = [set(example_fields(e)) for e in examples]
    common = set.intersection(*per_row) if per_row else set()
    lacking = missing_fields(reward_cfg, channels, sorted(common))
    if lacking:
        problems = "; ".join(f"{ch} needs {', '.join(fields)}" for ch, fields in lacking.items())
        raise ConfigError(f"reward channels need data fields that rows of {source} lack: {problems}. "
                          f"Fields every row has: {sorted(common)}. Add the column to the data, give the "
                          "function parameter a default, or set it in reward.functions.<name>.kwargs.")


def load_for_run(cfg) -> list:
    """A run's examples (`load_for_config`), checked: enough for one step, and every field the
    active reward channels need present in every row."""
    examples = load_for_config(cfg.data)
    if len(examples) < cfg.rollout.prompts_per_step:
        raise ValueError(f"data.path has {len(examples)} prompts, fewer than rollout.prompts_per_step "
                         f"({cfg.rollout.prompts_per_step})")
    check_reward_fields(cfg.reward, cfg.reward.active_channels(), examples, cfg.data.path)
    hri = cfg.algorithm.reference_injection
    if hri.enabled:
        from rlsys.config import ConfigError
        from rlsys.data.prompts import example_fields

        for i, e in enumerate(examples):
            ref = example_fields(e).get(hri.field)
            if not isinstance(ref, str) or not ref.strip():
                raise ConfigError(f"algorithm.reference_injection is on but row {i} (uid {e.uid!r}) of "
                                  f"{cfg.data.path} has no text in field {hri.field!r} (got {type(ref).__name__}); "
                                  "set reference_injection.field, or turn it off")
    return examples
