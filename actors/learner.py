"""LearnerWorker: the Ray actor of one learner rank, a thin shell around
`learners.deepspeed_learner.DeepSpeedLearner` that builds it inside the actor's process.

Why a shell: `ray.remote(cls)` needs the class in the driver, and the learner's module imports
DeepSpeed, which imports transformers, scikit-learn, SciPy and pandas. In the driver that was
~0.24 GiB of resident memory and ~5-10 s of import on the start-up path, for a process that
never trains. This module imports nothing heavy; the learner's module is imported by
`__init__`, in the rank.

Every public method of DeepSpeedLearner (`LEARNER_METHODS`, kept equal to them by
tests/test_learner_worker.py) is forwarded as is: same arguments, same result, same errors.
"""
from __future__ import annotations

from typing import Any, Callable

# The rank's remote interface: DeepSpeedLearner's public methods.
LEARNER_METHODS = ("train_step", "weight_metadata", "init_weight_sync", "broadcast_weights", "gathered_digest",
                   "save_hf", "save_checkpoint", "load_checkpoint", "communication_backend", "peak_rss_gib",
                   "shutdown")


class LearnerWorker:
    """One learner rank; the arguments are DeepSpeedLearner's."""

    def __init__(self, *args: Any, **kwargs: Any):
        from learners.deepspeed_learner import DeepSpeedLearner  # here, in the rank's process only
        self.learner = DeepSpeedLearner(*args, **kwargs)


def _forward(name: str) -> Callable[..., Any]:
    def method(self: LearnerWorker, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.learner, name)(*args, **kwargs)
    method.__name__ = method.__qualname__ = name
    method.__doc__ = f"DeepSpeedLearner.{name}, in this rank."
    return method


for _name in LEARNER_METHODS:  # before any ray.remote(LearnerWorker): Ray reads the methods then
    setattr(LearnerWorker, _name, _forward(_name))
