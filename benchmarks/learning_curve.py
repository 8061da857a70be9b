"""The long version of tests/test_e2e_learns.py: GRPO through the real stack (Ray, vLLM, two
DeepSpeed ZeRO-3 ranks) on a tiny random-init model whose reward is the share of its letters in
a..m, maximised and (weight -1) minimised, side by side from the same seed and weights.

Prints both curves and the per-step time, writes benchmarks/results/learning_curve.json and
learning_curve.png. Run: `.venv/bin/python benchmarks/learning_curve.py [--steps 40]`
(about 3 minutes on a 2-core CPU).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()

    from test_e2e_learns import run_task

    from rlsys import cluster
    from rlsys.config import ClusterConfig
    from rlsys.data.polaris import write_polaris_dataset
    from rlsys.models import build_tiny_model

    root = Path(tempfile.mkdtemp(prefix="rlsys-learning-curve-"))
    model_dir = build_tiny_model(root / "model", seed=0)
    data = write_polaris_dataset(root / "data", n=16, seed=0, fmt="jsonl")["train"]
    cluster.connect(ClusterConfig(num_cpus=8, object_store_gib=0.5))
    curves = {}
    try:
        for name, weight in (("maximise", 1.0), ("minimise", -1.0)):
            t0 = time.perf_counter()
            history = run_task(root, model_dir, data, weight, args.steps)
            curves[name] = {"reward": [m["reward/share"] for m in history],
                            "clip_frac": [m["policy/clip_frac"] for m in history],
                            "logprob_mismatch": [m["policy/logprob_mismatch"] for m in history],
                            "step_seconds": [m["time/step"] for m in history],
                            "wall_seconds_incl_startup": time.perf_counter() - t0}
    finally:
        cluster.shutdown()
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    result = {"steps": args.steps, "machine": platform.processor() or platform.machine(), "curves": curves}
    (out / "learning_curve.json").write_text(json.dumps(result, indent=1))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, c in curves.items():
        ax.plot(range(1, args.steps + 1), c["reward"], label=f"{name} (weight {'+1' if name == 'maximise' else '-1'})")
    ax.axhline(curves["maximise"]["reward"][0], color="grey", lw=0.8, ls="--")
    ax.set(xlabel="GRPO step", ylabel="share of letters in a..m", ylim=(0, 1),
           title="tiny model, real Ray + vLLM + DeepSpeed ZeRO-3 (2 ranks)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "learning_curve.png", dpi=100)

    print(f"{'step':>4} {'maximise':>9} {'minimise':>9}")
    for i in range(args.steps):
        print(f"{i + 1:>4} {curves['maximise']['reward'][i]:>9.3f} {curves['minimise']['reward'][i]:>9.3f}")
    for name, c in curves.items():
        steps = c["step_seconds"]
        print(f"{name}: {c['reward'][0]:.3f} -> {c['reward'][-1]:.3f}; {sum(steps) / len(steps):.2f} s/step; "
              f"max logprob mismatch {max(c['logprob_mismatch']):.1e}; mean clip_frac "
              f"{sum(c['clip_frac']) / len(c['clip_frac']):.3f}")
    print(f"wrote {out / 'learning_curve.json'} and {out / 'learning_curve.png'}")


if __name__ == "__main__":
    main()
