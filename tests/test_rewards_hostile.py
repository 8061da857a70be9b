"""Model output is untrusted input: every reward of recipes A and B returns a finite value in
its documented range for anything a model can emit (and for None), never raises, and stays
fast on huge or deeply nested text. Also the parser regressions: code fences and think tags
inside JSON strings are content, not markers. Pure: no Ray, vLLM or models."""
import json
import math
import random
import time

import numpy as np
import pytest

from rewards.diversity import dpp_diversity, dpp_log_contributions, embed_texts
from rewards.episodebench import (accuracy_reward, count_length_units, format_reward, length_reward,
                                  parse_response, score_episodebench, strip_think)
from rewards.polaris import (REP_CAP, blank_penalty, length_penalty, polaris_rule_channels, self_repetition,
                             story_part, target_word_count, word_count)

ETA = 1e-2
PROMPT = "Write a story about a fox. It should be approximately 2000 words long."
NON_STR = [None, b'{"plot_list": []}', 42, 3.5, ["a"], {"plot_list": []}]


def answer(narrative="x", utterance="Run.", next_episode="2") -> dict:
    """A schema-valid answer whose narrative + utterance hold 86 length units besides the arguments."""
    return {"plot_list": [{"narrative": " ".join(["w"] * 85) + " " + narrative,
                           "role_dialogue": {"name": "Ilo", "utterance": utterance}}],
            "next_episode": next_episode}


def fenced(obj) -> str:
    return "Here it is:\n```json\n" + json.dumps(obj, ensure_ascii=False) + "\n```\n"


FULL = {"fmt": 1.0, "acc": 1.0, "len": 1.0}
UNFENCED = {"fmt": pytest.approx(0.85), "acc": 1.0, "len": 1.0}
NOTHING = {"fmt": 0.0, "acc": 0.0, "len": 0.0}


def assert_recipe_a_in_range(scores: dict) -> None:
    assert set(scores) == {"fmt", "acc", "len"}
    for k, v in scores.items():
        assert isinstance(v, float) and math.isfinite(v), (k, v)
    assert 0.0 <= scores["fmt"] <= 1.0 and scores["acc"] in (0.0, 1.0) and 0.0 <= scores["len"] <= 1.0


def assert_recipe_b_in_range(ch: dict) -> None:
    assert set(ch) == {"rep", "len_pen", "blank"}
    for k, v in ch.items():
        assert isinstance(v, float) and math.isfinite(v), (k, v)
    assert 0.0 <= ch["rep"] <= REP_CAP and 0.0 <= ch["len_pen"] <= 1.0 and ch["blank"] in (0.0, 1.0)


# ================================================================ recipe A: markers inside strings
@pytest.mark.parametrize("narrative", ["code: ```python\nprint(1)\n``` done", "```", "a ```json\n{}``` b"])
def test_fence_marker_inside_a_fenced_string_is_content(narrative):
    text = fenced(answer(narrative=narrative))
    parsed = parse_response(text)
    assert parsed.fenced and parsed.next_episode == "2"
    assert parsed.obj["plot_list"][0]["narrative"].endswith(narrative)
    assert score_episodebench(text, "2") == FULL


@pytest.mark.parametrize("marker", ["</think>", "<think>", "<think> and </think>", "</THINK> ``` <think>"])
def test_think_tags_inside_a_fenced_string_are_content(marker):
    text = fenced(answer(narrative=marker))
    assert parse_response(text).obj["plot_list"][0]["narrative"].endswith(marker)
    assert score_episodebench(text, "2") == FULL


@pytest.mark.parametrize("utterance", ["I <think> so.", "I </think> so.", "<think>", "```json\n{}```"])
def test_markers_inside_an_unfenced_answer_are_content(utterance):
    text = json.dumps(answer(narrative="", utterance=utterance))
    parsed = parse_response(text)
    assert not parsed.fenced and parsed.obj["plot_list"][0]["role_dialogue"]["utterance"] == utterance
    assert score_episodebench(text, "2") == UNFENCED


