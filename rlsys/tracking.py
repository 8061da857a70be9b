"""What a run leaves behind for people: TensorBoard scalars, every rollout in parquet (one file
per step), per-step metrics as JSON lines, the config it ran with, a progress bar, and a PNG of
the curves at the end."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from tqdm import tqdm

from rlsys.atomic import write_file

log = logging.getLogger(__name__)

# rollouts/step-N.parquet columns and their fixed types (plus one float64 column per reward_<channel>).
ROLLOUT_TYPES = {"step": pa.int64(), "prompt_uid": pa.string(), "group": pa.int64(), "sample": pa.int64(),
                 "policy_version": pa.int64(), "text": pa.string(), "finish_reason": pa.string(),
                 "reward": pa.float64(), "advantage": pa.float64(), "valid": pa.bool_(),
                 "mask_reason": pa.string(), "response_tokens": pa.int64(), "is_reference": pa.bool_()}
# metric -> progress-bar label
SHOWN_IN_BAR = {"reward/weighted": "R", "reward/fmt": "fmt", "reward/acc": "acc", "reward/len": "len",
                "reward/div": "div", "reward/sq": "sq", "loss/total": "loss", "loss/kl": "kl",
                "dpo/accuracy": "pair_acc", "perf/gen_tokens_per_s": "gen_tok/s", "time/step": "s/step",
                "async/staleness_mean": "stale", "async/step_over_slowest_stage": "step/slowest"}


METRICS_LOG = "metrics.jsonl"
ROLLOUTS_DIR = "rollouts"


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Per-step metrics of a run, in order, from its append-only metrics.jsonl (a torn last
    line, left by a kill mid-write, is ignored)."""
    path = Path(run_dir) / METRICS_LOG
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s: skipping a torn line (a run was killed while writing it)", path)
    return out


def read_rollouts(run_dir: str | Path) -> pa.Table:
    """Every logged sample of a run: its rollouts/step-*.parquet files read as one table."""
    files = sorted((Path(run_dir) / ROLLOUTS_DIR).glob("step-*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default") if files \
        else pa.table({})


class RunTracker:
    """Owns the run directory's logs. One per driver.

    Everything is written as it happens and survives a kill: each step's samples are one
    parquet file under rollouts/ (written atomically), each step's metrics one appended line of
    metrics.jsonl. `resume_step` continues a run: later steps of the earlier attempt (after its
    last checkpoint) are dropped so nothing is duplicated, and TensorBoard purges them too.
    Without it, an earlier run's logs in the same directory are replaced.
    """

    def __init__(self, output_dir: str, total_steps: int, config_dump: dict, resume_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        write_file(self.dir / "config.yaml", yaml.safe_dump(config_dump, sort_keys=False).encode())
        self.history = [h for h in read_metrics(self.dir) if h.get("step", 0) <= resume_step]
        write_file(self.dir / METRICS_LOG, "".join(json.dumps(h) + "\n" for h in self.history))
        self.rollouts_dir = self.dir / ROLLOUTS_DIR
        self.rollouts_dir.mkdir(exist_ok=True)
        for f in self.rollouts_dir.glob("step-*.parquet"):
            if int(f.stem.split("-")[1]) > resume_step:
                f.unlink()
        self.tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
        self._schema: pa.Schema | None = None
        self.bar = tqdm(total=total_steps, initial=resume_step, desc=str(config_dump.get("name") or "train"), unit="step", dynamic_ncols=True)

    def log_rollouts(self, samples: list[dict], step: int) -> None:
        """Write this step's samples (with all reward channels) to rollouts/step-<N>.parquet."""
        if not samples:  # every group dropped this step: nothing to write
            return
        rows = []
        for s in samples:
            row = {k: s.get(k) for k in ROLLOUT_TYPES if k not in ("step", "response_tokens")}
            row.update({k: None if v is None else float(v) for k, v in s.items() if k.startswith("reward_")})
            row["step"], row["response_tokens"] = step, len(s["token_ids"])
            rows.append(row)
        # Fixed types: a step whose mask_reason or a channel is all None must not get a null column.
        schema = pa.schema([pa.field(k, ROLLOUT_TYPES.get(k, pa.float64())) for k in rows[0]])  # reward_*: float
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink)
        write_file(self.rollouts_dir / f"step-{step:06d}.parquet", sink.getvalue().to_pybytes())

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)
        self.tb.flush()
        entry = {"step": step, **metrics}
        self.history.append(entry)
        with open(self.dir / METRICS_LOG, "a") as f:  # append-only: a kill loses at most this line
            f.write(json.dumps(entry) + "\n")
        shown = {label: f"{metrics[k]:.3g}" for k, label in SHOWN_IN_BAR.items() if k in metrics}
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)
        log.info("step %d %s", step, json.dumps({k: round(v, 5) for k, v in metrics.items()}))

    def close(self) -> None:
        self.bar.close()
        self.tb.close()
        write_file(self.dir / "metrics.json", json.dumps(self.history, indent=1).encode())
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
        if ax.get_legend_handles_labels()[0]:  # a family with no metrics yet has nothing to label
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
