"""Reward functions the end-to-end tests name in `reward.functions` (as `path/to/file.py:fn`)."""


def share_a_to_m(text):
    """Share of the response's ASCII letters that fall in a..m (about half for a random policy;
    a policy can move it anywhere in [0, 1] token by token, so GRPO learns it in a few dozen
    steps). None (masked) when the response has no letter at all."""
    letters = [c for c in str(text).lower() if "a" <= c <= "z"]
    if not letters:
        return None
    return sum(c <= "m" for c in letters) / len(letters)


def share_a_to_m_slow(text):
    """share_a_to_m, 0.1 s per sample: slow enough that a test can stop a run between steps."""
    import time

    time.sleep(0.1)
    return share_a_to_m(text)
