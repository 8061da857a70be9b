"""What a run leaves behind for people: TensorBoard scalars, every rollout in parquet, the
config it ran with, a progress bar, and a PNG of the curves at the end."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from tqdm import tqdm

log = logging.getLogger(__name__)

# rollouts.parquet columns and their fixed types (plus one float64 column per reward_<channel>).
ROLLOUT_TYPES = {"step": pa.int64(), "prompt_uid": pa.string(), "group": pa.int64(), "sample": pa.int64(),
                 "policy_version": pa.int64(), "text": pa.string(), "finish_reason": pa.string(),
                 "reward": pa.float64(), "advantage": pa.float64(), "valid": pa.bool_(),
                 "mask_reason": pa.string(), "response_tokens": pa.int64()}
# metric -> progress-bar label
SHOWN_IN_BAR = {"reward/weighted": "R", "reward/fmt": "fmt", "reward/acc": "acc", "reward/len": "len",
                "reward/div": "div", "reward/sq": "sq", "loss/total": "loss", "loss/kl": "kl",
                "perf/gen_tokens_per_s": "gen_tok/s", "time/step": "s/step"}


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temp file and os.replace so a crash never leaves a torn file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class RunTracker:
    """Owns the run directory's logs. One per driver."""

    def __init__(self, output_dir: str, total_steps: int, config_dump: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.dir / "config.yaml", yaml.safe_dump(config_dump, sort_keys=False).encode())
        self.tb = SummaryWriter(str(self.dir / "tensorboard"))
        self._rollouts: pq.ParquetWriter | None = None
        self.history: list[dict] = []
        self.bar = tqdm(total=total_steps, desc="grpo", unit="step", dynamic_ncols=True)

    def log_rollouts(self, samples: list[dict], step: int) -> None:
        """Append this step's samples (with all reward channels) to rollouts.parquet."""
        if not samples:  # every group dropped this step: nothing to write
            return
        rows = []
        for s in samples:
            row = {k: s.get(k) for k in ROLLOUT_TYPES if k not in ("step", "response_tokens")}
            row.update({k: None if v is None else float(v) for k, v in s.items() if k.startswith("reward_")})
            row["step"], row["response_tokens"] = step, len(s["token_ids"])
            rows.append(row)
        if self._rollouts is None:
            # Fixed types: a first step whose mask_reason or a channel is all None must not fix
            # that column's type as null for the whole run.
            fields = [pa.field(k, ROLLOUT_TYPES.get(k, pa.float64())) for k in rows[0]]  # reward_*: float
            self._rollouts = pq.ParquetWriter(str(self.dir / "rollouts.parquet"), pa.schema(fields))
        self._rollouts.write_table(pa.Table.from_pylist(rows, schema=self._rollouts.schema))

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)
        self.tb.flush()
        self.history.append({"step": step, **metrics})
        shown = {label: f"{metrics[k]:.3g}" for k, label in SHOWN_IN_BAR.items() if k in metrics}
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)
        log.info("step %d %s", step, json.dumps({k: round(v, 5) for k, v in metrics.items()}))

    def close(self) -> None:
        self.bar.close()
        if self._rollouts is not None:
            self._rollouts.close()
        self.tb.close()
        write_atomic(self.dir / "metrics.json", json.dumps(self.history, indent=1).encode())
        if self.history:
            plot_history(self.history, self.dir / "curves.png")


def plot_history(history: list[dict], path: Path) -> None:
    """One panel per metric family (reward channels, loss, KL, time split)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = {"reward": "reward/", "loss": "loss/", "time (s)": "time/"}
    fig, axes = plt.subplots(1, len(families), figsize=(5 * len(families), 3.5))
    steps = [h["step"] for h in history]
    for ax, (title, prefix) in zip(axes, families.items()):
        for key in sorted({k for h in history for k in h if k.startswith(prefix)}):
            ax.plot(steps, [h.get(key, float("nan")) for h in history], marker="o", label=key[len(prefix):])
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
