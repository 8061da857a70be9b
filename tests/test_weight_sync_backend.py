"""Which backend the weight-sync group uses: NCCL only where every rank holds a GPU of its own
(NCCL refuses two ranks of one group on one GPU, which is where fractional num_gpus put a learner
and an engine on a one-GPU machine), else gloo through host memory; an explicit `nccl` that
cannot work is refused with the fix. Placement is read from a real Ray head that declares GPUs."""
from __future__ import annotations

import pytest

from rlsys.weight_sync import choose_backend

A, B = "10.0.0.1", "10.0.0.2"


def test_nccl_where_every_rank_has_its_own_gpu():
    assert choose_backend("auto", "nccl", (A, ("0",)), [(A, ("1",)), (B, ("0",))])[0] == "nccl"
    assert choose_backend("nccl", "nccl", (A, ("0",)), [(A, ("1",))])[0] == "nccl"


def test_auto_falls_back_to_gloo_and_says_why():
    backend, why = choose_backend("auto", "nccl", (A, ("0",)), [(A, ("1",)), (A, ("0",))])
    assert backend == "gloo" and "rollout engine(s) 1 (GPU 0) share a GPU with learner rank 0" in why
    backend, why = choose_backend("auto", "nccl", (A, ("0",)), [(A, ())])
    assert backend == "gloo" and "rollout engine(s) [0] have no GPU" in why
    backend, why = choose_backend("auto", "nccl", (A, ()), [(A, ("0",))])
    assert backend == "gloo" and "learner rank 0 has no GPU" in why
    # CPU runs: DeepSpeed's CPU accelerator names gloo (or oneCCL, which the transport lacks).
    for accelerator in ("gloo", "ccl"):
        assert choose_backend("auto", accelerator, (A, ()), [(A, ())]) == (
            "gloo", f"the learner's accelerator communicates over {accelerator}")


def test_explicit_choices():
    assert choose_backend("gloo", "nccl", (A, ("0",)), [(A, ("0",))])[0] == "gloo"
    with pytest.raises(ValueError, match=r"nccl cannot work here: rollout engine\(s\) 0 \(GPU 0\) share a GPU "
                                         r".*learner.num_gpus: 1, rollout.num_gpus: 1"):
        choose_backend("nccl", "nccl", (A, ("0", "1")), [(A, ("0",)), (B, ("0",))])
    with pytest.raises(ValueError, match="not one of auto, gloo, nccl"):
        choose_backend("mpi", "nccl", (A, ("0",)), [(B, ("0",))])


def test_nccl_without_gpus_is_refused_by_the_config(base):
    from rlsys.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"weight_sync_backend: nccl needs a GPU .*rollout.num_gpus is 0"):
        load_config(base=base, overrides=["cluster.weight_sync_backend=nccl", "learner.num_gpus=1"])
    cfg = load_config(base=base, overrides=["cluster.weight_sync_backend=nccl", "learner.num_gpus=1",
                                            "rollout.num_gpus=0.5"])
    assert cfg.cluster.weight_sync_backend == "nccl"


@pytest.mark.e2e
@pytest.mark.parametrize("ray_local", [{"num_gpus": 2}], indirect=True)
def test_actors_sharing_a_gpu_are_seen_sharing_it(ray_local):
    """Ray places a learner and an engine of num_gpus 0.5 on one GPU (declared, none needed): the
    places the directory records make `auto` choose gloo and `nccl` fail before any broadcast."""
    from rlsys.cluster import ActorDirectory

    ray = ray_local

    @ray.remote(num_cpus=0)
    class Rank:
        pass

    half = [Rank.options(num_gpus=0.5).remote() for _ in range(2)]
    whole = Rank.options(num_gpus=1).remote()
    none = Rank.remote()
    actors = ActorDirectory()
    for i, a in enumerate([*half, whole, none]):
        actors.add(a, f"actor {i}")
    actors.locate([*half, whole, none], timeout=60)
    learner, engine, own, bare = (actors.place(a) for a in (*half, whole, none))
    assert learner == engine and len(learner[1]) == 1, (learner, engine)
    assert own[1] and not set(own[1]) & set(learner[1]) and bare[1] == ()
    assert "(GPU " in actors.name(whole._actor_id.hex())
    assert choose_backend("auto", "nccl", learner, [engine])[0] == "gloo"
    assert choose_backend("auto", "nccl", learner, [own])[0] == "nccl"
    with pytest.raises(ValueError, match="share a GPU"):
        choose_backend("nccl", "nccl", learner, [own, engine])
