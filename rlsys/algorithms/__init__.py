"""Algorithms as registries, so a recipe picks its advantage estimator and loss by name.

Nothing here knows about Ray, vLLM or DeepSpeed: inputs are plain tensors.
"""
from rlsys.algorithms.registry import (ADVANTAGE_ESTIMATORS, POLICY_LOSSES, PREFERENCE_LOSSES, register_advantage,
                                       register_loss, register_preference_loss)
from rlsys.algorithms import advantages as _advantages  # noqa: F401  (registers estimators)
from rlsys.algorithms import losses as _losses  # noqa: F401  (registers losses)
from rlsys.algorithms import preference as _preference  # noqa: F401  (registers preference losses)

__all__ = ["ADVANTAGE_ESTIMATORS", "POLICY_LOSSES", "PREFERENCE_LOSSES", "register_advantage", "register_loss",
           "register_preference_loss"]
