"""Pick the reader for a run's data: ``data.format`` names the row schema of ``data.path``."""
from __future__ import annotations

from rlsys.config import DataConfig


def load_for_config(data_cfg: DataConfig) -> list:
    """Examples for the loop: ``TurnExample`` (episodebench), ``PolarisExample`` (polaris) or
    ``PromptExample`` (prompt: your own task, see rlsys.data.prompts).

    Both carry ``uid`` and ``messages``, all the rollout side needs; the reward actor reads the
    rest of the example (``dataclasses.asdict``) for its recipe.
    """
    if data_cfg.format == "polaris":
        from rlsys.data.polaris import load_polaris

        return load_polaris(data_cfg.path, split=data_cfg.split, limit=data_cfg.limit)
    if data_cfg.format == "prompt":
        from rlsys.data.prompts import load_prompts

        return load_prompts(data_cfg.path, split=data_cfg.split, limit=data_cfg.limit)
    if data_cfg.format == "episodebench":
        from rlsys.data.episodebench import load_examples

        return load_examples(data_cfg.path, split=data_cfg.split, limit=data_cfg.limit)
    raise ValueError(f"data.format {data_cfg.format!r} has no reader")
