"""Config validation: bad input stops before Ray, naming the key and what is allowed."""
import copy
import subprocess
import sys

import pytest

from rlsys.config import ConfigError, RunConfig, load_config


def test_valid_config_and_overrides(base):
    cfg = load_config(base=base, overrides=["rollout.group_size=6", "learner.lr=1e-6", "reward.aggregation=sum_then_norm"])
    assert cfg.rollout.group_size == 6 and cfg.learner.lr == 1e-6
    assert cfg.reward.aggregation == "sum_then_norm"
    assert cfg.algorithm.clip_low == 0.2 and cfg.algorithm.clip_high == 0.28


@pytest.mark.parametrize("override, fragment", [
    ("rollout.group_size=1", "rollout.group_size"),
    ("rollout.gruop_size=4", "rollout.gruop_size: unknown key"),
    ("learner.lr=fast", "learner.lr"),
    ("algorithm.loss=ppo_typo", "algorithm: Value error, loss 'ppo_typo' is not registered; known: ['grpo_clip']"),
    ("reward.weights={fmt: 1.0, style: 2.0}", "unknown reward channel(s) ['style']"),
    ("reward.length.l_min=200", "l_min (200) must not exceed l_max (100)"),
    ("rollout.max_new_tokens=4096", "must be below max_model_len"),
    ("model.path=/nonexistent/model", "model directory '/nonexistent/model' does not exist"),
    ("data.path=/nonexistent.parquet", "rlsys data synth"),
    ("model.path=pkg:unknown", "unknown packaged model"),
    ("rollout.temperature=0", "rollout.temperature"),
    ("algorithm.mini_batches=0", "algorithm.mini_batches"),
    ("algorithm.filter_groups.std_treshold=0.1", "algorithm.filter_groups.std_treshold: unknown key"),
    ("reward.functions={fmt: 'x.py:f'}", "would shadow built-in channel(s)"),
    ("reward.functions={mine: 'nope'}", "functions.mine: 'nope': expected 'module:function'"),
    ("reward.functions={mine: '/nonexistent/r.py:f'}", "file /nonexistent/r.py does not exist"),
    ("reward.functions={mine: 'no_such_module_xyz:f'}", "cannot import module 'no_such_module_xyz'"),
    ("reward.functions={mine: 'math:no_such_fn'}", "math has no function 'no_such_fn'"),
    ("reward.functions={mine: {function: 'math:sqrt', per: pair}}", "functions.mine.per"),
    ("reward.functions={mine: {function: 'math:sqrt', timeout_s: 0}}", "functions.mine.timeout_s"),
    ("reward.functions={mine: {function: 'math:sqrt', concurrency: 0}}", "functions.mine.concurrency"),
    ("reward.functions={mine: {fn: 'math:sqrt'}}", "functions.mine.fn: unknown key"),
    ("reward.functions={mine: {function: 'math:isclose', kwargs: {tolerance: 1}}}",
     "kwargs ['tolerance'] are not parameters of isclose"),
    ("reward.weights={mine: 1.0}", "unknown reward channel(s) ['mine']"),
    ("learner.heap_mmap_threshold_mib=0", "heap_mmap_threshold_mib=0.0: give MiB in (0, 512], 'auto' or null"),
    ("learner.zero_stage=4", "learner.zero_stage"),
    ("rollout.kv_cache_gib=0", "rollout.kv_cache_gib"),
    ("rollout.kv_cache_gib=big", "rollout.kv_cache_gib"),
])
def test_bad_values_name_the_key(base, override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(base=base, overrides=[override])
    assert fragment in str(e.value), str(e.value)


def test_reward_functions_and_algorithm_keys(base, tmp_path):
    fn = tmp_path / "my_reward.py"
    fn.write_text("def keyword(text, target_word_count=0):\n    return float('cat' in text)\n")
    cfg = load_config(base=base, overrides=[
        f"reward.functions={{kw: '{fn}:keyword'}}", "reward.weights={fmt: 0.5, kw: 1.0}",
        "algorithm.mini_batches=4", "algorithm.filter_groups.enabled=true", "algorithm.filter_groups.refill=true"])
    kw = cfg.reward.functions["kw"]
    assert (kw.function, kw.per, kw.timeout_s, kw.concurrency) == (f"{fn}:keyword", "sample", 60.0, 8)
    assert cfg.algorithm.mini_batches == 4
    assert cfg.algorithm.filter_groups.max_refill_rounds == 3
    bad = tmp_path / "broken.py"
    bad.write_text("import not_a_module_anywhere\n")
    with pytest.raises(ConfigError, match="functions.b: .*importing .*broken.py failed: ModuleNotFoundError"):
        load_config(base=base, overrides=[f"reward.functions={{b: '{bad}:f'}}"])
    # Recipe B's rule channels need no judge file; its sq channel does.
    load_config(base=base, overrides=["reward.weights={rep: -1.0}"])
    with pytest.raises(ConfigError, match="the sq channel needs reward.judge"):
        load_config(base=base, overrides=["reward.weights={sq: 1.0}"])
    # Channels from both recipes and a user function mix in one run: nothing branches on a recipe.
    mixed = load_config(base=base, overrides=[f"reward.functions={{kw: '{fn}:keyword'}}",
                                              "reward.weights={fmt: 0.5, rep: -1.0, kw: 1.0, len: 0}"])
    assert mixed.reward.active_channels() == ["fmt", "rep", "kw"]
    with pytest.raises(ConfigError, match="reward.recipe was removed"):
        load_config(base=base, overrides=["reward.recipe=polaris"])


def test_missing_model_section(base):
    del base["model"]
    with pytest.raises(ConfigError, match="model: required but missing"):
        load_config(base=base)


def test_override_syntax_error(base):
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(base=base, overrides=["rollout.group_size"])


def test_every_field_has_a_docstring():
    from pydantic import BaseModel

    from rlsys.config import RunConfig
    missing = []

    def walk(model, prefix):
        for name, field in model.model_fields.items():
            if not field.description:
                missing.append(prefix + name)
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                walk(field.annotation, prefix + name + ".")
    walk(RunConfig, "")
    assert missing == []


def test_cli_rejects_bad_config_before_ray(tmp_path, base):
    import yaml
    base["rollout"] = {"group_size": 1}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(base))
    proc = subprocess.run([sys.executable, "-m", "rlsys.cli", "train", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert "rollout.group_size" in proc.stderr and "greater than or equal to 2" in proc.stderr
    # Nothing started: no Ray banner in the output.
    assert "Ray" not in proc.stderr


def test_auto_dtype_follows_the_hardware(base):
    from rlsys.config import cpu_has_native_bf16

    amx = "processor : 0\nflags\t\t: fpu sse avx512f amx_bf16 amx_tile\n"
    epyc = "processor : 0\nflags\t\t: fpu sse avx2 avx512f avx512bw\n"
    assert cpu_has_native_bf16(amx) and cpu_has_native_bf16("flags : avx512_bf16") and not cpu_has_native_bf16(epyc)
    cfg = load_config(base=base)
    assert cfg.model.dtype == "auto"
    assert cfg.weights_dtype() == ("bfloat16" if cpu_has_native_bf16() else "float32")
    gpu = load_config(base=base, overrides=["learner.num_gpus=1"])
    assert gpu.weights_dtype() == "bfloat16"  # a GPU run: bf16 whatever the driver's CPU
    assert load_config(base=base, overrides=["model.dtype=float16"]).weights_dtype() == "float16"


def test_auto_zero_stage_and_heap_threshold_follow_the_ranks(base):
    """One rank: nothing to partition, glibc's heap, and ZeRO-0 for fp32 weights or ZeRO-1 for
    bf16 ones (whose optimizer sums micro-batch gradients in fp32); several: ZeRO-3 and the 1 MiB
    heap threshold that keeps its freed gathers out of RSS. Explicit values win."""
    several = load_config(base=base, overrides=["learner.num_ranks=2", "model.dtype=bfloat16"]).learner
    assert several.zero_stage == 3 and several.heap_mmap_threshold_mib == 1.0
    for dtype, stage in (("float32", 0), ("bfloat16", 1), ("float16", 0)):
        one = load_config(base=base, overrides=["learner.num_ranks=1", f"model.dtype={dtype}"]).learner
        assert (one.zero_stage, one.heap_mmap_threshold_mib) == (stage, None), dtype
        assert one.model_dump()["zero_stage"] == stage  # the saved config says what ran
    auto = load_config(base=base, overrides=["learner.num_ranks=1"])  # the dtype this machine picks
    assert auto.learner.zero_stage == (1 if auto.weights_dtype() == "bfloat16" else 0)
    gpu = load_config(base=base, overrides=["learner.num_ranks=1", "learner.num_gpus=1"]).learner
    assert gpu.zero_stage == 1  # bf16 on a GPU whatever the driver's CPU
    assert load_config(base=base, overrides=["learner.num_ranks=1", "model.dtype=bfloat16",
                                             "learner.zero_stage=0"]).learner.zero_stage == 0
    assert base["model"] == {"path": base["model"]["path"]}  # overrides never touched the base tree
    # A saved config read back keeps its stage, whatever the machine reading it.
    saved = load_config(base=base, overrides=["learner.num_ranks=1", "model.dtype=bfloat16"]).model_dump()
    saved["model"]["dtype"] = "float32"
    assert RunConfig.model_validate(saved).learner.zero_stage == 1
    pinned = load_config(base=base, overrides=["learner.num_ranks=1", "learner.zero_stage=3",
                                               "learner.heap_mmap_threshold_mib=4"]).learner
    assert pinned.zero_stage == 3 and pinned.heap_mmap_threshold_mib == 4.0
    glibc = load_config(base=base, overrides=["learner.heap_mmap_threshold_mib=null"]).learner
    assert glibc.heap_mmap_threshold_mib is None


def test_resume_refuses_a_checkpoint_of_another_zero_stage(base):
    """A one-rank checkpoint written at ZeRO-0 (auto before bf16 weights got stage 1) holds
    DeepSpeed state that stage 1 cannot load: resuming names the setting to restore."""
    from rlsys.checkpoint import config_differences
    now = load_config(base=base, overrides=["learner.num_ranks=1", "model.dtype=bfloat16"]).model_dump()
    then = copy.deepcopy(now)
    then["learner"]["zero_stage"] = 0
    assert config_differences(then, now) == ["learner.zero_stage: checkpoint 0, now 1"]
    assert config_differences(now, copy.deepcopy(now)) == []


def test_auto_kv_cache_holds_one_engine_step(base, tmp_path):
    """`rollout.kv_cache_gib: auto` = ceil(prompts / engines) x G sequences of max_model_len
    tokens (whole 32-token blocks) at 2 x layers x kv heads x head_dim x dtype bytes a token, from
    the model's config.json; a number passes through; a config without the fields is refused."""
    import json
    model = tmp_path / "model"
    (model / "config.json").write_text(json.dumps({"num_hidden_layers": 30, "num_attention_heads": 9,
                                                   "num_key_value_heads": 3, "hidden_size": 576}))
    gib = float(1 << 30)
    cfg = load_config(base=base, overrides=["rollout.kv_cache_gib=auto", "rollout.prompts_per_step=4",
                                            "rollout.group_size=4", "rollout.max_model_len=1536",
                                            "model.dtype=bfloat16"])
    per_token = 2 * 30 * 3 * 64 * 2                 # SmolLM2-135M in bf16: 22.5 KiB
    assert cfg.kv_cache_gib(str(model)) == pytest.approx(16 * 1536 * per_token / gib)   # 0.53 GiB
    fp32 = load_config(base=base, overrides=["rollout.kv_cache_gib=auto", "rollout.prompts_per_step=5",
                                             "rollout.num_actors=2", "rollout.group_size=4",
                                             "rollout.max_model_len=1000", "model.dtype=float32"])
    assert fp32.kv_cache_gib(str(model)) == pytest.approx(3 * 4 * 1024 * 2 * per_token / gib)  # 3 prompts, 1000 -> 1024
    assert load_config(base=base, overrides=["rollout.kv_cache_gib=0.25"]).kv_cache_gib(str(model)) == 0.25
    assert load_config(base=base).rollout.kv_cache_gib == 1.0                           # the default is unchanged
    (model / "config.json").write_text(json.dumps({"num_attention_heads": 9}))
    with pytest.raises(ValueError, match="no 'num_hidden_layers'.*set rollout.kv_cache_gib to a number"):
        cfg.kv_cache_gib(str(model))
