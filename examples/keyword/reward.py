"""The reward of the keyword example: use the word the prompt asks for, in a short answer.

Any function `fn(text, **columns) -> float | None` can be a reward channel (reward.functions in
the config). It gets the row's other columns by name: here `keyword` and `max_words`. Returning
None means "no reward for this sample" (it is masked); so does raising.
"""


def uses_keyword(text: str, keyword: str) -> float:
    """1.0 if the answer uses the keyword (any case), else 0.0."""
    return float(keyword.lower() in text.lower())


def brevity(text: str, max_words: int = 40) -> float:
    """1.0 up to max_words words, falling linearly to 0.0 at twice that."""
    n = len(text.split())
    return max(0.0, min(1.0, 2.0 - n / max_words))
