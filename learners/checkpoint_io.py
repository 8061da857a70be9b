"""Writing a Hugging Face model directory atomically (rank 0 only)."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

# Written by save_pretrained itself, or weights: never copied over from the source directory.
_OWN_FILES = {"config.json", "generation_config.json"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")


def write_hf_dir(model: nn.Module, state: dict[str, torch.Tensor], source_dir: str, path: str) -> None:
    """Save `state` with `model`'s config as safetensors plus the tokenizer files of
    `source_dir` into `path`, replacing any previous directory there.

    Built in a temporary sibling and renamed into place, so a reader (vLLM, a resumed run) never
    sees a half-written checkpoint. An existing `path` is first renamed aside and deleted after
    the new one is in place: rename(2) cannot replace a non-empty directory.
    """
    dest = Path(path).expanduser().resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    old: Path | None = None
    try:
        # save_pretrained drops the tied lm_head.weight alias itself (tie_word_embeddings).
        model.save_pretrained(str(tmp), state_dict=state)
        for f in Path(source_dir).iterdir():
            if f.is_file() and not f.name.startswith(".") and f.name not in _OWN_FILES \
                    and not f.name.endswith(_WEIGHT_SUFFIXES):
                shutil.copy2(f, tmp / f.name)
        # mkdtemp (and safetensors' writer) make things private; a checkpoint is meant to be shared.
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.replace(dest, old / dest.name)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
