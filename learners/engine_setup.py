"""Building the DeepSpeed engines: the wrapped module, the DeepSpeed config, model loading."""
from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import deepspeed
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from learners.logprobs import chunked_logprobs
from learners.shared_prompt import SharedPrompt, enable_replay_safe_cache, shared_prompt_logprobs
from rlsys.config import LearnerConfig


class LogprobModule(nn.Module):
    """The module DeepSpeed wraps: HF model + chunked log-prob head in one forward.

    ZeRO-3 resets its parameter-prefetch trace in a hook on the *top* module's forward, so the
    whole computation (decoder and the repeated lm_head calls) has to run inside one call of
    the engine rather than by calling the HF submodules from outside.
    """

    def __init__(self, model: nn.Module, chunk_tokens: int, temperature: float = 1.0, shared_prompt: bool = False):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.temperature = temperature  # the sampler's: log-probs are of softmax(logits / T)
        if shared_prompt:
            enable_replay_safe_cache(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_mask: torch.Tensor,
                num_chunks: int, with_entropy: bool = False, shared: SharedPrompt | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token log-probs [b, T-1] (and entropy); with `shared`, by the shared-prompt forward."""
        if shared is not None:
            return shared_prompt_logprobs(self.model, shared, target_mask, self.chunk_tokens, num_chunks=num_chunks,
                                          with_entropy=with_entropy, temperature=self.temperature)
        lp, ent = chunked_logprobs(self.model, input_ids, attention_mask, self.chunk_tokens,
                                   target_mask=target_mask, num_chunks=num_chunks, with_entropy=with_entropy,
                                   temperature=self.temperature)
        return lp, ent  # ent is None unless with_entropy


# The DeepSpeed keys `bucket_config` sets (all of them: a benchmark strips them to measure
# DeepSpeed's own defaults).
BUCKET_KEYS = ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size",
               "stage3_max_live_parameters", "stage3_max_reuse_distance")
AUTO_BUCKET_MIB = (4.0, 64.0)  # auto: 1/8 of the model's bytes, clamped to this range
# On GPU the upper bound is DeepSpeed's own scale (its 5e8-element reduce bucket is ~1 GiB in
# bf16): at 64 MiB ZeRO-3 could gather a 7-8B model's decoder layer (~190M parameters) only as
# it is needed, with no room to prefetch the next one during compute.
AUTO_BUCKET_MIB_GPU = (4.0, 1024.0)


def bucket_mib(lc: LearnerConfig, model_bytes: int | None) -> float:
    """`learner.zero_bucket_mib`, or auto: 1/8 of the model's bytes clamped to AUTO_BUCKET_MIB
    (AUTO_BUCKET_MIB_GPU for ranks on GPUs; the upper bound when the size is not known yet)."""
    if lc.zero_bucket_mib is not None:
        return float(lc.zero_bucket_mib)
    lo, hi = AUTO_BUCKET_MIB_GPU if lc.num_gpus > 0 else AUTO_BUCKET_MIB
    return hi if model_bytes is None else min(hi, max(lo, model_bytes / 8 / 2**20))


def learner_dist_backend(accelerator_backend: str) -> str:
    """The learner ranks' process-group backend. The learner's own collectives (micro-batch and
    token counts, step metrics) are on small CPU tensors, and torch maps a bare "nccl" to CUDA
    tensors only (`Backend.backend_capability`), so on GPUs CPU tensors go over gloo and CUDA
    tensors over NCCL; elsewhere the accelerator's backend serves both (gloo on CPU)."""
    if accelerator_backend == "nccl":
        return "cpu:gloo,cuda:nccl"
    return accelerator_backend


def bucket_config(lc: LearnerConfig, dtype: torch.dtype, model_numel: int | None = None) -> dict[str, int]:
    """DeepSpeed's bucket sizes (in elements of `dtype`) for `zero_optimization`, sized to the model.

    DeepSpeed's defaults are for billion-parameter models on GPUs: a 5e8-element reduce bucket
    that ZeRO-3 allocates whole on every rank (2 GB in fp32) and fills with the full gradients of
    the whole model before it reduces, and a 1e9-element gathered-parameter budget and reuse
    distance, so a small model stays gathered whole on every rank between its forward and its
    backward. One size E (`bucket_mib`) for all: the reduce bucket holds at most E gradient
    elements, at most E parameter elements are prefetched, gathered parameters stay live up to
    2E and are kept for reuse only within E elements of the trace (benchmarks/learner_memory.py).
    """
    if lc.zero_stage == 0:
        return {}
    size = _itemsize(dtype)
    elements = int(bucket_mib(lc, None if model_numel is None else model_numel * size) * 2**20 // size)
    if lc.zero_stage < 3:
        return {"reduce_bucket_size": elements, "allgather_bucket_size": elements}
    return {"reduce_bucket_size": elements, "stage3_prefetch_bucket_size": elements,
            "stage3_max_live_parameters": 2 * elements, "stage3_max_reuse_distance": elements}


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def module_numel(module: nn.Module) -> int:
    """Parameters of `module`, full sizes (ZeRO-3 partitioned parameters count whole)."""
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in module.parameters())


def ds_config(lc: LearnerConfig, dtype: torch.dtype, *, train: bool, model_numel: int | None = None
              ) -> dict[str, Any]:
    """DeepSpeed config of the policy (`train`) or of the frozen reference engine; `model_numel`
    (full parameter count) sizes the buckets (`bucket_config`)."""
    zero: dict[str, Any] = {"stage": lc.zero_stage, **bucket_config(lc, dtype, model_numel)}
    if lc.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # lets save_hf consolidate
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": lc.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "steps_per_print": 1 << 30,  # keep DeepSpeed's progress lines out of the actor logs
        "wall_clock_breakdown": False,
    }
    if train:
        # The caller owns the accumulation boundary: any number of backward() calls, then one
        # step(). No fixed gradient_accumulation_steps to keep in sync with a varying batch.
        cfg.update(gradient_clipping=lc.grad_clip, managed_gradient_accumulation=False)
        if dtype == torch.bfloat16 and lc.zero_stage >= 1:
            # Sum micro-batch gradients in fp32, not bf16 (8 mantissa bits lose small updates).
            # DeepSpeed refuses this at stage 0, which sums them in bf16 (hence auto's stage 1
            # for one bf16 rank, rlsys.config.LearnerConfig.zero_stage).
            cfg["data_types"] = {"grad_accum_dtype": "fp32"}
            # Stage 1's BF16_Optimizer: add each parameter's bf16 gradient into its fp32 sum as
            # soon as backward produces it and drop it, instead of holding all of them to the end
            # of backward (same sums; 0.08 GiB less peak for SmolLM2-135M).
            cfg["bf16"]["immediate_grad_update"] = True
    return cfg


