"""DeepSpeed GRPO learner: one instance per data-parallel rank.

Plain Python on purpose: the driver wraps the class with `ray.remote(num_cpus=..., num_gpus=...)`
and creates one actor per rank, so it can also be driven by hand (tests, torchrun-style).
Every method that touches parameters is a collective under ZeRO-3 (forward, backward, gathers):
all ranks must call it, in the same order, with micro-batch counts agreed across ranks.
"""
from __future__ import annotations

import gc
import logging
import os
import resource
import time
from collections import Counter
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from torch import nn

from learners import checkpoint_io
from learners.engine_setup import (LogprobModule, adamw, balanced_module_stack, ds_config, keep_clip_norm,
                                   learner_dist_backend, limit_heap_retention, load_hf, load_reference,
                                   model_dtype, module_numel, release_engines, release_free_heap,
                                   reset_materialised_adam_steps, skip_one_rank_allreduce)
from learners.logprobs import packing_unsupported
from learners.microbatches import MicroBatch, backward_scale, build_micro_batches, filler_micro_batch
from learners.step_metrics import StepStats
from learners.zero_params import digest, dtype_name, full_numel, full_shape, iter_full_params, pack_parameters
from learners.lora import adapter_parameters, attach_lora, merged_values, weight_sources
from rlsys.algorithms import POLICY_LOSSES, PREFERENCE_LOSSES
from rlsys.algorithms.losses import truncated_is_weights
from rlsys.config import AlgorithmConfig, LearnerConfig
from rlsys.weight_sync import TensorMeta, WeightTransport, make_transport

log = logging.getLogger(__name__)


def _sequence_logprobs(logprobs: torch.Tensor, m: MicroBatch) -> torch.Tensor:
    """[b] summed log-probs of each row's response tokens (a preference loss's unit)."""
    return (logprobs * m.loss_mask.to(logprobs.device, logprobs.dtype)).sum(-1)


