"""vLLM worker extension: receives the learner's weights inside the engine's worker process.

Passed to vLLM as `worker_extension_cls="actors.vllm_worker_ext.WeightSyncExtension"`; vLLM
mixes the class into its Worker, and the methods are called with `llm.collective_rpc(name, ...)`.
Every method is prefixed `rlsys_` because vLLM 0.32's Worker already has `update_weights`,
`init_weight_transfer_engine`, ... and refuses extensions whose names clash.

Why `reload_weights`: on CPU, vLLM repacks every Linear weight into a kernel-specific layout at
load time and leaves `layer.weight` empty, so copying into parameters (or calling
`model.load_weights` alone) changes nothing the model computes with. `Worker.reload_weights(
weights_iterator=...)` (vllm.model_executor.model_loader.reload) restores the layers from meta,
feeds the checkpoint-format (HF-named) tensors through `model.load_weights` (which maps
q/k/v -> qkv_proj, gate/up -> gate_up_proj), re-runs the repacking per layer, and copies the
result into the original storage. It takes the same HF names a checkpoint has. One gap in
it (a tied LM head keeps its old packed copy on CPU) is closed by `refresh_tied_heads`.
"""
from __future__ import annotations

import hashlib
import importlib
import logging
import time
from typing import Any, Callable, Iterator

import torch

log = logging.getLogger(__name__)


def _request_amx() -> bool:
    """Ask the kernel for AMX tile permission in this process. vLLM's bf16 AMX kernels die
    with SIGILL in a process that never asked. Harmless (False) where AMX is absent."""
    init = getattr(torch.cpu, "_init_amx", None)
    return bool(init()) if init is not None else False


# vLLM imports this module in its worker process before it loads and warms up the model, so
# asking here covers the warm-up too; `rlsys_init_amx` repeats it on demand.
_request_amx()


def tensor_digest(t: torch.Tensor, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Exact fingerprint of a tensor's values: the SHA-256 of its bytes plus a float64 sum (the
    sum is for "how different", the hash for "identical"). `dtype` casts first, so a sender can
    digest its tensors in the engine's dtype. -0.0 is folded into +0.0 (the engine-side probe
    below computes w + 0 products, which cannot preserve the sign of zero)."""
    t = t.detach().to("cpu")
    shape = list(t.shape)
    if dtype is not None:
        t = t.to(dtype)
    t = (t + 0).contiguous().reshape(-1)  # "+ 0" canonicalises -0.0; exact for all else
    raw = t.view(torch.uint8).numpy()  # bytes as stored; works for bf16 too
    return {
        "sha256": hashlib.sha256(raw.data).hexdigest(),
        "sum": float(t.to(torch.float64).sum()),
        "shape": shape,
        "numel": t.numel(),
        "dtype": str(t.dtype).removeprefix("torch."),
    }


def _computes_with_copy(module: torch.nn.Module) -> bool:
    """True where the forward pass multiplies by a kernel copy rather than `module.weight`:
    CPU linears (parameter emptied after repacking) and CPU LM heads (parameter kept, but the
    logits use a packed copy made at load time). Input embeddings look rows up in the
    parameter itself."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    if isinstance(module, VocabParallelEmbedding) and not isinstance(module, ParallelLMHead):
        return False
    return module.weight.numel() == 0 or hasattr(module, "cpu_linear")


def _used_weight(module: torch.nn.Module) -> torch.Tensor:
    """The [out, in] weight a vLLM linear / LM head really computes with.

    Where that is a packed kernel copy, push an identity matrix through the layer's own
    forward path (`quant_method.apply`, bias left out): it returns exactly W^T, since every
    output is one weight times 1 plus zeros, so nothing is rounded. Vocabulary padding rows
    are cut off so shapes match the checkpoint.
    """
    w = module.weight
    if _computes_with_copy(module):
        k = int(w.shape[1]) if w.numel() > 0 else int(module.input_size_per_partition)
        eye = torch.eye(k, dtype=w.dtype, device=w.device)
        with torch.inference_mode():
            w = module.quant_method.apply(module, eye, None).t().contiguous()
    vocab = getattr(module, "org_vocab_size", None)
    return (w[:vocab] if vocab is not None else w).detach()


