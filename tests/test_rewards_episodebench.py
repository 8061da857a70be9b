"""Recipe A rule rewards: parsing edge cases, format/accuracy/length values worked by hand."""
import json
import math

import pytest

from rewards.episodebench import (
    accuracy_reward,
    count_length_units,
    format_reward,
    length_reward,
    parse_response,
    score_episodebench,
)


def answer(plots=None, next_episode="2", **extra) -> dict:
    if plots is None:
        plots = [{"narrative": "Rain falls.", "role_dialogue": {"name": "Ilo", "utterance": "Run."}}]
    return {"plot_list": plots, "next_episode": next_episode, **extra}


def fenced(obj) -> str:
    body = obj if isinstance(obj, str) else json.dumps(obj)
    return f"Here it is:\n```json\n{body}\n```\n"


def with_units(n: int) -> str:
    """A fenced valid answer whose narratives and utterance hold exactly n length units."""
    words = ["w"] * n
    plots = [{"narrative": " ".join(words[:-1]),
              "role_dialogue": {"name": "Someone Long Named", "utterance": words[-1]}}]
    return fenced(answer(plots))


# ---------------------------------------------------------------- format reward
@pytest.mark.parametrize("text, expected", [
    # fence 0.15 + dict 0.25 + schema 0.6
    (fenced(answer()), 1.0),
    # no fence: 0.25 + 0.6
    (json.dumps(answer()), 0.85),
    # prose around a bare object still parses: 0.25 + 0.6
    ("Sure! " + json.dumps(answer()) + " Hope this helps.", 0.85),
    # a fence whose body is not JSON at all: only the fence counts
    ("```json\nthe knight rides on\n```", 0.15),
    ("I refuse to answer in JSON.", 0.0),
    ("", 0.0),
    # a dict without the schema keys: fence + dict
    (fenced({"story": "once upon a time"}), 0.4),
    # empty plot_list is not schema valid
    (fenced(answer(plots=[])), 0.4),
    # plot_list must be a list
    (fenced(answer(plots={"narrative": "x"})), 0.4),
    # next_episode missing, or null
    (fenced({"plot_list": [{"narrative": "x", "role_dialogue": {}}]}), 0.4),
    (fenced(answer(next_episode=None)), 0.4),
    # a top-level list is JSON but not a dict: fence only
    (fenced([answer()]), 0.15),
])
def test_format_reward_values(text, expected):
    assert format_reward(parse_response(text)) == pytest.approx(expected)


def test_repairs_trailing_commas_and_python_quotes():
    trailing = '```json\n{"plot_list": [{"narrative": "a", "role_dialogue": {},},], "next_episode": "2",}\n```'
    python_style = str(answer())  # {'plot_list': [...], 'next_episode': '2'}
    python_literals = "{'plot_list': [{'narrative': 'a', 'role_dialogue': {}}], 'next_episode': '2', 'done': true}"
    for text in (trailing, python_style, python_literals):
        parsed = parse_response(text)
        assert parsed.parse_ok and parsed.schema_valid and parsed.next_episode == "2", text


def test_apostrophes_inside_double_quoted_strings_survive():
    text = fenced(answer([{"narrative": "Batman's cape {flutters}", "role_dialogue": {}}]))
    parsed = parse_response(text)
    assert parsed.schema_valid
    assert parsed.obj["plot_list"][0]["narrative"] == "Batman's cape {flutters}"


def test_truncated_output_is_a_dict_but_not_schema_valid():
    # Cut mid-utterance before next_episode: repair closes the brackets (0.25), no schema.
    text = '{"plot_list": [{"narrative": "The gate opens.", "role_dialogue": {"name": "Ilo", "utter'
    parsed = parse_response(text)
    assert parsed.parse_ok and not parsed.schema_valid
    assert format_reward(parsed) == pytest.approx(0.25)


# ---------------------------------------------------------------- <think> handling
def test_think_block_is_ignored_for_fence_and_parse():
    # The fenced JSON inside <think> is a draft, not the answer; the answer is bare JSON.
    draft = fenced(answer(next_episode="9"))
    text = f"<think>{draft}</think>\n" + json.dumps(answer(next_episode="2"))
    parsed = parse_response(text)
    assert not parsed.fenced and parsed.next_episode == "2"
    assert format_reward(parsed) == pytest.approx(0.85)


def test_orphan_closing_think_drops_the_reasoning_before_it():
    # Chat templates may open <think> in the prompt; the response then starts mid-thought.
    text = 'I think {"next_episode": "9"} is wrong</think>' + fenced(answer(next_episode="2"))
    parsed = parse_response(text)
    assert parsed.fenced and parsed.next_episode == "2"
    assert format_reward(parsed) == 1.0


def test_unclosed_think_swallows_the_rest():
    parsed = parse_response("<think>Let me draft: " + fenced(answer()))
    assert (parsed.fenced, parsed.parse_ok) == (False, False)
    assert format_reward(parsed) == 0.0


# ---------------------------------------------------------------- role_dialogue forms, strict mode
@pytest.mark.parametrize("role_dialogue", [
    {},
    {"name": "Ilo", "utterance": "Hi."},
    [],
    [{"name": "Ilo", "utterance": "Hi."}, {"name": "Mara", "utterance": "Go."}],
])
def test_well_formed_role_dialogue_is_strict_valid(role_dialogue):
    parsed = parse_response(fenced(answer([{"narrative": "x", "role_dialogue": role_dialogue}])))
    assert parsed.schema_valid and parsed.strict_valid
    assert format_reward(parsed, strict=True) == 1.0


