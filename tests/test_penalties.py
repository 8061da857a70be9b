"""actors.penalties: the repetition penalty applied to the tokens a row has seen only is
bit-identical to vLLM's whole-vocabulary `apply_penalties`, hands frequency/presence penalties to
it, and is installed into vLLM's penalties module by name."""
from __future__ import annotations

import pytest
import torch

from actors.penalties import apply_penalties_

vllm_utils = pytest.importorskip("vllm.model_executor.layers.utils")
VOCAB = 49152


def _case(b: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, VOCAB, generator=g) * 4
    logits[0, :5] = 0.0                              # zero logits: multiplied, as vLLM does
    logits[1, 10:20] = -float("inf")                 # removed tokens stay removed
    # prompts and outputs padded with VOCAB, of different lengths, with repeated tokens
    prompt = torch.full((b, 40), VOCAB, dtype=torch.long)
    output = torch.full((b, 30), VOCAB, dtype=torch.long)
    for i in range(b):
        n_p, n_o = 10 + 3 * i, 2 * i
        prompt[i, :n_p] = torch.randint(0, 300, (n_p,), generator=g)   # small id range: repeats
        output[i, :n_o] = torch.randint(0, VOCAB, (n_o,), generator=g)
    prompt[0, :5] = torch.arange(5)                  # the zero logits are seen tokens
    prompt[1, :3] = torch.tensor([10, 11, 12])       # and so are -inf ones
    return logits, prompt, output


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_repetition_penalty_is_bit_identical_to_vllm(seed: int) -> None:
    b = 6
    logits, prompt, output = _case(b, seed)
    rep = torch.tensor([1.1, 1.0, 0.9, 2.0, 1.3, 1.1])
    zeros = torch.zeros(b)
    want = vllm_utils.apply_penalties(logits.clone(), prompt, output, zeros, zeros, rep)
    calls = []
    got = apply_penalties_(logits.clone(), prompt, output, zeros, zeros, rep, lambda *a: calls.append(1))
    assert not calls
    assert torch.equal(got, want)
    changed = (got != logits) & torch.isfinite(logits)
    assert int(changed.sum()) > 50 and not bool(changed[1].any())   # penalty 1.0 changes nothing


def test_frequency_or_presence_penalties_go_to_vllm() -> None:
    logits, prompt, output = _case(3, 5)
    rep, zeros = torch.full((3,), 1.1), torch.zeros(3)
    for presence, frequency in [(torch.tensor([0.0, 0.5, 0.0]), zeros), (zeros, torch.tensor([0.2, 0.0, 0.0]))]:
        calls = []

        def fallback(*args):
            calls.append(1)
            return vllm_utils.apply_penalties(*args)

        got = apply_penalties_(logits.clone(), prompt, output, presence, frequency, rep, fallback)
        assert calls == [1]
        assert torch.equal(got, vllm_utils.apply_penalties(logits.clone(), prompt, output, presence, frequency, rep))


def test_installed_into_vllm_penalties_by_name() -> None:
    from vllm.v1.sample.ops import penalties as module

    from actors.vllm_worker_ext import install_cpu_penalties

    logits, prompt, output = _case(4, 9)
    outputs = [[int(t) for t in row if t != VOCAB] for row in output[:4]]
    outputs[3] = outputs[3] + [-1]                    # an async-scheduling placeholder
    rep, zeros = torch.full((4,), 1.1), torch.zeros(4)
    want = module.apply_all_penalties(logits.clone(), prompt[:4], zeros, zeros, rep, outputs)
    try:
        assert install_cpu_penalties(True) is True
        assert module.apply_penalties is not module._rlsys_original_penalties
        got = module.apply_all_penalties(logits.clone(), prompt[:4], zeros, zeros, rep, outputs)
        assert torch.equal(got, want)
    finally:
        assert install_cpu_penalties(False) is False
    assert module.apply_penalties is module._rlsys_original_penalties
