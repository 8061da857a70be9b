"""One learner rank (what a run with `learner.num_ranks: 1` has): the whole model, no partition
gathers. `zero_stage: auto` picks stage 0 for fp32 weights and 1 for bf16 ones (rlsys.config),
and stage 0 stays selectable for bf16: each trains, broadcasts, saves and resumes exactly, and
sums micro-batch gradients in fp32 except bf16 at stage 0 (the reason auto picks 1 there).
A module of its own: its private Ray cannot share a module with test_learner's."""
from __future__ import annotations

import threading

import pytest
import torch

from rlsys.models import build_tiny_model
from test_learner import E2E_LC, KL, _e2e_batches, _rank_batches, _reference_grad_norm

# (weights' dtype, zero_stage, the stage it runs at, DeepSpeed's optimizer wrapper)
ONE_RANK = [("float32", "auto", 0, "AdamW"), ("bfloat16", 1, 1, "BF16_Optimizer"),
            ("bfloat16", 0, 0, "FP16_UnfusedOptimizer")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny256", seed=0, hidden_size=256)


@pytest.fixture(scope="module", params=ONE_RANK, ids=lambda p: f"{p[0]}-zero{p[2]}")
def one_rank(request, model_dir):
    from learner_ranks import learner_ranks

    from rlsys.config import AlgorithmConfig, LearnerConfig

    dtype, stage, runs_at, wrapper = request.param
    ac = AlgorithmConfig(kl_coef=KL, ppo_epochs=1, max_staleness=0)
    # Packed micro-batches of 64 tokens: the 5 sequences need 2 of them.
    lc = LearnerConfig(**{**E2E_LC, "num_ranks": 1, "zero_stage": stage, "micro_batch_tokens": 64})
    assert lc.zero_stage == runs_at and lc.heap_mmap_threshold_mib is None
    with learner_ranks(model_dir, lc, ac, world=1, dtype=dtype) as r:
        yield {**r, "dtype": dtype, "stage": runs_at, "wrapper": wrapper}


@pytest.mark.e2e
def test_one_rank_trains_broadcasts_saves_and_resumes(one_rank, model_dir, tmp_path):
    import ray
    from transformers import AutoModelForCausalLM

    from learners.zero_params import digest
    from rlsys.weight_sync import TensorMeta

    def _master_mlp_weight(learner) -> torch.Tensor:
        """A copy of the fp32 weights the optimizer steps for the first MLP matrix: DeepSpeed's master
        copy in bf16 (FP16_UnfusedOptimizer's list at stage 0, BF16_Optimizer's flat buffer at 1),
        the parameter itself in fp32. Runs in the learner actor (nested: Ray pickles it by value)."""
        from deepspeed.utils import safe_get_full_fp32_param

        p = next(q for n, q in learner.engine.module.named_parameters() if "mlp" in n)
        opt = learner.engine.optimizer
        master = {id(a): b for lo, hi in zip(getattr(opt, "fp16_groups", []), getattr(opt, "fp32_groups", []))
                  for a, b in zip(lo, hi)}
        if id(p) in master:
            return master[id(p)].detach().clone()
        return (p if p.dtype == torch.float32 else safe_get_full_fp32_param(p)).detach().float().clone()

    learner = one_rank["learners"][0]
    seqs, advs, _ = _e2e_batches()
    batch = _rank_batches(seqs, advs, [len(seqs)])[0]
    want_norm = _reference_grad_norm(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), seqs, advs)

    assert ray.get(learner.__ray_call__.remote(lambda s: (
        s.zero3, s.engine.zero_optimization_stage(), type(s.engine.optimizer).__name__))) == \
        (False, one_rank["stage"], one_rank["wrapper"])
    metas = [TensorMeta(n, tuple(s), d) for n, s, d in ray.get(learner.weight_metadata.remote())]
    before = ray.get(learner.gathered_digest.remote())
    assert set(before) == {m.name for m in metas}

    ray.get(learner.__ray_call__.remote(lambda s: setattr(s, "master_before", _master_mlp_weight(s))))
    m = ray.get(learner.train_step.remote(batch))
    # Adam's first step moves every weight by lr (m / sqrt(v) = +-1): one step counted, not two.
    def adam_steps_and_median_move(s) -> tuple[list[float], float]:
        adam = getattr(s.engine.optimizer, "optimizer", s.engine.optimizer)  # inside DeepSpeed's wrapper
        return (sorted({float(st["step"]) for st in adam.state.values()}),
                float((_master_mlp_weight(s) - s.master_before).abs().median()))

    steps, moved = ray.get(learner.__ray_call__.remote(adam_steps_and_median_move))
    assert steps == [1.0] and moved == pytest.approx(E2E_LC["lr"], rel=1e-2), (steps, moved)
    # The exact gradient, packed (bf16: the tiny model's weights and activations rounded to bf16).
    assert m["policy/grad_norm"] == pytest.approx(want_norm, rel=1e-4 if one_rank["dtype"] == "float32" else 3e-2)
    assert m["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-6) and m["learner/optimizer_steps"] == 1
    assert m["learner/micro_batches_per_rank"] == 2
    after = ray.get(learner.gathered_digest.remote())
    # Every parameter moved; in bf16 except the norm weights: they are 1.0, where a bf16 step is
    # 2^-7, and lr 1e-3 moves them only in the fp32 master weights.
    unchanged = [n for n in before if after[n] == before[n]]
    assert unchanged == [] if one_rank["dtype"] == "float32" else all("norm" in n for n in unchanged), unchanged
    assert len(unchanged) < len(before) // 2

    # Broadcast: what arrives equals the learner's weights.
    got: dict[str, list[float]] = {}
    th = threading.Thread(target=lambda: got.update({n: digest(t.clone()) for n, t in one_rank["transport"].receive(metas)}))
    th.start()
    ray.get(learner.broadcast_weights.remote())
    th.join(60)
    assert got == after
    # ... sent from the parameters themselves, no bucket copied: at stage 0 rlsys packed them into
    # one buffer, at stage 1 DeepSpeed's BF16_Optimizer flattened them into its own.
    packed, sent = ray.get(learner.__ray_call__.remote(lambda s: (s.packed_bytes, s.transport.last_send_buckets)))
    assert packed == (sum(m.numel * m.torch_dtype.itemsize for m in metas) if one_rank["stage"] == 0 else 0)
    assert sent["copied"] == 0 and sent["as_they_lay"] > 0, sent

    # save_hf: a Hugging Face directory with exactly these weights.
    out = ray.get(learner.save_hf.remote(str(tmp_path / "hf")))
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert {n: digest(p.detach()) for n, p in saved.named_parameters()} == after

    # DeepSpeed checkpoint: weights and optimizer state come back (the step after loading repeats
    # the step after saving, Adam moments included).
    ckpt = str(tmp_path / "ds")
    ray.get(learner.save_checkpoint.remote(ckpt))
    redo = []
    for _ in range(2):
        redo.append(ray.get(learner.train_step.remote(batch)))
        assert ray.get(learner.gathered_digest.remote()) != after
        ray.get(learner.load_checkpoint.remote(ckpt))
        assert ray.get(learner.gathered_digest.remote()) == after
    for k in ("loss/total", "loss/kl", "policy/grad_norm", "policy/ratio_mean"):
        assert redo[0][k] == pytest.approx(redo[1][k], rel=1e-6), k
    assert redo[0]["loss/kl"] > 0


@pytest.mark.e2e
def test_micro_batch_gradients_sum_in_fp32_except_bf16_at_stage_0(one_rank):
    """Four backward passes through the engine, as four micro-batches of one step: gradient g,
    then three of g * 2^-10 (g = 2^-12 keeps the norm under the clip). Summed in fp32 the
    optimizer gets g (1 + 3 * 2^-10); summed in bf16 (8 mantissa bits) each g * 2^-10 is below
    half a unit in the last place of g and is lost. Checked both in the summed gradient and in
    what AdamW reads inside `engine.step()`: with one rank DeepSpeed's all-reduce at the step is
    off (engine_setup.skip_one_rank_allreduce); it cast the fp32 sums to bf16, its communication
    dtype, and back, which lost the same bits."""
    import ray

    g = 2.0 ** -12

    def accumulate(s) -> tuple[str, list[float], list[float], bool]:
        from deepspeed.utils import safe_get_full_grad

        p = next(q for q in s.engine.module.parameters() if q.requires_grad)
        s.engine.optimizer.zero_grad()
        for c in (g, g * 2.0 ** -10, g * 2.0 ** -10, g * 2.0 ** -10):
            s.engine.backward(p.float().sum() * c, scale_wrt_gas=False)
        summed = safe_get_full_grad(p).float()
        adam = getattr(s.engine.optimizer, "optimizer", s.engine.optimizer)
        seen: list[float] = []
        real_step = adam.step

        def spy(*args, **kwargs):  # the largest gradient AdamW steps on: p's (every other is 0)
            seen.append(max(q.grad.float().abs().max().item() for grp in adam.param_groups for q in grp["params"]
                            if q.grad is not None))
            return real_step(*args, **kwargs)

        adam.step = spy
        try:
            s.engine.step()
        finally:
            del adam.step
        return (str(p.dtype), sorted({summed.min().item(), summed.max().item()}), seen,
                s.engine.enable_backward_allreduce)

    dtype, sums, stepped, allreduce = ray.get(one_rank["learners"][0].__ray_call__.remote(accumulate))
    assert dtype == f"torch.{one_rank['dtype']}" and allreduce is False
    lost = one_rank["dtype"] == "bfloat16" and one_rank["stage"] == 0
    want = g if lost else g * (1 + 3 * 2.0 ** -10)
    assert sums == [want] and stepped == [want], (sums, stepped)


def test_reset_materialised_adam_steps_only_where_nothing_moved():
    """A zero-gradient step (DeepSpeed's start-up at stage 0 in fp16/bf16) is uncounted again;
    a state a real gradient made is left alone; Adam's next step is then a first step (+-lr)."""
    from types import SimpleNamespace

    from learners.engine_setup import reset_materialised_adam_steps

    fresh, trained = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    adam = torch.optim.AdamW([fresh, trained], lr=0.1, weight_decay=0.0)
    fresh.grad, trained.grad = torch.zeros(4), torch.full((4,), 0.5)
    adam.step()
    assert reset_materialised_adam_steps(SimpleNamespace(optimizer=adam)) == 1  # through a wrapper
    assert (float(adam.state[fresh]["step"]), float(adam.state[trained]["step"])) == (0.0, 1.0)
    assert reset_materialised_adam_steps(adam) == 0
    fresh.grad, trained.grad = torch.full((4,), -2.0), None
    adam.step()
    assert torch.allclose(fresh.detach(), torch.full((4,), 1.1))  # without the reset: 1 + 0.0744