@pytest.mark.parametrize("plots, next_episode", [
    ([{"narrative": "x", "role_dialogue": [{"name": "Ilo"}]}], "2"),       # no utterance
    ([{"narrative": "x", "role_dialogue": {"name": 3, "utterance": "a"}}], "2"),
    ([{"narrative": "x", "role_dialogue": "Ilo: hi"}], "2"),               # not a dict/list
    ([{"narrative": "x"}], "2"),                                           # role_dialogue missing
    ([{"narrative": 7, "role_dialogue": {}}], "2"),                        # narrative not str
    (["just a string plot"], "2"),                                         # plot not a dict
    ([{"narrative": "x", "role_dialogue": {}}], 2),                        # next_episode not str
])
def test_strict_mode_rejects_what_lenient_mode_accepts(plots, next_episode):
    parsed = parse_response(fenced(answer(plots, next_episode)))
    assert parsed.schema_valid and not parsed.strict_valid
    assert format_reward(parsed) == 1.0
    assert format_reward(parsed, strict=True) == pytest.approx(0.4)  # fence + dict only


# ---------------------------------------------------------------- accuracy
def test_accuracy_compares_stripped_ids():
    assert accuracy_reward(parse_response(fenced(answer(next_episode=" 3 "))), "3") == 1.0
    assert accuracy_reward(parse_response(fenced(answer(next_episode="3"))), " 3\n") == 1.0
    assert accuracy_reward(parse_response(fenced(answer(next_episode="3"))), "4") == 0.0
    assert accuracy_reward(parse_response(fenced(answer(next_episode="-1"))), "-1") == 1.0


def test_accuracy_needs_a_valid_schema_and_a_reference():
    # Right id, but plot_list empty -> schema invalid -> no credit.
    assert accuracy_reward(parse_response(fenced(answer(plots=[], next_episode="3"))), "3") == 0.0
    assert accuracy_reward(parse_response(fenced(answer(next_episode=""))), "") == 0.0


def test_integer_next_episode_counts_only_in_lenient_mode():
    parsed = parse_response(fenced(answer(next_episode=3)))
    assert accuracy_reward(parsed, "3") == 1.0
    assert accuracy_reward(parsed, "3", strict=True) == 0.0


# ---------------------------------------------------------------- length units
@pytest.mark.parametrize("texts, expected", [
    (["我们走吧"], 4),                        # four Han characters
    (["你好，世界。"], 4),                     # CJK punctuation is not counted
    (["Hello, world! It's 2024."], 5),        # Hello / world / It / s / 2024
    (["AI时代来了"], 5),                       # one ASCII word + four Han characters
    (["カタカナ", "안녕"], 6),                  # kana and Hangul syllables count one each
    (["  ", "", "— … !"], 0),
    (["𠀀𠀁"], 2),                            # CJK Extension B (outside the BMP)
    (["one two", "three"], 3),                # summed over texts
])
def test_count_length_units(texts, expected):
    assert count_length_units(texts) == expected


def test_length_counts_narratives_and_all_utterances_but_not_names():
    plots = [
        {"narrative": "a b c", "role_dialogue": [{"name": "X Y Z", "utterance": "d e"},
                                                  {"name": "Q", "utterance": "f"}]},
        {"narrative": "g", "role_dialogue": {"name": "R", "utterance": "h i"}},
    ]
    parsed = parse_response(fenced(answer(plots)))
    # 3 + 2 + 1 + 1 + 2 = 9 units; the names X Y Z, Q, R are not story text.
    assert count_length_units(parsed.narrative_texts) == 9


# ---------------------------------------------------------------- length reward
@pytest.mark.parametrize("n, expected", [
    (80, 1.0), (90, 1.0), (100, 1.0),
    (70, math.exp(-0.5)),            # 10 below l_min = one sigma
    (120, math.exp(-2.0)),           # 20 above l_max = two sigmas: exp(-0.5 * 4)
    (79, math.exp(-0.005)),          # exp(-0.5 * (1/10)^2)
    (101, math.exp(-0.005)),
    (50, math.exp(-4.5)),            # three sigmas
])
def test_length_reward_gaussian_decay(n, expected):
    assert length_reward(parse_response(with_units(n)), 80, 100, 10) == pytest.approx(expected)


def test_length_reward_sigma_and_bounds_are_parameters():
    parsed = parse_response(with_units(120))
    assert length_reward(parsed, 80, 100, 20) == pytest.approx(math.exp(-0.5))  # (20/20)^2
    assert length_reward(parsed, 100, 130, 10) == 1.0
    with pytest.raises(ValueError):
        length_reward(parsed, 100, 80, 10)
    with pytest.raises(ValueError):
        length_reward(parsed, 80, 100, 0)


def test_length_reward_is_zero_without_a_valid_schema():
    # Plenty of words but no next_episode: the length channel gives nothing.
    text = fenced({"plot_list": [{"narrative": " ".join(["w"] * 90), "role_dialogue": {}}]})
    assert length_reward(parse_response(text), 80, 100, 10) == 0.0


# ---------------------------------------------------------------- all channels together
def test_score_episodebench_combines_channels():
    assert score_episodebench(with_units(90), "2") == {"fmt": 1.0, "acc": 1.0, "len": 1.0}
    scores = score_episodebench(with_units(70), "5")
    assert scores["fmt"] == 1.0 and scores["acc"] == 0.0
    assert scores["len"] == pytest.approx(math.exp(-0.5))


def test_score_episodebench_strict_gates_every_channel():
    # 90 units and the right id, but next_episode is an int: strict gives only fence + dict.
    text = with_units(90).replace('"next_episode": "2"', '"next_episode": 2')
    assert score_episodebench(text, "2") == {"fmt": 1.0, "acc": 1.0, "len": 1.0}
    assert score_episodebench(text, "2", strict=True) == {"fmt": pytest.approx(0.4), "acc": 0.0, "len": 0.0}
