"""actors.top_p: top-p (alone or after top-k) from the largest logits keeps the logits vLLM's
sort-based filter keeps (the same values; among tied ones maybe others), falls back to it for
flat rows and for a top-k beyond the candidates, and is installed into vLLM's CPU sampler by name."""
from __future__ import annotations

import pytest
import torch

from actors.top_p import CANDIDATES, top_k_top_p_filter_, top_p_filter_

vllm_sampler = pytest.importorskip("vllm.v1.sample.ops.topk_topp_sampler")
VOCAB = 49152


def vllm_filter(logits: torch.Tensor, k, p) -> torch.Tensor:
    return vllm_sampler.apply_top_k_top_p_pytorch(logits, k, p, allow_cpu_sync=True)


def assert_same_nucleus(got: torch.Tensor, want: torch.Tensor, logits: torch.Tensor) -> None:
    """Row by row: as many tokens kept, with the same logit values, the kept ones unchanged
    and the others -inf. The count may differ by one token in one row of a batch: where the
    mass above the boundary token equals p to fp32 rounding (the two filters sum in opposite
    orders)."""
    kept_got, kept_want = torch.isfinite(got), torch.isfinite(want)
    off = 0
    for i in range(got.shape[0]):
        n_got, n_want = int(kept_got[i].sum()), int(kept_want[i].sum())
        assert n_got >= 1
        if n_got != n_want:
            off += 1
            assert abs(n_got - n_want) == 1, (i, n_got, n_want)
            continue
        assert torch.equal(got[i][kept_got[i]].sort().values, want[i][kept_want[i]].sort().values), i
    assert off <= 1
    assert torch.equal(got[kept_got], logits[kept_got])              # kept logits untouched
    assert bool((got[~kept_got] == -float("inf")).all())