def refresh_tied_heads(model: torch.nn.Module) -> int:
    """Rebuild the kernel copy of every LM head whose weight is tied to the input embedding.

    vLLM 0.32 bug worked around here: `reload_weights` reloads and repacks `embed_tokens`, but
    the tied `lm_head` receives no tensor of its own ("ParallelLMHead: Failed to load weights")
    and keeps the packed copy of the *old* embedding on CPU, so logits would come from stale
    weights. Re-running its (idempotent, unquantised) post-load step repacks the shared,
    already updated parameter. No-op on GPU, where the head multiplies by the parameter.
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    embeds = {id(m.weight) for m in model.modules()
              if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)}
    n = 0
    for m in model.modules():
        if isinstance(m, ParallelLMHead) and id(m.weight) in embeds:
            m.quant_method.process_weights_after_loading(m)
            n += 1
    return n


def engine_weights_hf(model: torch.nn.Module, names: set[str] | None = None
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF checkpoint name, tensor) for the engine's current weights.

    Fused vLLM layers are split back using the model's `packed_modules_mapping` (e.g.
    qkv_proj -> q_proj, k_proj, v_proj) and the layer's `output_sizes`. Assumes tensor
    parallel size 1 and a model whose vLLM names equal the HF names apart from packing (true
    for Llama/Qwen-style models; a model with an `hf_to_vllm_mapper` would need that too).
    """
    packed: dict[str, list[str]] = dict(getattr(model, "packed_modules_mapping", {}) or {})
    for mod_name, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if not own:
            continue
        prefix, _, leaf = mod_name.rpartition(".")
        for pname, param in own.items():
            full = f"{mod_name}.{pname}"
            if leaf in packed and hasattr(module, "output_sizes"):
                parts = [f"{prefix}.{p}.{pname}" if prefix else f"{p}.{pname}" for p in packed[leaf]]
                if names is not None and not names.intersection(parts):
                    continue
                value = _used_weight(module) if pname == "weight" else param.detach()
                for part, chunk in zip(parts, value.split(list(module.output_sizes), dim=0)):
                    yield part, chunk
            elif names is None or full in names:
                has_kernel = pname == "weight" and hasattr(module, "quant_method")
                yield full, _used_weight(module) if has_kernel else param.detach()


def split_fused_problems(names: list[str], packed: dict[str, list[str]]) -> list[str]:
    """Names of fused layers that `names` covers only in part (e.g. q_proj without k_proj).
    vLLM rebuilds a fused layer once all its parts arrived; given only some, it would
    rebuild it with the missing parts uninitialised."""
    part_of = {part: (fused, parts) for fused, parts in packed.items() for part in parts}
    seen: dict[tuple[str, str, str], set[str]] = {}
    for name in names:
        prefix, _, rest = name.rpartition(".")  # rest: "weight" / "bias"
        mod_prefix, _, leaf = prefix.rpartition(".")
        if leaf in part_of:
            seen.setdefault((mod_prefix, part_of[leaf][0], rest), set()).add(leaf)
    return [f"{p}.{fused}.{r} (got {sorted(got)})" for (p, fused, r), got in seen.items()
            if got != set(packed[fused])]


def _swap_by_name(module_name: str, attr: str, saved: str, enabled: bool, what: str,
                  make: Callable[[Callable], Callable]) -> bool:
    """Put `make(vLLM's function)` in place of `module_name.attr` when `enabled`, vLLM's own
    (kept as `saved`) when not. vLLM looks the function up by name in that module at every
    call, so this is process-wide. True when ours is in place; False where this vLLM has no
    such hook (then nothing changed, and that is logged)."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        log.warning("%s not installed: %s", what, e)
        return False
    original = getattr(module, saved, None) or getattr(module, attr, None)
    if original is None:
        log.warning("%s not installed: this vLLM's %s has no %s", what, module_name, attr)
        return False
    setattr(module, saved, original)
    setattr(module, attr, make(original) if enabled else original)
    return enabled


def install_cpu_top_p(enabled: bool) -> bool:
    """Route vLLM's CPU sampler's top-p (with or without top-k) through `actors.top_p` (no sort
    of the vocabulary) when `enabled`, back to vLLM's own filter when not (`_swap_by_name`)."""
    from actors.top_p import top_k_top_p_filter_

    try:
        triton = getattr(importlib.import_module("vllm.v1.sample.ops.topk_topp_sampler"), "HAS_TRITON", False)
    except ImportError:
        triton = False  # _swap_by_name logs it
    if triton:
        log.warning("fast CPU top-p not installed: vLLM filters top-p with its Triton kernel here")
        return False

    def make(original: Callable) -> Callable:
        def apply_top_k_top_p(logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None) -> torch.Tensor:
            if p is None:  # top-k alone (vLLM's own filter needs no sort then) or nothing to do
                return original(logits, k, p)
            return top_k_top_p_filter_(logits, k, p, original)[0]
        return apply_top_k_top_p

    return _swap_by_name("vllm.v1.sample.ops.topk_topp_sampler", "apply_top_k_top_p", "_rlsys_original_filter",
                         enabled, "fast CPU top-p", make)