class DeepSpeedLearner:
    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, model_dir: str,
                 learner_cfg: LearnerConfig, algo_cfg: AlgorithmConfig, seed: int,
                 dtype: str | None = None, temperature: float = 1.0):
        """`dtype`: weights' dtype (ModelConfig.dtype); None keeps the checkpoint's own.
        `temperature`: the sampler's (`rollout.temperature`); the policy's, the old and the
        reference log-probs are all taken under softmax(logits / temperature)."""
        t0 = time.perf_counter()
        if learner_cfg.heap_mmap_threshold_mib is not None:  # freed activations go back to the OS
            limit_heap_retention(int(learner_cfg.heap_mmap_threshold_mib * 2**20))
        self.rank, self.world_size, self.model_dir = rank, world_size, model_dir
        self.lc, self.ac = learner_cfg, algo_cfg
        # Ray gives a GPU actor only its own device (CUDA_VISIBLE_DEVICES), so it is index 0 there.
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR=master_addr,
                          MASTER_PORT=str(master_port),
                          LOCAL_RANK="0" if torch.cuda.is_available() else str(rank))
        deepspeed.init_distributed(dist_backend=learner_dist_backend(get_accelerator().communication_backend_name()))
        self.init_timings = {"dist": time.perf_counter() - t0}
        torch.manual_seed(seed)
        self.dtype = model_dtype(model_dir, dtype)
        self.zero3 = learner_cfg.zero_stage == 3

        model = load_hf(model_dir, self.dtype, learner_cfg, train=True)
        # With LoRA the PeftModel is kept for its adapter switch and its save; the engine wraps
        # the HF model itself (now holding the adapter layers), like without.
        self.peft = attach_lora(model, learner_cfg.lora) if learner_cfg.lora.enabled else None
        if learner_cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        pad = model.config.pad_token_id
        self.pad_id = pad if isinstance(pad, int) and 0 <= pad < model.config.vocab_size else 0
        self.temperature = float(temperature)
        # Packed micro-batches (learner.micro_batch_tokens) need attention that can be confined
        # to each packed sequence (learners/logprobs.py); otherwise padded, said once.
        self.packing_unsupported = packing_unsupported(model)
        if learner_cfg.micro_batch_tokens is not None and self.packing_unsupported and rank == 0:
            log.info("learner.micro_batch_tokens: %s, so micro-batches are padded (%d sequences each)",
                        self.packing_unsupported, learner_cfg.micro_batch_size)
        policy = LogprobModule(model, learner_cfg.logprob_chunk_tokens, self.temperature, learner_cfg.shared_prompt)
        trainable = [p for p in policy.parameters() if p.requires_grad]
        optim = adamw(trainable, lr=learner_cfg.lr, weight_decay=learner_cfg.weight_decay)
        self.engine, *_ = deepspeed.initialize(model=policy, optimizer=optim,
                                               config=ds_config(learner_cfg, self.dtype, train=True,
                                                                 model_numel=module_numel(policy)))
        reset_materialised_adam_steps(self.engine.optimizer)
        skip_one_rank_allreduce(self.engine, world_size)
        self.packed_bytes = 0  # parameters packed into one buffer (pack_parameters)
        if learner_cfg.zero_stage == 0 and self.dtype == torch.bfloat16 and rank == 0:
            log.warning("learner.zero_stage: 0 with bf16 weights: DeepSpeed sums the micro-batches' gradients "
                        "in bf16 at stage 0; zero_stage 1 (what auto picks for one bf16 rank) sums them in fp32")
        if learner_cfg.zero_stage == 0:
            keep_clip_norm(self.engine)
            # On the engine's device (DeepSpeed moved the module there): one flat buffer, so
            # the weight broadcast sends spans of it without copying the model.
            self.packed_bytes = pack_parameters(self.engine.module)
            release_free_heap()
        self.device = self.engine.device
        self.init_timings["policy"] = time.perf_counter() - t0 - sum(self.init_timings.values())
        # The reference policy: for a KL penalty or a preference loss. With LoRA it is the base
        # (adapter off), so no second copy is loaded.
        needs_ref = algo_cfg.kl_coef > 0 or algo_cfg.is_preference
        self.ref = load_reference(model_dir, self.dtype, learner_cfg, self.device, self.temperature) \
            if needs_ref and self.peft is None else None
        self.init_timings["reference"] = time.perf_counter() - t0 - sum(self.init_timings.values())
        self.loss_fn = (PREFERENCE_LOSSES if algo_cfg.is_preference else POLICY_LOSSES)[algo_cfg.loss]
        self.transport: WeightTransport | None = None
        self.init_seconds = time.perf_counter() - t0
        log.info("rank %d: learner ready in %.1fs (ZeRO-%d, %s, %.0f MB of parameters packed): %s", rank,
                 self.init_seconds, learner_cfg.zero_stage, self.dtype, self.packed_bytes / 1e6, self.init_timings)

    @property
    def hf_model(self) -> nn.Module:
        return self.engine.module.model

    # ------------------------------------------------------------------ training

    def _forward(self, fn: nn.Module, m: MicroBatch, num_chunks: int, with_entropy: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        d = self.device
        return fn(m.input_ids.to(d), m.attention_mask.to(d), m.target_mask.to(d), num_chunks, with_entropy,
                  shared=None if m.layout is None else m.layout.to(d))

    def _token_budget(self) -> int | None:
        """Packed micro-batches' token budget, or None: padded (not configured, or not supported)."""
        return None if self.packing_unsupported else self.lc.micro_batch_tokens

    def _agree(self, mbs: list[MicroBatch]) -> tuple[list[MicroBatch], list[int], float, float]:
        """Pad every rank to the same micro-batch count and head-chunk counts (ZeRO-3 needs
        identical collectives everywhere) and sum the step's loss tokens and sequences."""
        n = torch.tensor([len(mbs)], dtype=torch.int64)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        packed = self._token_budget() is not None
        mbs = mbs + [filler_micro_batch(self.pad_id, self.lc.shared_prompt, packed)
                     for _ in range(max(int(n), 1) - len(mbs))]
        chunks = torch.tensor([m.needed_chunks(self.lc.logprob_chunk_tokens) for m in mbs], dtype=torch.int64)
        dist.all_reduce(chunks, op=dist.ReduceOp.MAX)
        totals = torch.tensor([sum(m.n_tokens for m in mbs), sum(m.n_real for m in mbs)], dtype=torch.float64)
        dist.all_reduce(totals)
        return mbs, chunks.tolist(), float(totals[0]), float(totals[1])

    def _mini_batches(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """The batch's mini-batches (one optimizer step each), checked to be as many as on every
        other rank: the updates are collectives."""
        parts = list(batch["mini_batches"]) if "mini_batches" in batch else [batch]
        n_parts = torch.tensor([len(parts)], dtype=torch.int64)
        dist.all_reduce(n_parts, op=dist.ReduceOp.MAX)
        if int(n_parts) != len(parts):
            raise ValueError(f"rank {self.rank} got {len(parts)} mini-batches, another rank {int(n_parts)}; "
                             "every rank needs the same number")
        return parts

    def _reference_logprobs(self, m: MicroBatch, num_chunks: int) -> torch.Tensor:
        """Log-probs under the reference policy: the frozen copy, or the base with the adapter off."""
        if self.peft is None:
            return self._forward(self.ref, m, num_chunks)[0]
        with self.peft.disable_adapter():
            return self._forward(self.engine, m, num_chunks)[0]

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        """One rollout batch's update on this rank's share; every rank calls it together.

        batch: either one mini-batch, or {"mini_batches": [mini-batch, ...]} for PPO-style
        updates (`algorithm.mini_batches`): one optimizer step per mini-batch, the whole list
        `algorithm.ppo_epochs` times. Every rank must get the same number of mini-batches (the
        driver splits the step's groups first, then each mini-batch over the ranks).
        A mini-batch: `input_ids` (prompt + response token lists, unpadded), `prompt_lens`,
        `advantages` (one per sequence); optional `loss_mask` (per sequence, one 0/1 per response
        token or per token of input_ids; None = every response token) and `behaviour_logprobs`
        (the sampler's log-prob per response token, for the mismatch metric); `global_tokens` /
        `global_sequences` (the mini-batch's totals over all ranks; checked against what the
        ranks hold, which wins). Each mini-batch's loss is its own exact token-mean (or
        sequence-mean) however it is split over ranks and micro-batches (learners.microbatches).
        Returns metrics reduced over ranks, identical on every rank.
        """
        with balanced_module_stack():
            return self._preference_step(batch) if self.ac.is_preference else self._policy_step(batch)

    def _policy_step(self, batch: dict[str, Any]) -> dict[str, float]:
        """`train_step` for a policy-gradient loss."""
        t0 = time.perf_counter()
        parts = self._mini_batches(batch)
        plans = []  # per mini-batch: (micro-batches, head chunks, denominator)
        g_tokens = g_seqs = 0.0
        for part in parts:
            mbs, chunks, tokens, seqs = self._agree(build_micro_batches(part, self.lc.micro_batch_size, self.pad_id,
                                                                     shared_prompt=self.lc.shared_prompt,
                                                                     token_budget=self._token_budget()))
            for key, mine in (("global_tokens", tokens), ("global_sequences", seqs)):
                if key in part and int(part[key]) != int(mine) and self.rank == 0:
                    log.warning("%s=%s in the batch but the ranks hold %d; using %d", key, part[key], mine, mine)
            plans.append((mbs, chunks, tokens if self.ac.loss_agg == "token_mean" else seqs))
            g_tokens, g_seqs = g_tokens + tokens, g_seqs + seqs
        stats = StepStats()
        for mbs, _, _ in plans:
            stats.add_layout(mbs)
        n_micro = sum(len(p[0]) for p in plans)
        if all(d == 0 for *_, d in plans):  # nothing to learn from; identical decision on every rank
            return stats.reduce(g_tokens, g_seqs, n_micro, time.perf_counter() - t0)

        # Old log-probs: the policy before this step's first update. The first mini-batch's
        # first training forward runs before any optimizer step, so its detached output is
        # exactly them (a later epoch reuses it); only the other mini-batches, which train after
        # an update, need a no-grad pass up front. One mini-batch: no extra pass at all.
        old: list[list[torch.Tensor]] = [[] for _ in plans]
        ref: list[list[torch.Tensor]] = [[] for _ in plans]
        with torch.no_grad():
            if len(plans) > 1:
                self.engine.eval()
                for j, (mbs, chunks, _) in enumerate(plans):
                    if j == 0:
                        continue
                    for m, k in zip(mbs, chunks):
                        lp, ent = self._forward(self.engine, m, k, with_entropy=True)
                        old[j].append(lp)
                        stats.add_old_pass(m, lp.cpu(), ent.cpu())
                stats.mark("time/learner_old_logprobs")
            if self.ac.kl_coef > 0:
                ref = [[self._reference_logprobs(m, k) for m, k in zip(mbs, chunks)] for mbs, chunks, _ in plans]
                stats.mark("time/learner_ref_logprobs")

        self.engine.train()
        scale = backward_scale(self.world_size)
        for epoch in range(self.ac.ppo_epochs):
            for j, (mbs, chunks, denominator) in enumerate(plans):
                if denominator == 0:  # an empty mini-batch (same on every rank): no step
                    continue
                fused_old = epoch == 0 and j == 0
                for i, (m, k) in enumerate(zip(mbs, chunks)):
                    lp, ent = self._forward(self.engine, m, k, with_entropy=fused_old)
                    if fused_old:
                        old[j].append(lp.detach())
                        stats.add_old_pass(m, lp.detach().cpu(), ent.cpu())
                    extra = {}
                    if self.ac.tis_cap is not None and m.behaviour is not None:
                        w, truncated = truncated_is_weights(old[j][i], m.behaviour.to(self.device),
                                                            m.behaviour_mask.to(self.device), self.ac.tis_cap)
                        extra["is_weights"] = w
                        stats.add_tis(m, w.cpu(), truncated.cpu())
                    loss, met = self.loss_fn(
                        lp, old[j][i], m.advantages.to(self.device), m.loss_mask.to(self.device),
                        ref[j][i] if self.ac.kl_coef > 0 else None, clip_low=self.ac.clip_low,
                        clip_high=self.ac.clip_high, kl_coef=self.ac.kl_coef, kl_estimator=self.ac.kl_estimator,
                        loss_agg=self.ac.loss_agg, denominator=denominator, **extra)
                    self.engine.backward(loss * scale, scale_wrt_gas=False)
                    stats.add_micro_batch(met, m.n_tokens)
                self.engine.step()
                stats.add_optimizer_step(self.engine.get_global_grad_norm())
        stats.mark("time/learner_update")
        return stats.reduce(g_tokens, g_seqs, n_micro, time.perf_counter() - t0)

    def _preference_step(self, batch: dict[str, Any]) -> dict[str, float]:
        """A preference update (`algorithm.loss: dpo`): each mini-batch lists pairs as
        consecutive rows (chosen, rejected); the loss of a pair compares the policy's summed
        response log-probs with the reference's. Mini-batches and epochs as in `train_step`."""
        t0 = time.perf_counter()
        parts = self._mini_batches(batch)
        size = 2 * max(1, self.lc.micro_batch_size // 2)  # whole pairs in every micro-batch
        plans = []
        for part in parts:
            if len(part["input_ids"]) % 2:
                raise ValueError(f"rank {self.rank}: a preference batch needs (chosen, rejected) rows in pairs")
            mbs, chunks, _, _ = self._agree(build_micro_batches(part, size, self.pad_id, keep_order=True,
                                                                shared_prompt=self.lc.shared_prompt,
                                                                token_budget=self._token_budget()))
            pairs = torch.tensor([len(part["input_ids"]) // 2], dtype=torch.float64)
            dist.all_reduce(pairs)
            plans.append((mbs, chunks, float(pairs)))
        with torch.no_grad():  # the reference is fixed: once, before any update
            self.engine.eval()
            ref = [[_sequence_logprobs(self._reference_logprobs(m, k), m) for m, k in zip(mbs, chunks)]
                   for mbs, chunks, _ in plans]
        pc, sums, steps, norm = self.ac.preference, Counter(), 0, 0.0
        self.engine.train()
        scale = backward_scale(self.world_size)
        for _ in range(self.ac.ppo_epochs):
            for j, (mbs, chunks, n_pairs) in enumerate(plans):
                if n_pairs == 0:  # no pair anywhere (same on every rank): no step
                    continue
                for i, (m, k) in enumerate(zip(mbs, chunks)):
                    seq = _sequence_logprobs(self._forward(self.engine, m, k)[0], m)
                    if m.n_real == 0:  # a filler micro-batch: joins the collectives, adds nothing
                        loss, met = seq.sum() * 0.0, {}
                    else:
                        r = ref[j][i].to(seq.device)
                        loss, met = self.loss_fn(seq[0::2], seq[1::2], r[0::2], r[1::2], beta=pc.beta,
                                                 label_smoothing=pc.label_smoothing, denominator=n_pairs)
                    self.engine.backward(loss * scale, scale_wrt_gas=False)
                    sums.update(met)
                self.engine.step()
                steps += 1
                g = self.engine.get_global_grad_norm()
                norm += float(g) if g is not None else float("nan")
        keys = ("loss_sum", "pairs", "accuracy_sum", "margin_sum", "chosen_reward_sum", "rejected_reward_sum")
        total = torch.tensor([sums[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(total)
        t = dict(zip(keys, total.tolist()))
        n = max(t["pairs"], 1.0)
        seconds = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # identical metrics on every rank
        return {"loss/total": t["loss_sum"] / n, "dpo/accuracy": t["accuracy_sum"] / n,
                "dpo/margin": t["margin_sum"] / n, "dpo/reward_chosen": t["chosen_reward_sum"] / n,
                "dpo/reward_rejected": t["rejected_reward_sum"] / n, "learner/optimizer_steps": float(steps),
                "learner/pairs": sum(p for *_, p in plans), "policy/grad_norm": norm / max(steps, 1),
                "time/learner_step": float(seconds)}

    # ------------------------------------------------------------------ weights out

    def _sources(self, remove_duplicate: bool = True) -> list:
        # named_parameters() drops duplicates: with tied embeddings only
        # model.embed_tokens.weight appears, which is what vLLM loads (it skips lm_head.*).
        # With LoRA an adapted weight is served merged (learners.lora).
        return weight_sources(self.hf_model, remove_duplicate)

    def _served_values(self, sources: list, private: bool = True):
        """Each source's full (merged) tensor on rank 0, None elsewhere; drive to the end on every
        rank. `private=False`: unpartitioned values may be the parameters themselves (a reader
        done before the next update)."""
        return merged_values(sources, iter_full_params([p for _, ps, _ in sources for p in ps],
                                                       rank=self.rank, zero3=self.zero3, private=private))

    def weight_metadata(self) -> list[tuple[str, tuple[int, ...], str]]:
        """(HF name, full shape, dtype) of every parameter, in the order broadcast_weights sends."""
        return [(n, full_shape(ps[0]), dtype_name(ps[0])) for n, ps, _ in self._sources()]

    def init_weight_sync(self, host: str, port: int, world_size: int, backend: str) -> None:
        """Rank 0 joins the weight-broadcast group as its rank 0 (blocks until every receiver has
        joined, so the driver calls this concurrently with the receivers); other ranks: no-op."""
        if self.rank == 0:
            # gloo stages through host memory on both sides (a receiver holds its buckets on CPU too)
            device = "cpu" if backend == "gloo" or self.device.type == "cpu" else str(self.device)
            if self.transport is not None:  # re-formed after an engine was replaced
                self.transport.close()
            self.transport = make_transport(host, port, 0, world_size, backend, device)

    def broadcast_weights(self) -> dict[str, float]:
        """All ranks: gather bucket by bucket; rank 0 streams the full tensors to the receivers."""
        t0 = time.perf_counter()
        sources = self._sources()
        metas = [TensorMeta(n, full_shape(ps[0]), dtype_name(ps[0])) for n, ps, _ in sources]
        tensors = self._served_values(sources, private=False)
        try:
            if self.rank == 0 and self.transport is not None:
                self.transport.send(metas, tensors)
        finally:
            for _ in tensors:  # other ranks, and a rank 0 whose send failed, still join every gather
                pass
        if self.rank == 0 and self.transport is None:
            raise RuntimeError("broadcast_weights before init_weight_sync")
        nbytes = sum(full_numel(ps[0]) * ps[0].element_size() for _, ps, _ in sources)
        return {"seconds": time.perf_counter() - t0, "bytes": float(nbytes), "tensors": float(len(metas))}

    def gathered_digest(self, names: list[str] | None = None) -> dict[str, list[float]]:
        """All ranks call; rank 0 returns {name: [sum_f64, v[0], v[numel//2], v[-1]]} of the full
        served parameters (merged with LoRA; values in the parameter's dtype, as float64); other
        ranks return {}. `names` may include aliases such as a tied lm_head.weight."""
        every = {n: (ps, c) for n, ps, c in self._sources(remove_duplicate=False)}
        names = [n for n, _, _ in self._sources()] if names is None else list(names)
        unknown = [n for n in names if n not in every]
        if unknown:
            raise KeyError(f"unknown parameter names: {unknown[:5]}")
        # Gather each distinct source once (a tied alias would otherwise be gathered twice).
        unique = {id(every[n][0][0]): (n, *every[n]) for n in names}
        values = self._served_values(list(unique.values()), private=False)
        by_id = {key: digest(t) for key, t in zip(unique, values) if t is not None}
        return {n: by_id[id(every[n][0][0])] for n in names} if self.rank == 0 else {}

    def save_hf(self, path: str) -> str:
        """All ranks call; rank 0 writes a Hugging Face directory (safetensors, config, tokenizer).
        With LoRA: the merged model, plus the adapter alone under `path/adapter` (peft format)."""
        adapter = None
        if self.peft is not None:
            sources = self._sources()
            state = dict(zip([n for n, _, _ in sources], self._served_values(sources)))
            named = adapter_parameters(self.peft)
            adapter = dict(zip([n for n, _ in named], iter_full_params([p for _, p in named], rank=self.rank,
                                                                      zero3=self.zero3)))
        else:
            # ZeRO-3: DeepSpeed's consolidation gathers one module at a time onto rank 0's CPU
            # (None elsewhere). Either way LogprobModule's "model." prefix is dropped.
            full = self.engine._zero3_consolidated_16bit_state_dict() if self.zero3 else \
                (self.engine.module.state_dict() if self.rank == 0 else None)
            state = {k.removeprefix("model."): v for k, v in full.items()} if full is not None else None
        if self.rank == 0:
            extra = None if adapter is None else \
                (lambda tmp: self.peft.save_pretrained(str(tmp / "adapter"), state_dict=adapter))
            checkpoint_io.write_hf_dir(self.hf_model, state, self.model_dir, path, extra=extra)
        dist.barrier()
        return path

    def save_checkpoint(self, path: str, tag: str | None = None) -> None:
        """All ranks: DeepSpeed checkpoint (partitioned weights, optimizer state) plus this
        rank's torch RNG state, for exact resume. Every rank writes into `path`."""
        self.engine.save_checkpoint(path, tag=tag, client_state={"torch_rng_state": torch.get_rng_state()})

    def load_checkpoint(self, path: str, tag: str | None = None) -> None:
        """All ranks: restore what `save_checkpoint` wrote (same number of ranks)."""
        loaded, client = self.engine.load_checkpoint(path, tag=tag)
        if loaded is None:
            raise FileNotFoundError(f"rank {self.rank}: no DeepSpeed checkpoint under {path} (tag {tag})")
        if client and "torch_rng_state" in client:
            torch.set_rng_state(client["torch_rng_state"])

    def communication_backend(self) -> str:
        """The accelerator's collective backend as DeepSpeed names it ("gloo" or "ccl" on CPU,
        "nccl" on CUDA): the driver chooses the weight-sync backend from it."""
        return get_accelerator().communication_backend_name()

    def peak_rss_gib(self) -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    def shutdown(self) -> None:
        """Local to this rank (no collective): the driver may call the ranks one after another,
        and a rank may already be gone. The engines are freed before the process group, not at
        interpreter exit after it."""
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        release_engines([self.engine, self.ref])
        self.engine = self.ref = None
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()