def _logits(b: int, scale: float, seed: int) -> torch.Tensor:
    """Rows shaped like a language model's: a few likely tokens over a heavy tail."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(b, VOCAB, generator=g) * scale
    base[:, :50] += torch.rand(b, 50, generator=g) * 4 * scale   # a head of plausible tokens
    return base / 0.7                                            # the sampler's temperature


@pytest.mark.parametrize("scale", [1.0, 2.0, 4.0, 8.0])
@pytest.mark.parametrize("p", [0.5, 0.9, 0.95, 0.99])
def test_keeps_what_vllm_keeps(scale: float, p: float) -> None:
    logits = _logits(16, scale, seed=int(scale * 100 + p * 1000))
    ps = torch.full((16,), p)
    want = vllm_filter(logits.clone(), None, ps)
    calls = []

    def fallback(x, k, pp):
        calls.append(x.shape[0])
        return vllm_filter(x, k, pp)

    got, n_fallback = top_p_filter_(logits.clone(), ps, fallback)
    assert n_fallback == sum(calls)
    assert_same_nucleus(got, want, logits)
    # continuous random logits never tie: exactly the same tokens
    assert int((torch.isfinite(got) != torch.isfinite(want)).sum()) <= 1


def test_bf16_logits_tie_and_keep_as_many_of_the_tie() -> None:
    """A bf16 model's logits take few distinct values: the boundary often falls inside a run of
    equal logits (a real SmolLM2 run: 94 of 995 sampled rows). Both filters then keep the same
    number of them, so the same values, and the same mass."""
    logits = torch.cat([_logits(8, 2.0, seed=7), _logits(8, 4.0, seed=8)]).to(torch.bfloat16).float()
    logits[:4, 1000:1100] = 15.0    # 100 equal tokens holding ~99 % of the mass: p=0.95 cuts inside them
    ps = torch.full((16,), 0.95)
    want = vllm_filter(logits.clone(), None, ps)
    got, _ = top_p_filter_(logits.clone(), ps, vllm_filter)
    assert_same_nucleus(got, want, logits)
    kept = torch.isfinite(got[:4, 1000:1100]).sum(dim=1)
    assert bool(((kept > 50) & (kept < 100)).all()), kept   # a strict part of the tie


def test_peaked_rows_need_no_sort_and_flat_rows_fall_back() -> None:
    peaked = _logits(4, 8.0, seed=1)
    flat = torch.randn(3, VOCAB) * 0.01                 # ~uniform: 256 tokens hold ~0.5 % of the mass
    logits = torch.cat([peaked, flat])
    ps = torch.full((7,), 0.95)
    seen = []

    def fallback(x, k, pp):
        seen.append(x.clone())
        return vllm_filter(x, k, pp)

    got, n_fallback = top_p_filter_(logits.clone(), ps, fallback)
    assert n_fallback == 3 and len(seen) == 1 and torch.equal(seen[0], flat)
    want = vllm_filter(logits.clone(), None, ps)
    assert_same_nucleus(got, want, logits)
    assert torch.equal(torch.isfinite(got[4:]), torch.isfinite(want[4:]))
    assert int(torch.isfinite(got[4:]).sum(dim=1).min()) > 256  # the flat rows keep far more than the candidates
    assert int(torch.isfinite(got[:4]).sum(dim=1).max()) <= 256


def test_one_dominant_token_and_p_one_and_masked_tokens() -> None:
    logits = torch.zeros(3, VOCAB)
    logits[0, 7] = 100.0                                # everything on one token: only it is kept
    logits[1] = torch.randn(VOCAB)
    logits[2] = torch.randn(VOCAB) * 5
    logits[2, :10] = -float("inf")                      # tokens a logits processor already removed
    ps = torch.tensor([0.95, 1.0, 0.9])
    got, _ = top_p_filter_(logits.clone(), ps, vllm_filter)
    assert torch.isfinite(got[0]).sum() == 1 and torch.isfinite(got[0, 7])
    assert torch.equal(got[1], logits[1])               # p = 1: the row is left as it is
    assert not torch.isfinite(got[2, :10]).any() and torch.isfinite(got[2]).sum() >= 1


@pytest.mark.parametrize("k", [1, 5, 20, 100, CANDIDATES - 1])
@pytest.mark.parametrize("p", [0.5, 0.95, 1.0])
@pytest.mark.parametrize("scale", [0.01, 2.0, 8.0])
def test_top_k_then_top_p_keeps_what_vllm_keeps_without_a_sort(k: int, p: float, scale: float) -> None:
    # Flat rows (scale 0.01) too: top-k bounds the nucleus, so no row needs the sort.
    logits = _logits(12, scale, seed=k * 7 + int(p * 100) + int(scale * 10))
    ks, ps = torch.full((12,), k), torch.full((12,), p)
    want = vllm_filter(logits.clone(), ks, ps)
    got, n_fallback = top_k_top_p_filter_(logits.clone(), ks, ps, vllm_filter)
    assert n_fallback == 0
    assert_same_nucleus(got, want, logits)
    assert int((torch.isfinite(got) != torch.isfinite(want)).sum()) <= 1
    assert int(torch.isfinite(got).sum(dim=1).max()) <= k
    if p == 1.0:  # top-k alone: exactly the k largest
        assert torch.equal(torch.isfinite(got), torch.isfinite(want))


def test_top_k_rows_mixed_with_rows_without_and_beyond_the_candidates() -> None:
    """One batch, as vLLM hands it over: rows without top-k carry k = vocab; a k above the
    candidates, or a tie at the k-th value that runs past them, goes to the sort."""
    logits = torch.cat([_logits(6, 4.0, seed=11), torch.randn(2, VOCAB) * 0.01])
    logits = logits.to(torch.bfloat16).float()
    logits[5, 2000:2300] = 30.0          # 300 tied maxima: top-k 20 keeps all of them (vLLM's rule)
    ks = torch.tensor([20, VOCAB, 5, 1000, VOCAB, 20, 20, VOCAB])
    ps = torch.tensor([0.95, 0.95, 0.9, 0.95, 1.0, 0.95, 0.95, 0.95])
    want = vllm_filter(logits.clone(), ks, ps)
    seen = []

    def fallback(x, k, pp):
        seen.append(k.tolist())
        return vllm_filter(x, k, pp)

    got, n_fallback = top_k_top_p_filter_(logits.clone(), ks, ps, fallback)
    # k=1000 (row 3), the 300-way tie (row 5) and the flat row without top-k (7) are sorted
    assert n_fallback == 3 and seen == [[1000, 20, VOCAB]]
    assert_same_nucleus(got, want, logits)
    assert torch.equal(got[4], logits[4])                           # no top-k, p = 1: untouched
    assert 20 < int(torch.isfinite(got[5]).sum()) <= 300               # inside the tie, as vLLM
    assert int(torch.isfinite(got[6]).sum()) <= 20                  # flat, but bounded by its top-k


def test_installed_into_vllm_sampler_by_name() -> None:
    from actors.vllm_worker_ext import install_cpu_top_p

    try:
        assert install_cpu_top_p(True) is True
        assert vllm_sampler.apply_top_k_top_p is not vllm_sampler._rlsys_original_filter
        logits = _logits(4, 4.0, seed=3)
        ps = torch.full((4,), 0.95)
        got = vllm_sampler.apply_top_k_top_p(logits.clone(), None, ps)
        assert_same_nucleus(got, vllm_filter(logits.clone(), None, ps), logits)
        # top-k with top-p: ours as well; top-k alone: vLLM's own (it needs no sort there)
        k = torch.full((4,), 5)
        calls = []
        original = vllm_sampler._rlsys_original_filter
        vllm_sampler._rlsys_original_filter = lambda *a: calls.append(1) or original(*a)
        try:
            assert install_cpu_top_p(True) is True
            got = vllm_sampler.apply_top_k_top_p(logits.clone(), k, ps)
            assert_same_nucleus(got, vllm_filter(logits.clone(), k, ps), logits) and not calls
            vllm_sampler.apply_top_k_top_p(logits.clone(), k, None)
            assert calls == [1]
        finally:
            vllm_sampler._rlsys_original_filter = original
    finally:
        assert install_cpu_top_p(False) is False
    assert vllm_sampler.apply_top_k_top_p is vllm_sampler._rlsys_original_filter
