"""How `rlsys train` classifies a stop, without a cluster: the CLI in a child process (it installs
its own SIGTERM handler and logging) with a stand-in for `rlsys.train.train`."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import os, signal, sys, time, types

    def train(cfg, resume=None):
        # What CI caught: SIGTERM landed while Ray's Cython code ran a Python callback
        # (deserialising a learner result inside ray.get); the handler's exception came out of
        # ray.get as a SystemError, and the run exited 1 instead of 143.
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
        except BaseException as e:
            raise SystemError("<built-in method __new__> returned a result with an exception set") from e
        raise AssertionError("the SIGTERM handler did not interrupt the run")

    sys.modules["rlsys.train"] = types.SimpleNamespace(train=train)
    from rlsys.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _run_cli(tmp_path: Path) -> subprocess.CompletedProcess:
    (tmp_path / "model").mkdir()
    (tmp_path / "train.jsonl").write_text("{}\n")
    args = ["train", "/dev/null", f"model.path={tmp_path / 'model'}", f"data.path={tmp_path / 'train.jsonl'}",
            f"train.output_dir={tmp_path / 'run'}"]
    return subprocess.run([sys.executable, "-c", CHILD, *args], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)


def test_a_sigterm_that_surfaces_wrapped_is_still_a_sigterm_stop(tmp_path):
    proc = _run_cli(tmp_path)
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert "stopped by SIGTERM. Last checkpoint: none" in proc.stderr
    assert "SystemError" not in proc.stderr
