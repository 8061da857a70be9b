"""Pure conversions between our plain dicts and vLLM's sampling / output objects, kept apart
from the Ray actor so they can be tested without an engine."""
from __future__ import annotations

from typing import Any

# Per-prompt seed stride: vLLM seeds a prompt's n samples seed, seed+1, ..., seed+n-1, so
# prompts must be far apart or their samples would share random streams.
SEED_STRIDE = 1_000_003
SAMPLING_KEYS = {"temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                 "max_new_tokens", "min_new_tokens", "seed", "stop"}


def make_sampling_params(sampling: dict[str, Any], n: int, prompt_index: int) -> Any:
    """vLLM SamplingParams from our sampling dict. Unknown keys are an error (a typo such as
    `max_tokens` would otherwise silently fall back to a default)."""
    from vllm import SamplingParams

    unknown = set(sampling) - SAMPLING_KEYS
    if unknown:
        raise ValueError(f"unknown sampling keys {sorted(unknown)}; allowed: {sorted(SAMPLING_KEYS)}")
    seed = sampling.get("seed")
    return SamplingParams(
        n=n,
        temperature=float(sampling.get("temperature", 1.0)),
        top_p=float(sampling.get("top_p", 1.0)),
        top_k=int(sampling.get("top_k") or 0),  # 0 (or None / -1 upstream) = disabled
        min_p=float(sampling.get("min_p", 0.0)),
        repetition_penalty=float(sampling.get("repetition_penalty", 1.0)),
        max_tokens=int(sampling["max_new_tokens"]),
        min_tokens=int(sampling.get("min_new_tokens", 0)),
        stop=sampling.get("stop"),
        seed=None if seed is None else int(seed) + prompt_index * SEED_STRIDE,
        logprobs=0,  # 0 = just the sampled token's log-prob
    )


def convert_completion(c: Any) -> dict[str, Any]:
    """One vLLM CompletionOutput -> plain dict (token ids, per-token log-probs, text, reason)."""
    token_ids = [int(t) for t in c.token_ids]
    if c.logprobs is None or len(c.logprobs) != len(token_ids):
        raise RuntimeError("vLLM returned no per-token logprobs; was SamplingParams.logprobs set?")
    # Each position maps token id -> Logprob for the top-k (here none) plus the sampled token.
    logprobs = [float(c.logprobs[i][t].logprob) for i, t in enumerate(token_ids)]
    return {"token_ids": token_ids, "logprobs": logprobs, "text": c.text,
            "finish_reason": str(c.finish_reason)}


def convert_request_output(out: Any) -> list[dict[str, Any]]:
    """A RequestOutput's completions, in sample-index order."""
    return [convert_completion(c) for c in sorted(out.outputs, key=lambda c: c.index)]
