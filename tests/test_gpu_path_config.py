"""What a GPU run is given, checked without a GPU: the learner's process-group backend serves its
CPU-tensor collectives beside NCCL, DeepSpeed's buckets leave ZeRO-3 room to prefetch a large
model's layers, and a learner rank's GPU share is one NCCL can take."""
from __future__ import annotations

import pytest
import torch
from torch.distributed.distributed_c10d import Backend, BackendConfig

from learners.engine_setup import learner_dist_backend
from rlsys.config import ConfigError, load_config
from test_learner_memory import MIB, _zero


def _device_backends(backend: str) -> dict[str, str]:
    """Which backend torch's process group would use for each device's tensors."""
    return {k: str(v) for k, v in BackendConfig(Backend(backend)).get_device_backend_map().items()}


def test_learner_backend_on_gpus_serves_cpu_tensors_with_gloo():
    # The learner all-reduces its micro-batch counts and step metrics on CPU tensors; a bare
    # "nccl" maps CUDA tensors only, so those collectives would fail at the first step.
    assert "cpu" not in _device_backends("nccl")
    assert _device_backends(learner_dist_backend("nccl")) == {"cpu": "gloo", "cuda": "nccl"}
    assert learner_dist_backend("gloo") == "gloo"  # CPU machines: unchanged
    assert _device_backends(learner_dist_backend("gloo"))["cpu"] == "gloo"


def test_auto_buckets_on_gpus_leave_room_to_prefetch_a_large_model_s_layer():
    # Qwen3-8B in bf16 (8.2e9 parameters, ~190M a decoder layer): on GPU ranks the cap is 1 GiB,
    # so the gathered-parameter budget (2E) holds several layers; on CPU it stays 64 MiB.
    gpu = _zero(num_gpus=1, model_numel=8_190_000_000, dtype=torch.bfloat16)
    e = 1024 * MIB // 2
    assert gpu["reduce_bucket_size"] == gpu["stage3_prefetch_bucket_size"] == e
    assert gpu["stage3_max_live_parameters"] == 2 * e > 5 * 190_000_000
    assert _zero(model_numel=8_190_000_000, dtype=torch.bfloat16)["reduce_bucket_size"] == 64 * MIB // 2
    # A small model on GPU is still sized by its own bytes, and an explicit size wins.
    assert _zero(num_gpus=1, model_numel=200 * MIB // 4)["reduce_bucket_size"] == 25 * MIB // 4
    assert _zero(num_gpus=1, zero_bucket_mib=16, dtype=torch.bfloat16)["reduce_bucket_size"] == 8 * MIB


@pytest.mark.parametrize("overrides, fragment", [
    (["learner.num_ranks=2", "learner.num_gpus=0.5"], "learner.num_gpus is 0.5 with 2 ranks"),
    (["learner.num_ranks=1", "learner.num_gpus=2"], "a rank computes on one GPU"),
])
def test_learner_gpu_shares_nccl_cannot_take_are_refused(base, overrides, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(base=base, overrides=overrides)
    assert fragment in str(e.value) and "learner" in str(e.value), str(e.value)


def test_learner_gpu_shares_that_work_are_accepted(base):
    # One rank beside an engine on a one-GPU machine, and whole GPUs for several ranks.
    assert load_config(base=base, overrides=["learner.num_ranks=1", "learner.num_gpus=0.5"]).learner.num_gpus == 0.5
    assert load_config(base=base, overrides=["learner.num_ranks=4", "learner.num_gpus=1"]).learner.num_ranks == 4


def test_actors_without_a_gpu_see_none():
    # Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone for an actor that reserved no GPU; a CPU
    # learner rank or engine on a GPU node would otherwise use GPU 0 beside its owner.
    from rlsys.driver import actor_env

    cpu = actor_env(2)
    assert cpu["CUDA_VISIBLE_DEVICES"] == "" and cpu["DS_ACCELERATOR"] == "cpu"
    gpu = actor_env(None)  # a GPU actor: Ray sets its own devices
    assert "CUDA_VISIBLE_DEVICES" not in gpu and "DS_ACCELERATOR" not in gpu
