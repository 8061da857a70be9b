"""Reward channels from user functions (rewards/functions.py): loading, and every way a
function can fail on model output turning into a masked sample with its reason, never a crash."""
from __future__ import annotations

import math

import pytest

from rewards.functions import add_function_channels, load_reward_function, score_function_channel


def test_load_by_file_and_module(tmp_path):
    f = tmp_path / "r.py"
    f.write_text("def n_words(text):\n    return len(text.split())\n")
    assert load_reward_function(f"{f}:n_words")("a b c") == 3
    assert load_reward_function("math:sqrt")(4.0) == 2.0
    with pytest.raises(ValueError, match="must take the sample's text"):
        f.write_text("def nothing():\n    return 1\n")
        load_reward_function(f"{f}:nothing")


def test_failures_mask_with_reason():
    def fn(text, uid=None):
        if text == "raise":
            raise KeyError("boom")
        return {"none": None, "nan": float("nan"), "inf": float("inf"), "str": "high"}.get(text, len(text) + (uid or 0))

    values, reasons = score_function_channel(fn, ["ok", "raise", "none", "nan", "inf", "str"], {"uid": 10, "other": 1})
    assert values[0] == 12.0 and reasons[0] is None            # only the fields its signature names
    assert all(math.isnan(v) for v in values[1:])
    assert reasons[1] == "KeyError: 'boom'" and reasons[2] == "reward function returned None"
    assert reasons[3] == "reward function returned nan" and "inf" in reasons[4] and "'high'" in reasons[5]


def test_kwargs_function_gets_every_field_and_masks_fold_in():
    seen = {}

    def fn(text, **fields):
        seen.update(fields)
        return None if text == "" else 1.0

    scored = {"fmt": [1.0, 0.5, 0.0], "valid": [True, True, False], "mask_reason": [None, None, "judge: timeout"]}
    add_function_channels(scored, ["a", "", "b"], {"uid": "u1", "messages": []}, {"mine": fn})
    assert seen == {"uid": "u1", "messages": []}
    assert scored["valid"] == [True, False, False]
    assert scored["mask_reason"] == [None, "mine: reward function returned None", "judge: timeout"]
    assert scored["mine"][0] == 1.0