def test_reasoning_then_answer_with_markers_in_its_strings():
    body = fenced(answer(narrative="x ``` </think> <think> y"))
    assert score_episodebench("<think>plan {\"a\": \"</think\"}</think>\n" + body, "2") == FULL
    assert score_episodebench("template opened the reasoning</think>" + body, "2") == FULL
    assert score_episodebench("</think>" * 1000 + body, "2") == FULL  # each stray close: reasoning before it


def test_documented_think_behaviour_is_kept():
    draft = fenced(answer(next_episode="9"))
    # a fenced draft inside the reasoning earns nothing; the bare answer after it counts
    assert score_episodebench(f"<think>{draft}</think>" + json.dumps(answer()), "2") == UNFENCED
    # an orphan </think> outside any object: everything before it is reasoning
    assert score_episodebench('I think {"next_episode": "9"} is wrong</think>' + fenced(answer()), "2") == FULL
    # an unclosed <think> swallows the rest, however many there are
    assert score_episodebench("<think>drafting " + fenced(answer()), "2") == NOTHING
    assert score_episodebench("<think>" * 1000 + fenced(answer()), "2") == NOTHING
    # inside reasoning the first </think> closes it, even in a draft's string
    assert strip_think('<think>{"n": "</think>"} more</think> {"a": 1}') == '{"a": 1}'


def test_truncated_fenced_object_uses_the_first_fence_end_outside_complete_objects():
    # The outer object never closes; the ``` inside the (complete) plot is content, so the fence
    # ends at the real closer and repair closes the brackets: a dict without the schema.
    text = '```json\n{"plot_list": [{"narrative": "a```b"}\n```'
    parsed = parse_response(text)
    assert parsed.fenced and parsed.parse_ok and not parsed.schema_valid
    assert parsed.obj == {"plot_list": [{"narrative": "a```b"}]}
    assert format_reward(parsed) == pytest.approx(0.4)


# ================================================================ recipe A: hostile input classes
@pytest.mark.parametrize("value", NON_STR)
def test_non_str_output_is_no_answer(value):
    assert score_episodebench(value, "2") == NOTHING
    parsed = parse_response(value)
    assert (parsed.fenced, parsed.parse_ok, parsed.obj, parsed.next_episode) == (False, False, None, None)
    assert strip_think(value) == ""
    assert format_reward(value) == accuracy_reward(value, "2") == length_reward(value) == 0.0


def test_reward_functions_accept_raw_text_and_bad_references():
    text = fenced(answer())
    assert format_reward(text) == 1.0 and accuracy_reward(text, "2") == 1.0 and length_reward(text) == 1.0
    for ref in (None, "", 2.0, [2], b"2"):
        assert accuracy_reward(text, ref) == 0.0
    assert accuracy_reward(text, 2) == 1.0  # integer ids are read as decimal strings


def test_count_length_units_takes_anything():
    assert count_length_units(None) == 0 and count_length_units(7) == 0
    assert count_length_units("one two 三") == 3           # a bare string is one text
    assert count_length_units([None, b"x", "a b", 5]) == 2  # non-str items count 0


def test_length_reward_far_outside_the_band_does_not_overflow():
    assert length_reward(fenced(answer()), 80, 100, 1e-300) == 1.0
    assert length_reward(fenced(answer(narrative=" ".join(["w"] * 50))), 80, 100, 1e-300) == 0.0


