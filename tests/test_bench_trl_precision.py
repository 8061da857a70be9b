"""The TRL side of benchmarks/e2e_vs_trl.py keeps fp32 master weights, as rlsys's learner does.

With bf16 compute, rlsys trains fp32 master weights and AdamW state (DeepSpeed's bf16 optimizer).
TRL lets the weights themselves be bf16; AdamW then rounds away any update below half a weight's
bf16 spacing, so at the demo's lr 5e-6 almost no weight moves and TRL would not do the work rlsys
does. These tests pin the benchmark's choice (`trl_weights_dtype`) and its check
(`weights_moved`, recorded in the result) on a tiny model, without TRL: one real AdamW step moves
nearly every fp32 weight and almost no bf16 one. Pure torch, seconds."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from rlsys.models import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    """benchmarks/e2e_vs_trl.py (not a package), loaded once."""
    spec = importlib.util.spec_from_file_location("e2e_vs_trl", ROOT / "benchmarks" / "e2e_vs_trl.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, mod)  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


def test_trl_weights_dtype(bench):
    assert bench.trl_weights_dtype("bfloat16", "mixed") == "float32"
    assert bench.trl_weights_dtype("bfloat16", "pure") == "bfloat16"
    assert bench.trl_weights_dtype("float32", "mixed") == bench.trl_weights_dtype("float32", "pure") == "float32"
    with pytest.raises(ValueError, match="mixed or pure"):
        bench.trl_weights_dtype("bfloat16", "fp8")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_weights_moved_after_one_adamw_step(bench, tiny_dir, dtype):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=getattr(torch, dtype))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-6, weight_decay=0.0)
    before = bench.weights_moved(model, opt, tiny_dir)
    n_params = sum(p.numel() for p in model.parameters())
    assert before["elements_compared"] == n_params  # every trained weight was compared
    assert before["moved_share"] == 0.0 and before["optimizer_state_dtypes"] == []

    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    after = bench.weights_moved(model, opt, tiny_dir)
    assert after["param_dtypes"] == after["optimizer_state_dtypes"] == [f"torch.{dtype}"]
    if dtype == "float32":
        assert after["moved_share"] > 0.9, after   # Adam's first step moves every weight with a gradient by ~lr
    else:
        assert after["moved_share"] < 0.2, after   # lr 5e-6 is below half the bf16 spacing of most weights
