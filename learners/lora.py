"""LoRA adapters (peft) on the learner's model, and the merged weights the engines receive.

With an adapter, a base weight W of a targeted Linear is served as W + (alpha / r) * B @ A:
`weight_sources` lists every HF parameter name with the tensors it is made of, so the weight
broadcast, the digests and the HF export gather exactly those (ZeRO-3 partitions included) and
merge them on rank 0. Without an adapter each name is one parameter, unchanged.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn

from rlsys.config import LoraConfig

ADAPTER = "default"  # peft's adapter name
Source = tuple[str, list[nn.Parameter], Callable[..., torch.Tensor] | None]


def attach_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Wrap `model` in a peft LoRA model: base weights frozen, adapters trainable (B = 0 at the
    start, so the policy begins exactly at the base). Returns the PeftModel; its
    `get_base_model()` is `model`, now holding the adapter layers."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in cfg.target_modules if t not in present]
    if missing or not cfg.target_modules:
        raise ValueError(f"learner.lora.target_modules {missing or cfg.target_modules} match no module of the "
                         f"model; its Linear names include {sorted(n for n in present if n.endswith('proj'))}")
    return get_peft_model(model, PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                                target_modules=list(cfg.target_modules), bias="none",
                                                task_type="CAUSAL_LM"))


def _merge(scaling: float) -> Callable[..., torch.Tensor]:
    def merge(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # In fp32, then back: a bf16 product would lose the small update.
        return (w.float() + scaling * (b.float() @ a.float())).to(w.dtype)
    return merge


def weight_sources(hf_model: nn.Module, remove_duplicate: bool = True) -> list[Source]:
    """(HF name, tensors, combine) for every parameter the engines load, in a fixed order.
    Adapter layers appear under their base name (`.base_layer` dropped) with (W, A, B) and the
    merge; the adapters' own parameters are not listed separately."""
    out: list[Source] = []
    for name, p in hf_model.named_parameters(remove_duplicate=remove_duplicate):
        if ".lora_" in name:
            continue
        if ".base_layer." not in name:
            out.append((name, [p], None))
            continue
        prefix, leaf = name.split(".base_layer.", 1)
        module = hf_model.get_submodule(prefix)
        if leaf == "weight" and ADAPTER in getattr(module, "lora_A", {}):
            out.append((f"{prefix}.weight", [p, module.lora_A[ADAPTER].weight, module.lora_B[ADAPTER].weight],
                        _merge(float(module.scaling[ADAPTER]))))
        else:
            out.append((f"{prefix}.{leaf}", [p], None))
    return out


def merged_values(sources: list[Source], values: Iterator[torch.Tensor | None]) -> Iterator[torch.Tensor | None]:
    """Each source's served tensor from the full values of its parameters, taken in order from
    `values` (rlsys zero_params.iter_full_params over every source's tensors): merged on the rank
    that holds values, None elsewhere. Drains exactly the values it needs, on every rank."""
    for _, params, combine in sources:
        got = [next(values) for _ in params]
        if got[0] is None:
            yield None
        else:
            yield combine(*got) if combine is not None else got[0]


def adapter_parameters(peft_model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The adapter's own parameters under the PeftModel's names (what peft's save expects)."""
    return [(n, p) for n, p in peft_model.named_parameters() if ".lora_" in n]