def _huge(unit: str, size: int = 2_000_000) -> str:
    return (unit * (size // len(unit) + 1))[:size]


HUGE_UNITS = ["a b c ", "{", "[", '{"a":', '{"a":"</think>', "<think>", "</think>x", "<think></think>",
              '{"a":"```"}', '```json\n{"a":"', "{it's </think> ", '"\'', "[1,",
              '{"x":[{"y":"```json</think><think>', "我們走吧 ", "\x00\u200b\n"]


@pytest.mark.parametrize("unit", HUGE_UNITS)
def test_huge_outputs_are_scored_fast(unit):
    text = _huge(unit)
    start = time.perf_counter()
    scores = score_episodebench(text, "2")
    channels = polaris_rule_channels(text, PROMPT)
    elapsed = time.perf_counter() - start
    assert_recipe_a_in_range(scores)
    assert_recipe_b_in_range(channels)
    assert elapsed < 2.0, f"{unit!r}: {elapsed:.2f}s"


def test_huge_answer_after_huge_reasoning_still_counts():
    text = "<think>" + _huge("hmm { [ ' ") + "</think>" + fenced(answer())
    start = time.perf_counter()
    assert score_episodebench(text, "2") == FULL
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("text", [
    "[" * 100_000, "{" * 100_000, '{"a":' * 100_000, "[" * 100_000 + "]" * 100_000,
    '{"a":' * 100_000 + "1" + "}" * 100_000, "```json\n" + "[" * 100_000 + "]" * 100_000 + "\n```",
    "{'a': " * 300 + "1" + "}" * 300,
])
def test_deep_nesting_is_no_recursion_error(text):
    assert_recipe_a_in_range(score_episodebench(text, "2"))
    assert_recipe_b_in_range(polaris_rule_channels(text, text))


def test_empty_and_whitespace_outputs():
    for text in ("", " ", "\n\t  \r\n", "\u3000"):
        assert score_episodebench(text, "2") == NOTHING
        assert polaris_rule_channels(text, PROMPT) == {"rep": 0.0, "len_pen": 1.0, "blank": 1.0}


def test_strange_numbers_in_answers():
    # Huge integer literals exceed Python's int-parsing limit; 1e999 is inf; neither may raise.
    for ne in ("9" * 5000, "1e999", "-0", "NaN", "Infinity"):
        text = '{"plot_list": [{"narrative": "x", "role_dialogue": {}}], "next_episode": ' + ne + "}"
        assert_recipe_a_in_range(score_episodebench(text, "2"))


# ================================================================ recipe B: hostile input classes
@pytest.mark.parametrize("value", NON_STR)
def test_non_str_output_is_the_empty_output(value):
    # No story: blank 1, no repetition, len_pen as for 0 words (below the band: 1).
    assert polaris_rule_channels(value, PROMPT) == {"rep": 0.0, "len_pen": 1.0, "blank": 1.0}
    assert story_part(value) == "" and word_count(value) == 0
    assert blank_penalty(value) == 1.0 and self_repetition(value) == 0.0 and length_penalty(value, 2000) == 1.0


@pytest.mark.parametrize("prompt", [None, 42, b"2000 words long", {"role": "user"}, [None, 3, {"role": "user"}],
                                    [{"role": "user", "content": None}], [], ""])
def test_bad_prompts_read_as_no_target(prompt):
    story = " ".join(f"w{k}" for k in range(300))
    assert polaris_rule_channels(story, prompt) == {"rep": 0.0, "len_pen": 0.0, "blank": 0.0}
    assert polaris_rule_channels(None, prompt) == {"rep": 0.0, "len_pen": 0.0, "blank": 1.0}


@pytest.mark.parametrize("target", [True, "2000", float("nan"), float("inf"), -5, 0, 10 ** 400, [2000]])
def test_unusable_targets_mean_no_length_penalty(target):
    assert length_penalty("short story", target) == 0.0


def test_target_word_count_is_robust_and_linear():
    assert target_word_count(None) is None and target_word_count(b"300 words long") is None
    assert target_word_count("9" * 5000 + " words long") is None  # not a usable count (and no int-limit error)
    assert target_word_count("It is 1,500 words long.") == 1500
    for hostile in ("1" * 2_000_000, "1," * 1_000_000, "1 " * 1_000_000 + "words", "12 words " * 200_000):
        start = time.perf_counter()
        assert target_word_count(hostile) is None
        assert time.perf_counter() - start < 1.0


def test_unbalanced_think_tags_in_stories():
    story = " ".join(f"w{k}" for k in range(200))
    assert polaris_rule_channels("<think>" * 1000 + story, PROMPT)["blank"] == 1.0  # never closed: no story
    assert polaris_rule_channels("</think>" * 1000 + story, PROMPT)["blank"] == 0.0  # after the last close


# ================================================================ seeded fuzz over both recipes
FRAGMENTS = ['{', '}', '[', ']', '"', "'", ':', ',', '\\', '\\"', '"plot_list"', '"next_episode"', '"narrative"',
             '"role_dialogue"', '"utterance"', '"2"', 'null', 'true', '1e999', '-0', '12', '```', '```json\n',
             '```JSON', '<think>', '</think>', '<THINK>', '</Think>', '我們走吧', 'カタカナ', '안녕',
             '\x00', '\x1b', '\u200b', '\ud800', '\n', '\t', '\r\n', ' ', 'the fox', 'words long',
             '2000 words long', '\U00020000']


def fuzz_texts(n: int = 400, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    valid = [json.dumps(answer()), fenced(answer(narrative="``` </think>"))]
    out = []
    for _ in range(n):
        parts = [rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 60))]
        if rng.random() < 0.3:  # splice a valid answer in somewhere, so deep parser paths run
            parts.insert(rng.randint(0, len(parts)), rng.choice(valid))
        out.append("".join(parts))
    return out


def test_fuzz_every_reward_is_finite_and_in_range():
    for text in fuzz_texts():
        for strict in (False, True):
            assert_recipe_a_in_range(score_episodebench(text, "2", strict=strict))
        assert_recipe_b_in_range(polaris_rule_channels(text, text))
        assert_recipe_b_in_range(polaris_rule_channels(text, PROMPT))
        assert count_length_units([text]) >= 0


# ================================================================ diversity: non-finite rows, None texts
class TableEncoder:
    """Fixed vectors per text; records what it was asked to encode."""

    def __init__(self, table):
        self.table, self.seen = table, []

    def encode(self, sentences):
        self.seen.append(list(sentences))
        return np.array([self.table[s] for s in sentences], dtype=np.float64)


NAN, INF = float("nan"), float("inf")
TABLE = {"x": [1.0, 0.0, 0.0], "y": [0.0, 1.0, 0.0], "z": [0.6, 0.8, 0.0], "": [0.0, 0.0, 1.0],
         "nan": [NAN, 1.0, 0.0], "inf": [INF, 0.0, 0.0], "-inf": [0.0, -INF, 1.0], "zero": [0.0, 0.0, 0.0],
         "big": [1e200, 1e200, 0.0]}


def test_non_finite_rows_are_nan_and_the_rest_scored_among_themselves():
    enc = TableEncoder(TABLE)
    got = dpp_diversity(["x", "nan", "y", "inf", "z", "-inf"], enc, ETA)
    assert [math.isnan(v) for v in got] == [False, True, False, True, False, True]
    alone = dpp_diversity(["x", "y", "z"], enc, ETA)
    assert [got[0], got[2], got[4]] == pytest.approx(alone, rel=1e-12)
    assert all(isinstance(v, float) for v in got)


def test_fewer_than_two_finite_rows():
    enc = TableEncoder(TABLE)
    got = dpp_diversity(["nan", "x", "inf"], enc, ETA)
    assert math.isnan(got[0]) and math.isnan(got[2])
    assert got[1] == pytest.approx(math.log(1 + ETA))  # a group of one: s = L_ii = 1 + η
    assert dpp_diversity(["zero", "nan"], enc, ETA)[0] == pytest.approx(math.log(ETA))  # zero row: s = η
    assert all(math.isnan(v) for v in dpp_diversity(["nan", "inf", "-inf"], enc, ETA))
    assert math.isnan(dpp_log_contributions(np.array([[NAN, 0.0]]), ETA)[0])  # NaN, not a made-up value


def test_none_and_empty_texts_are_encoded_as_empty_strings():
    enc = TableEncoder(TABLE)
    got = dpp_diversity([None, "x", "", 7, b"y"], enc, ETA)
    assert enc.seen == [["", "x", "", "", ""]]
    assert len(got) == 5 and all(math.isfinite(v) for v in got)
    assert dpp_diversity(None, enc, ETA) == [] and dpp_diversity([], enc, ETA) == []
    assert embed_texts([None], enc).shape == (1, 3)


def test_huge_finite_entries_do_not_overflow_the_norm():
    enc = TableEncoder(TABLE)
    got = dpp_diversity(["big", "x"], enc, ETA)
    c = 1 / math.sqrt(2)  # big normalises to (c, c, 0): cosine c with x
    s = (1 + ETA) - c * c / (1 + ETA)
    assert got == pytest.approx([math.log(s)] * 2)
