"""LLM judge pool: cluster-wide rate limits, fault-tolerant scoring, cache, autoscaling workers.

Entry point for training and the CLI: :class:`rlsys.judge.pool.JudgeScorer` (docs/JUDGE.md).
Importing this package does not import Ray.
"""

from rlsys.judge.config import JudgeConfig, MissingApiKeyError, load_judge_config
from rlsys.judge.pool import JudgeScorer

__all__ = ["JudgeConfig", "JudgeScorer", "MissingApiKeyError", "load_judge_config"]
