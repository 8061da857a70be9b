"""Recipe C through the real stack, as shipped (configs/storyteller_dpo.yaml via `rlsys train`),
with only the model swapped for a tiny random one and the run shortened: synthetic real and
shuffled frame sequences, the storyteller channels on every sample, best-vs-worst pairs, DPO on a
LoRA adapter under two DeepSpeed ZeRO-3 ranks, merged weights into vLLM, and checkpoints that
hold both the adapter and a merged model.

A random model never writes the structured story, so the recipe's own channels are 0 for every
sample (the gate) and would make no pair; a learnable channel (tests/reward_fns.py) is added so
that pairs exist and the update path runs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]


def test_storyteller_dpo_recipe_runs_as_shipped(tmp_path):
    import pyarrow.parquet as pq
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rlsys.data.storyteller import write_storyteller_dataset
    from rlsys.models import build_tiny_model
    from rlsys.tracking import read_metrics

    model = build_tiny_model(tmp_path / "model", seed=0)
    data = write_storyteller_dataset(tmp_path / "data", n=12, seed=0, fmt="jsonl")["train"]
    out = tmp_path / "run"
    share = f"{ROOT / 'tests' / 'reward_fns.py'}:share_a_to_m"
    cmd = [sys.executable, "-m", "rlsys.cli", "train", str(ROOT / "configs" / "storyteller_dpo.yaml"),
           f"model.path={model}", "model.dtype=float32", f"data.path={data}", f"train.output_dir={out}",
           "rollout.prompts_per_step=4", "rollout.max_new_tokens=24", "rollout.kv_cache_gib=0.25",
           "rollout.max_model_len=1024", "learner.lora.rank=8", "learner.lora.alpha=16", "learner.lr=1e-2",
           "learner.gradient_checkpointing=false", "cluster.num_cpus=8", "cluster.object_store_gib=0.5",
           f"reward.functions={{share: '{share}'}}",
           "reward.weights={st_struct: 1.0, st_reid: 1.0, st_ground: 0.5, share: 1.0}",
           "train.steps=2", "train.save_every=2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]

    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["pairs/pairs"] >= 1 and m["learner/optimizer_steps"] == 3  # card: 3 epochs, batch = the pairs
        assert m["learner/pairs"] == m["pairs/pairs"] and 0 <= m["dpo/accuracy"] <= 1
        assert m["reward/st_struct"] == 0.0 and m["reward/st_reid"] == 0.0  # the gate: no structure, no credit
    rows = pq.read_table(out / "rollouts" / "step-000001.parquet").to_pylist()
    assert {"reward_st_struct", "reward_st_reid", "reward_st_ground", "reward_share"} <= set(rows[0])
    assert len(rows) == 4 * 4

    # Final and periodic checkpoints: a merged model vLLM/transformers load, plus the adapter.
    final = out / "final"
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000002"
    for hf in (final, out / "checkpoints" / "step-000002" / "hf"):
        assert (hf / "adapter" / "adapter_config.json").is_file(), hf
    merged = AutoModelForCausalLM.from_pretrained(str(final), dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32),
                                        str(final / "adapter"))
    ids = torch.tensor([[5, 17, 230, 41, 9, 88]])
    with torch.no_grad():
        m_logits, b_logits = merged(input_ids=ids).logits, base(input_ids=ids).logits
        assert torch.allclose(adapted(input_ids=ids).logits, m_logits, atol=1e-4)
    assert not torch.allclose(m_logits, b_logits, atol=1e-6)  # two DPO steps moved the policy
