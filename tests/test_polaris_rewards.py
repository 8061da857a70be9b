"""Recipe B without Ray: rule channels with hand-derived values, the group combiner, the POLARIS
reader (errors naming file, row and field), the synthetic generator and the data dispatcher."""
import json

import pytest

from rewards.polaris import (blank_penalty, duplicate_line_ratio, length_bounds, length_penalty,
                             local_repetition_ratio, polaris_rule_channels, self_repetition, target_word_count)
from rlsys.config import DataConfig
from rlsys.data import DataError, TurnExample
from rlsys.data.loading import load_for_config
from rlsys.data.polaris import PolarisExample, load_polaris, polaris_synth_main, write_polaris_dataset


def words(n: int, stem: str = "w") -> str:
    return " ".join(f"{stem}{k}" for k in range(n))


# ---------------------------------------------------------------- length
def test_target_word_count_from_prompt():
    assert target_word_count("Write a story. It should be approximately 2000 words long.") == 2000
    assert target_word_count("about 1,500 words long") == 1500  # not 500
    assert target_word_count("Write a short story.") is None


@pytest.mark.parametrize("t, band", [(2000, (1650, 2600)), (4000, (3400, 5000)), (10000, (9000, 11500)),
                                     (300, (-50, 900))])
def test_length_band_clips(t, band):
    # 2000: 0.15t=300 -> 350, 0.25t=500 -> 600; 4000: 600 and 1000 unclipped; 10000: 1500 -> 1000, 2500 -> 1500
    assert length_bounds(t) == pytest.approx(band)


@pytest.mark.parametrize("wc, pen", [(825, 0.5), (1650, 0.0), (2000, 0.0), (2600, 0.0), (3900, 0.5),
                                     (6000, 1.0), (0, 1.0)])
def test_length_penalty_t2000(wc, pen):
    # below: 1 - wc/1650; above: min(1, wc/2600 - 1)
    assert length_penalty(words(wc), 2000) == pytest.approx(pen)


def test_length_penalty_only_counts_the_story_and_needs_a_target():
    assert length_penalty(f"<think>{words(5000)}</think>{words(825)}", 2000) == pytest.approx(0.5)
    assert length_penalty(words(10), 300) == 0.0  # lower edge -50: no "too short" side
    assert length_penalty(words(10), None) == 0.0


# ---------------------------------------------------------------- blank
def test_blank_penalty():
    assert blank_penalty(words(149)) == 1.0
    assert blank_penalty(words(150)) == 0.0
    assert blank_penalty(f"<think>{words(300)}</think>  ") == 1.0
    assert blank_penalty(f"<think>{words(300)}") == 1.0  # never closed: all reasoning
    # 150 four-letter words = 600 visible of 749 chars; 6000 newlines push visible under 10 %
    padded = " ".join(["word"] * 150) + "\n" * 6000
    assert blank_penalty(padded) == 1.0 and blank_penalty(" ".join(["word"] * 150) + "\n" * 5000) == 0.0


# ---------------------------------------------------------------- repetition
def test_self_repetition_hand_values():
    # "a b c d a b c d": 5 four-grams, 4 distinct -> 0.2, twice (short text: local = global); one line
    assert self_repetition("a b c d a b c d") == pytest.approx(0.4)
    # no repeated 4-gram; 3 lines of >= 3 words, one repeats -> 1/3
    assert self_repetition("one two three\none two three\nfour five six") == pytest.approx(1 / 3)
    assert duplicate_line_ratio("Yes.\nYes.\nNo.") == 0.0  # short lines may recur
    assert self_repetition("The bell rang again. " * 60) == 1.5  # a loop hits the cap
    assert self_repetition(words(400)) == 0.0


def test_local_window_finds_a_loop_the_global_ratio_dilutes():
    text = words(400) + " " + "a b c d " * 25  # 497 four-grams: 400 + 4 distinct
    ws = text.split()
    assert self_repetition(text) == pytest.approx(93 / 497 + 93 / 97)  # last window: 97 grams, 4 distinct
    # 430 + 100 words: windows start 0, 50, ..., 400, then 430 (aligned to the end)
    assert local_repetition_ratio((words(430) + " " + "a b c d " * 25).split()) == pytest.approx(93 / 97)
    assert local_repetition_ratio(ws, window=1000) == pytest.approx(93 / 497)


def test_rule_channels_read_a_chat_prompt():
    chat = [{"role": "system", "content": "You write."},
            {"role": "user", "content": "A story, approximately 2000 words long."}]
    assert polaris_rule_channels(words(825), chat) == {"rep": 0.0, "len_pen": pytest.approx(0.5), "blank": 0.0}
    assert polaris_rule_channels(words(825), chat, target=1000)["len_pen"] == 0.0  # the row's target wins


# ---------------------------------------------------------------- reader
FOX = "Write a story about a fox. It should be approximately 300 words long."


