"""Writing a Hugging Face model directory atomically (rank 0 only)."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from rlsys.atomic import staging_dir

# Written by save_pretrained itself, or weights: never copied over from the source directory.
_OWN_FILES = {"config.json", "generation_config.json"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")


def write_hf_dir(model: nn.Module, state: dict[str, torch.Tensor], source_dir: str, path: str,
                 extra: Callable[[Path], None] | None = None) -> None:
    """Save `state` with `model`'s config as safetensors plus the tokenizer files of
    `source_dir` into `path`, replacing any previous directory there.

    Built in a temporary sibling and renamed into place, so a reader (vLLM, a resumed run) never
    sees a half-written checkpoint. An existing `path` is first renamed aside and deleted after
    the new one is in place: rename(2) cannot replace a non-empty directory. `extra(tmp)` may add
    files (a LoRA adapter) before the rename.
    """
    with staging_dir(path) as tmp:
        # save_pretrained drops the tied lm_head.weight alias itself (tie_word_embeddings).
        model.save_pretrained(str(tmp), state_dict=state)
        for f in Path(source_dir).iterdir():
            if f.is_file() and not f.name.startswith(".") and f.name not in _OWN_FILES \
                    and not f.name.endswith(_WEIGHT_SUFFIXES):
                shutil.copy2(f, tmp / f.name)
        if extra is not None:
            extra(tmp)
        for f in tmp.rglob("*"):  # safetensors' writer makes files private; a checkpoint is shared
            f.chmod(0o755 if f.is_dir() else 0o644)
