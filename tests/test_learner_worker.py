"""The learner's Ray shell (actors/learner.py) and what the driver process imports.

The driver creates every actor from its class, so whatever the classes' modules import at the
top lands in the driver's memory and start-up time. These tests pin that the driver's modules,
its parquet reading included, pull in none of the training stack (DeepSpeed and what it imports),
and that the shell forwards the learner's whole interface. The shell inside a real run is
covered by the end-to-end tests (tests/test_e2e_grpo.py and the others start GRPORun).
"""
from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

from actors.learner import LEARNER_METHODS, LearnerWorker

ROOT = Path(__file__).resolve().parents[1]
# The actors' engines and what DeepSpeed and transformers pull in; none is needed to drive a run.
TRAINING_STACK = ("deepspeed", "vllm", "sentence_transformers", "transformers", "sklearn", "scipy", "pandas")


def test_learner_methods_are_the_learners_public_interface():
    from learners.deepspeed_learner import DeepSpeedLearner

    public = {n for n, v in vars(DeepSpeedLearner).items() if not n.startswith("_") and inspect.isfunction(v)}
    assert set(LEARNER_METHODS) == public
    assert all(callable(getattr(LearnerWorker, n)) for n in LEARNER_METHODS)


def test_shell_forwards_arguments_results_and_errors():
    class Rank:
        def train_step(self, batch, *, extra=0):
            return {"n": len(batch["mini_batches"]) + extra}

        def shutdown(self):
            raise RuntimeError("rank 1 gone")

    shell = LearnerWorker.__new__(LearnerWorker)  # the real __init__ builds a DeepSpeed rank
    shell.learner = Rank()
    assert shell.train_step({"mini_batches": [1, 2]}, extra=3) == {"n": 5}
    with pytest.raises(RuntimeError, match="rank 1 gone"):
        shell.shutdown()
    assert LearnerWorker.train_step.__name__ == "train_step"


def test_driver_process_imports_no_training_stack(tmp_path):
    """What `rlsys train` imports in the driver (the run's modules, which import each actor's
    class), plus reading a parquet prompt file: none of the actors' engines or what they pull in
    (red before actors/learner.py: the driver imported the learner's module)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rlsys.data.synth import turn_schema

    data = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist([], schema=turn_schema()), data)
    code = (
        "import json, sys\n"
        "import rlsys.cli, rlsys.train, rlsys.driver, rlsys.steps\n"
        "from rlsys.data.episodebench import read_rows\n"
        f"rows = list(read_rows({str(data)!r}))\n"
        f"print(json.dumps(sorted(m for m in {TRAINING_STACK!r} if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