def row(**over) -> dict:
    """A valid row; a field given as ``...`` is left out."""
    r = {"prompt": [{"role": "user", "content": FOX}],
         "story": "Once, a fox.", "ground_truth_reasoning": "plan", "target_word_count": 300, "uid": "u1"}
    r.update(over)
    return {k: v for k, v in r.items() if v is not ...}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_reader_accepts_chat_or_string_prompts(tmp_path):
    rows = [row(), row(uid="u2", prompt="Write about rain. About 1,200 words long.", target_word_count=...),
            row(uid=...)]
    a, b, c = load_polaris(write_jsonl(tmp_path / "train.jsonl", rows))
    assert a == PolarisExample("u1", rows[0]["prompt"], "Once, a fox.", 300)
    assert b.messages == [{"role": "user", "content": rows[1]["prompt"]}] and b.target_word_count == 1200
    assert c.uid == "row-2"


@pytest.mark.parametrize("bad, field, problem", [
    (dict(prompt=...), "prompt", "missing or empty"),
    (dict(prompt=[{"role": "user", "content": "hi 300 words long"}, {"role": "assistant", "content": "x"}]),
     "prompt", "ends with a 'assistant'"),
    (dict(prompt=[{"role": "narrator", "content": "x"}]), "prompt", "message 0"),
    (dict(story=""), "story", "non-empty reference"),
    (dict(target_word_count="many"), "target_word_count", "expected an integer"),
    (dict(target_word_count=0), "target_word_count", "positive"),
    (dict(target_word_count=500), "target_word_count", "prompt asks for 300"),
    (dict(prompt="A story.", target_word_count=...), "target_word_count", "states no 'N words long'"),
    (dict(uid=True), "uid", "non-empty string"),
    (dict(ground_truth_reasoning=3), "ground_truth_reasoning", "not a string"),
])
def test_reader_errors_name_file_row_and_field(tmp_path, bad, field, problem):
    path = write_jsonl(tmp_path / "train.jsonl", [row(uid="ok"), row(**bad)])
    with pytest.raises(DataError) as err:
        load_polaris(path)
    msg = str(err.value)
    assert msg.startswith(f"{path} row 1 (line 2): field '{field}'") and problem in msg, msg


def test_reader_rejects_duplicate_uids_and_non_objects(tmp_path):
    with pytest.raises(DataError, match=r"row 1 \(line 2\): field 'uid' is 'u1', already used by .*row 0"):
        load_polaris(write_jsonl(tmp_path / "a.jsonl", [row(), row()]))
    with pytest.raises(DataError, match=r"row 0 \(line 1\): expected an object"):
        load_polaris(write_jsonl(tmp_path / "b.jsonl", [[1, 2]]))


def test_synthetic_dataset_is_deterministic_and_loads(tmp_path, capsys):
    a = write_polaris_dataset(tmp_path / "a", 10, seed=3)
    b = write_polaris_dataset(tmp_path / "b", 10, seed=3)
    assert a["train"].read_bytes() == b["train"].read_bytes()
    train, test = load_polaris(a["train"]), load_polaris(tmp_path / "a", split="test")
    assert len(train) == 8 and len(test) == 2 and len({e.uid for e in train + test}) == 10
    for e in train:  # the reference is about as long as asked and the prompt states the target
        assert target_word_count(e.messages[-1]["content"]) == e.target_word_count
        assert e.target_word_count <= len(e.story.split()) < e.target_word_count + 60
    assert polaris_synth_main(["--out", str(tmp_path / "c"), "--n", "5", "--format", "jsonl"]) == 0
    assert "train:" in capsys.readouterr().out and len(load_polaris(tmp_path / "c" / "train.jsonl")) == 4


def test_load_for_config_dispatches_on_format(tmp_path):
    paths = write_polaris_dataset(tmp_path, 5, seed=0, fmt="jsonl")
    [first, *_] = load_for_config(DataConfig(path=str(paths["train"]), format="polaris", limit=2))
    assert isinstance(first, PolarisExample)
    turn = {"prompt": [{"role": "user", "content": "I wait."}], "target_response": {"next_episode": "2"}}
    ep = write_jsonl(tmp_path / "turns.jsonl", [turn])
    assert isinstance(load_for_config(DataConfig(path=str(ep)))[0], TurnExample)
    with pytest.raises(DataError):  # the wrong reader for the rows fails loudly, not as reward 0
        load_for_config(DataConfig(path=str(ep), format="polaris"))


def test_one_think_rule_for_every_recipe():
    """Recipe A's parser, recipe B's penalties and the judge see the same answer (rewards/think.py)."""
    from rewards.episodebench import parse_response
    from rewards.judge_rubric import visible_story
    from rewards.polaris import story_part
    from rewards.think import answer_text, strip_think

    cases = {
        "<think>plan</think> The story.": "The story.",
        "Preamble. <THINK>plan</Think> Then more.": "Preamble.  Then more.",   # case-insensitive; text around kept
        "<think>a</think> one <think>b</think> two": "one  two",                # between two blocks: kept
        "reasoning</think> answer": "answer",                                   # template opened the block
        "<think>never closed": "",
        'x {"s": "I <think> so"} y': 'x {"s": "I <think> so"} y',              # a tag inside JSON is content
    }
    for text, answer in cases.items():
        assert strip_think(text) == answer, text
        assert story_part(text) == answer_text(text) and visible_story(text) == answer
    json_after_preamble = 'I think: ```json\n{"plot_list": [{"narrative": "n"}], "next_episode": "2"}\n```'
    assert parse_response("<think>x</think>" + json_after_preamble).schema_valid