def adamw(params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """torch's AdamW, fused (one kernel over all parameters) where the parameters' device has the
    fused kernel, else its default. On the 2-core CPU measured, a SmolLM2-135M step took 0.08 s
    fused against 0.23-0.48 s in the default per-parameter loop (0.27 s with foreach)."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except RuntimeError:  # "`fused=True` requires all the params to be ... of supported devices"
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def reset_materialised_adam_steps(optimizer: Any) -> int:
    """Undo the step count of the zero-gradient step DeepSpeed's fp16/bf16 wrappers at ZeRO stage
    0 (FP16_Optimizer, FP16_UnfusedOptimizer) take at start-up to create Adam's state. The step
    changes no moment, but Adam counts it, so the first real update used step-2 bias correction:
    (1 - 0.9) / (1 - 0.9^2) * sqrt((1 - 0.999^2) / (1 - 0.999)) = 0.744 of its size, the next
    ones 0.86, 0.91, ... (measured on a one-rank bf16 learner: every weight moved 0.744 lr in
    the first step). Call it right after `deepspeed.initialize`: each state whose moments are
    still all zero gets its step back to 0. Returns the states reset (0 where nothing stepped).
    With weight decay that start-up step also shrank the master weights once by lr x decay."""
    inner = getattr(optimizer, "optimizer", optimizer)
    reset = 0
    for state in getattr(inner, "state", {}).values():
        step = state.get("step")
        moments = [state[k] for k in ("exp_avg", "exp_avg_sq") if k in state]
        if step is None or float(step) == 0 or not moments or any(bool(m.any()) for m in moments):
            continue
        if torch.is_tensor(step):
            step.zero_()
        else:
            state["step"] = 0
        reset += 1
    return reset


def skip_one_rank_allreduce(engine: Any, world_size: int) -> bool:
    """With one rank, stop DeepSpeed all-reducing the gradients at every `step()` (stages 0 and 1;
    2 and 3 reduce in their own hooks). On one rank the reduction is an identity that still costs
    a flatten of every gradient, a cast to the communication dtype and copies back (~0.3 s per
    optimizer step for SmolLM2-135M on 2 cores), and with bf16 weights the communication dtype is
    bf16: it rounded BF16_Optimizer's fp32 gradient sums to bf16 before AdamW read them. Returns
    whether it was turned off."""
    if world_size != 1 or engine.zero_optimization_partition_gradients():
        return False
    engine.enable_backward_allreduce = False
    return True


def keep_clip_norm(engine: Any) -> None:
    """Make `engine.get_global_grad_norm()` report the norm under ZeRO stage 0 in fp32 too.

    There DeepSpeed clips the (already all-reduced) gradients with its `clip_grad_norm_` inside
    `step()` and drops the norm that returns, so the norm would be None. The replacement does
    the same clip and keeps the norm where `get_global_grad_norm` reads it. Where DeepSpeed no
    longer calls `clip_fp32_gradients`, nothing changes (the norm stays None)."""
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip_and_keep() -> None:
        engine._global_grad_norm = clip_grad_norm_(parameters=engine.module.parameters(),
                                                   max_norm=engine.gradient_clipping(), mpu=engine.mpu)

    engine.clip_fp32_gradients = clip_and_keep


HEAP_MMAP_THRESHOLD = 1 << 20  # bytes; see limit_heap_retention


def limit_heap_retention(threshold: int = HEAP_MMAP_THRESHOLD) -> bool:
    """Serve host allocations of `threshold` bytes and more by mmap, so they go back to the OS
    when freed. True when set.

    glibc raises its mmap threshold (up to 32 MiB) each time a large mmapped block is freed, so
    a training step's activations (1-30 MB tensors, freed out of order) soon come from its heaps,
    where freed memory stays resident: one SmolLM2-135M step left 1.1 GiB of free heap in RSS
    and raised the step's peak by 0.6 GiB; a fixed 1 MiB threshold removed both at the same step
    time (benchmarks/learner_memory.py). Process-wide: call it in a process of its own (a
    learner rank). Skipped where MALLOC_MMAP_THRESHOLD_ is set or the C library is not glibc."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, int(threshold)))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def release_free_heap() -> bool:
    """Give the free pages of glibc's heaps back to the OS (malloc_trim(0)); True if any were.
    For a one-off drop in use, such as the per-parameter storages `pack_parameters` frees:
    left in the heap they stayed resident and raised a ZeRO-0 rank's peak by 0.3 GiB."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def model_dtype(model_dir: str, dtype: str | None) -> torch.dtype:
    """`dtype` by name, or the checkpoint's own when None."""
    if dtype is None:
        cfg = AutoConfig.from_pretrained(model_dir)
        dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or "float32"
    return dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype).removeprefix("torch."))


