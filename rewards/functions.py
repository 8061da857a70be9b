"""Reward channels computed by plain Python functions named in the configuration.

A channel function scores one sample: ``fn(text, **example_fields) -> float | None``. It receives
the example fields its signature names (all of them if it takes ``**kwargs``). ``None``, a
non-finite value, a non-number or an exception mean "no reward for this sample": the sample is
masked with the reason (the exception's type and message) instead of crashing the run, exactly
as a failed judge call is. Pure: no Ray, vLLM or HTTP.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
from pathlib import Path
from typing import Any, Callable, Sequence

RewardFn = Callable[..., Any]


def load_reward_function(spec: str) -> RewardFn:
    """`package.module:function` or `path/to/file.py:function` -> the function.
    Raises ValueError saying what is wrong (format, missing file/module, missing function)."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"{spec!r}: expected 'module:function' or 'path/to/file.py:function'")
    target, name = spec.rsplit(":", 1)
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise ValueError(f"{spec!r}: file {target} does not exist")
        mod_name = f"rlsys_reward_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:  # the user's file: report, don't crash with a traceback
            raise ValueError(f"{spec!r}: importing {target} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(target)
        except Exception as e:
            raise ValueError(f"{spec!r}: cannot import module {target!r}: {type(e).__name__}: {e}") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"{spec!r}: {target} has no function {name!r}")
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError) as e:
        raise ValueError(f"{spec!r}: cannot read the signature of {name}: {e}") from e
    positional = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not positional and not any(p.kind == p.VAR_POSITIONAL for p in params.values()):
        raise ValueError(f"{spec!r}: {name} must take the sample's text as its first argument")
    return fn


def _kwargs_for(fn: RewardFn, example: dict[str, Any]) -> dict[str, Any]:
    params = list(inspect.signature(fn).parameters.values())
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return dict(example)
    names = {p.name for p in params[1:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in example.items() if k in names}


def score_function_channel(fn: RewardFn, texts: Sequence[Any], example: dict[str, Any]
                           ) -> tuple[list[float], list[str | None]]:
    """(value per text, mask reason per text or None). A masked sample's value is NaN."""
    kwargs = _kwargs_for(fn, example)
    values: list[float] = []
    reasons: list[str | None] = []
    for text in texts:
        try:
            v = fn(text, **kwargs)
        except Exception as e:  # untrusted: the sample is masked with the reason, the run goes on
            values.append(math.nan)
            reasons.append(f"{type(e).__name__}: {e}"[:300])
            continue
        if v is None:
            values.append(math.nan)
            reasons.append("reward function returned None")
            continue
        try:
            x = float(v)
        except (TypeError, ValueError):
            x = math.nan
        if not math.isfinite(x):
            values.append(math.nan)
            reasons.append(f"reward function returned {v!r}"[:300])
            continue
        values.append(x)
        reasons.append(None)
    return values, reasons


def add_function_channels(scored: dict[str, list], texts: Sequence[Any], example: dict[str, Any],
                          functions: dict[str, RewardFn]) -> dict[str, list]:
    """Add each function channel to one group's `scored` dict ({channel: [values]}, optional
    "valid"/"mask_reason") and fold its masks in (the first reason of a sample is kept)."""
    n = len(texts)
    valid = list(scored.get("valid") or [True] * n)
    reasons = list(scored.get("mask_reason") or [None] * n)
    for channel, fn in functions.items():
        values, why = score_function_channel(fn, texts, example)
        scored[channel] = values
        for j, r in enumerate(why):
            if r is not None and valid[j]:
                valid[j], reasons[j] = False, f"{channel}: {r}"
    if functions:
        scored["valid"], scored["mask_reason"] = valid, reasons
    return scored