def install_cpu_penalties(enabled: bool) -> bool:
    """Route vLLM's CPU sampler's penalties through `actors.penalties` (only the tokens a row has
    seen; bit-identical) when `enabled`, back to vLLM's function when not (`_swap_by_name`)."""
    from actors.penalties import apply_penalties_

    def make(original: Callable) -> Callable:
        def apply_penalties(logits, prompt_tokens, output_tokens, presence, frequency, repetition):
            return apply_penalties_(logits, prompt_tokens, output_tokens, presence, frequency, repetition, original)
        return apply_penalties

    return _swap_by_name("vllm.v1.sample.ops.penalties", "apply_penalties", "_rlsys_original_penalties",
                         enabled, "CPU penalties", make)


class WeightSyncExtension:
    """Mixed into vLLM's Worker; `self` is the worker (has `model_runner`, `reload_weights`)."""

    def rlsys_init_amx(self) -> bool:
        """AMX permission for the worker process (see `_request_amx`); True if granted."""
        return _request_amx()

    def rlsys_cpu_top_p(self, enabled: bool) -> bool:
        """`install_cpu_top_p` and `install_cpu_penalties` in the worker's process (the CPU
        sampler's fast paths, `rollout.cpu_fast_top_p`); True when the fast filter is in place."""
        install_cpu_penalties(enabled)
        return install_cpu_top_p(enabled)

    def rlsys_init_weight_transport(self, host: str, port: int, rank: int, world_size: int,
                                    backend: str = "gloo") -> bool:
        """Join the learner's weight-broadcast group as `rank` (blocks until every rank joins)."""
        from rlsys.weight_sync import make_transport

        device = "cpu" if backend == "gloo" else str(getattr(self, "device", "cuda"))
        self.rlsys_close_weight_transport()  # re-formed after a peer engine was replaced
        self._rlsys_transport = make_transport(host, port, rank, world_size, backend, device)
        self._rlsys_version = getattr(self, "_rlsys_version", 0)
        return True

    def rlsys_update_weights(self, metas: list[Any], version: int) -> dict[str, Any]:
        """Receive one full set of weights (HF names) and load them into the running model.

        `metas` are (name, shape, dtype) triples (collective_rpc turns tuples into lists).
        A subset of the weights is fine as long as fused layers come whole (checked).
        """
        from vllm.config import set_current_vllm_config

        from rlsys.weight_sync import TensorMeta

        transport = getattr(self, "_rlsys_transport", None)
        if transport is None:
            raise RuntimeError("rlsys_init_weight_transport must be called before rlsys_update_weights")
        metas = [m if isinstance(m, TensorMeta) else TensorMeta(str(m[0]), tuple(int(s) for s in m[1]), str(m[2]))
                 for m in metas]
        t0 = time.perf_counter()
        stream = transport.receive(metas)
        try:
            model = self.model_runner.get_model()
            partial = split_fused_problems([m.name for m in metas],
                                           dict(getattr(model, "packed_modules_mapping", {}) or {}))
            if partial:
                raise ValueError(f"weight update covers fused layers only in part: {partial[:3]}")
            self.reload_weights(weights_iterator=stream, is_checkpoint_format=True)
            with set_current_vllm_config(self.vllm_config):
                refresh_tied_heads(model)
        except BaseException:
            # Keep the group in step with the sender (it broadcasts every bucket regardless),
            # then surface the error.
            for _ in stream:
                pass
            raise
        self._rlsys_version = int(version)
        seconds = time.perf_counter() - t0
        nbytes = sum(m.numel * m.torch_dtype.itemsize for m in metas)
        buffers = dict(getattr(transport, "last_receive_buffers", {}))
        log.info("weights v%d loaded: %d tensors, %.1f MB in %.2fs (receive buffers: %s)", version, len(metas),
                 nbytes / 1e6, seconds, buffers)
        return {"version": int(version), "seconds": seconds, "bytes": nbytes, "tensors": len(metas),
                "receive_buffers": buffers}

    def rlsys_weights_digest(self, names: list[str] | None = None) -> dict[str, dict[str, Any]]:
        """`tensor_digest` of each named weight (HF names; all when `names` is None) as the
        engine computes with it after the last load. Compare with `tensor_digest(sent, dtype=
        engine dtype)` on the sender's side."""
        model = self.model_runner.get_model()
        wanted = set(names) if names is not None else None
        return {n: tensor_digest(t) for n, t in engine_weights_hf(model, wanted)}

    def rlsys_policy_version(self) -> int:
        return int(getattr(self, "_rlsys_version", 0))

    def rlsys_close_weight_transport(self) -> None:
        transport = getattr(self, "_rlsys_transport", None)
        if transport is not None:
            transport.close()
            self._rlsys_transport = None