def load_hf(model_dir: str, dtype: torch.dtype, lc: LearnerConfig, *, train: bool) -> nn.Module:
    """Load the checkpoint; under ZeRO-3 straight into partitions (deepspeed.zero.Init via
    transformers' HfDeepSpeedConfig), so no rank ever holds a full copy of the model."""
    hf_ds = None
    if lc.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig
        # transformers keeps only a weak reference: the object enables ZeRO-3 loading while it
        # lives, and dropping it right after leaves save_pretrained etc. unaffected.
        hf_ds = HfDeepSpeedConfig(ds_config(lc, dtype, train=train))
    # (No config.use_cache=False: it would be saved into checkpoints; the log-prob code passes
    # use_cache=False per call.)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    del hf_ds
    return model


def zero3_module_stack() -> list:
    """DeepSpeed's module-level stack of the modules whose ZeRO-3 forward is under way (pushed
    by each module's pre-forward hook, popped by its post-forward hook)."""
    from deepspeed.runtime.zero import parameter_offload
    return getattr(parameter_offload, "FWD_MODULE_STACK", [])


@contextmanager
def balanced_module_stack() -> Iterator[None]:
    """Leave ZeRO-3's module stack as deep as it was. A forward cut short leaves its modules on
    it: gradient checkpointing's recompute stops once it has the tensors the backward needs,
    after the last layer's pre-hooks and before their post-hooks, so every micro-batch's
    backward left 3 modules a layer there (a decoder layer, its MLP, its last Linear), and the
    stack grew all run (DeepSpeed scans it whole when a module returns a parameter). A step
    pushes nothing that must outlive it."""
    stack = zero3_module_stack()
    depth = len(stack)
    try:
        yield
    finally:
        del stack[depth:]


def release_engines(engines: list[Any]) -> None:
    """Let DeepSpeed engines be freed while the process group is still alive (the caller drops
    its references and collects).

    `engine.destroy()` removes the hooks that tie modules and optimizer together, but stage 3
    also pushes each engine's top module on a module-level stack it never pops
    (`parameter_offload.FWD_MODULE_STACK`), which kept every engine, its partitions and its
    optimizer state alive until interpreter exit: after `destroy_process_group`, when gloo's
    pending work objects and their tensors die with the interpreter (the abort described in
    pytorch/pytorch#179291)."""
    modules = set()
    for engine in engines:
        if isinstance(engine, deepspeed.DeepSpeedEngine):
            engine.destroy()
            modules.update(id(m) for m in engine.module.modules())
    stack = zero3_module_stack()
    stack[:] = [m for m in stack if id(m) not in modules]


def load_reference(model_dir: str, dtype: torch.dtype, lc: LearnerConfig, device: torch.device,
                   temperature: float = 1.0) -> nn.Module:
    """Frozen copy of the initial policy: no optimizer, no gradients; ZeRO-3-partitioned like the
    policy under stage 3 (1/W of a model per rank), else a plain module on `device`."""
    ref = load_hf(model_dir, dtype, lc, train=False)
    ref.requires_grad_(False)
    # Same temperature as the policy: the KL compares the two distributions the sampler uses.
    module = LogprobModule(ref, lc.logprob_chunk_tokens, temperature, lc.shared_prompt).eval()
    if lc.zero_stage != 3:
        return module.to(device)
    engine, *_ = deepspeed.initialize(model=module, config=ds_config(lc, dtype, train=False,
                                                                         model_numel=module_numel(module)))
    engine.eval()
    return engine
