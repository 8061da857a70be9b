"""EpisodeBench reader (parquet/jsonl, errors naming row and field) and the synthetic generator."""
import ast
import json
import re
from collections import defaultdict

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rewards.episodebench import parse_response, score_episodebench
from rlsys.data import DataError, load_examples
from rlsys.data.synth import generate, synth_main, write_dataset


def good_row(**over) -> dict:
    row = {
        "prompt": [{"role": "system", "content": "You narrate."},
                   {"role": "user", "content": "{'type': 'normal', 'action': 'I wait.'}"}],
        "system_prompt": "You narrate.",
        "conversation_history": [],
        "user_input": "{'type': 'normal', 'action': 'I wait.'}",
        "target_response": "{'plot_list': [], 'next_episode': '2'}",
        "judge_system_prompt": "Judge.",
        "turn_index": 1, "total_turns": 4, "language": "en",
        "extra_info": {"index": 7, "split": "train", "story_id": "s1", "total_turns": 4, "turn_index": 1},
    }
    row.update(over)
    return row


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------- reader
def test_reads_a_jsonl_row(tmp_path):
    [ex] = load_examples(write_jsonl(tmp_path / "train.jsonl", [good_row()]))
    assert ex.uid == "s1/1/7" and ex.reference_next_episode == "2"
    assert [m["role"] for m in ex.messages] == ["system", "user"]
    assert (ex.language, ex.story_id, ex.turn_index, ex.total_turns, ex.split) == ("en", "s1", 1, 4, "train")


def test_reads_parquet_like_jsonl(tmp_path):
    rows = [good_row(), good_row(target_response={"next_episode": 3}, turn_index=2,
                                 extra_info={"index": 8, "split": "train", "story_id": "s1",
                                             "total_turns": 4, "turn_index": 2})]
    pq.write_table(pa.Table.from_pylist([dict(r, target_response=str(r["target_response"])) for r in rows]),
                   tmp_path / "d.parquet")
    a = load_examples(tmp_path / "d.parquet")
    b = load_examples(write_jsonl(tmp_path / "d.jsonl", rows))
    assert [e.reference_next_episode for e in a] == ["2", "3"]   # int id 3 read as "3"
    assert a == b


def test_target_response_forms(tmp_path):
    forms = [{"next_episode": " 4 "}, '{"next_episode": "4"}', "{'next_episode': '4', 'plot_list': []}"]
    rows = [good_row(target_response=f) for f in forms]
    assert {e.reference_next_episode for e in load_examples(write_jsonl(tmp_path / "t.jsonl", rows))} == {"4"}


def test_messages_rebuilt_without_prompt(tmp_path):
    # No `prompt`: system_prompt + conversation_history (ShareGPT form) + user_input.
    row = good_row(conversation_history=[{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ok"}])
    del row["prompt"]
    [ex] = load_examples(write_jsonl(tmp_path / "r.jsonl", [row]))
    assert [(m["role"], m["content"]) for m in ex.messages] == [
        ("system", "You narrate."), ("user", "hi"), ("assistant", "ok"),
        ("user", "{'type': 'normal', 'action': 'I wait.'}")]


def bad(**over):
    row = good_row(**over)
    return {k: v for k, v in row.items() if v is not ...}


@pytest.mark.parametrize("row, field, expected", [
    (bad(target_response="{'plot_list': []}"), "target_response", "no 'next_episode'"),
    (bad(target_response="not a dict"), "target_response", "expected a dict or dict-as-string"),
    (bad(target_response={"next_episode": ""}), "target_response", "non-empty"),
    (bad(prompt=[{"role": "user"}]), "prompt", "message 0"),
    (bad(prompt=[{"role": "wizard", "content": "x"}]), "prompt", "expected {'role'"),
    (bad(prompt=[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]),
     "prompt", "last message"),
    (bad(prompt="just text"), "prompt", "expected a list of chat messages"),
    (bad(prompt=..., system_prompt=...), "system_prompt", "missing or empty"),
    (bad(turn_index="three"), "turn_index", "expected an integer"),
    (bad(turn_index=2.5), "turn_index", "expected an integer"),
    (bad(turn_index=4), "turn_index", "turn_index < total_turns"),
    (bad(language=1), "language", "language code"),
    (bad(extra_info=[1, 2]), "extra_info", "expected a dict"),
])
def test_malformed_row_names_file_row_and_field(tmp_path, row, field, expected):
    path = write_jsonl(tmp_path / "train.jsonl", [good_row(), row])
    with pytest.raises(DataError) as err:
        load_examples(path)
    msg = str(err.value)
    # The bad record is the second one: row 1, on line 2 of the file.
    assert msg.startswith(f"{path} row 1 (line 2): field '{field}'"), msg
    assert expected in msg, msg
    assert isinstance(err.value, ValueError)


def test_parquet_error_names_row(tmp_path):
    rows = [good_row(), good_row(), good_row(target_response="{'next': '2'}")]
    path = tmp_path / "x.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))} row 2: field 'target_response'"):
        load_examples(path)


def test_file_level_errors(tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps(good_row()) + "\n\n{oops\n")
    # Blank lines are skipped: the second record is on line 3.
    with pytest.raises(DataError, match=r"row 1 \(line 3\): not valid JSON"):
        load_examples(tmp_path / "bad.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_examples(tmp_path / "d.csv")
    with pytest.raises(DataError, match="no such file"):
        load_examples(tmp_path / "missing.jsonl")
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="not a readable parquet file"):
        load_examples(tmp_path / "fake.parquet")


def test_split_and_limit(tmp_path):
    rows = [good_row(extra_info={"index": i, "split": s, "story_id": "s", "total_turns": 4, "turn_index": 1})
            for i, s in enumerate(["train", "test", "train", "train"])]
    path = write_jsonl(tmp_path / "all.jsonl", rows)
    assert [e.uid for e in load_examples(path, split="train")] == ["s/1/0", "s/1/2", "s/1/3"]
    assert len(load_examples(path, split="train", limit=2)) == 2
    assert len(load_examples(path, limit=0)) == 0


# ---------------------------------------------------------------- synthetic data
@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_synth_is_byte_identical_under_a_seed(tmp_path, fmt):
    a = write_dataset(tmp_path / "a", 6, seed=11, fmt=fmt, zh_ratio=0.2)
    b = write_dataset(tmp_path / "b", 6, seed=11, fmt=fmt, zh_ratio=0.2)
    c = write_dataset(tmp_path / "c", 6, seed=12, fmt=fmt, zh_ratio=0.2)
    assert set(a) == {"train", "test", "graphs"}
    for key in a:
        assert a[key].read_bytes() == b[key].read_bytes(), key
    assert a["train"].read_bytes() != c["train"].read_bytes()


def test_synth_output_passes_the_reader_in_both_formats(tmp_path):
    write_dataset(tmp_path / "p", 8, seed=3, fmt="parquet", zh_ratio=0.25)
    write_dataset(tmp_path / "j", 8, seed=3, fmt="jsonl", zh_ratio=0.25)
    for split in ("train", "test"):
        p = load_examples(tmp_path / "p", split=split)
        assert p and p == load_examples(tmp_path / "j", split=split)
        assert all(e.split == split for e in p)
        assert len({e.uid for e in p}) == len(p)
    train_ids = {e.story_id for e in load_examples(tmp_path / "p", split="train")}
    test_ids = {e.story_id for e in load_examples(tmp_path / "p", split="test")}
    assert train_ids and test_ids and not train_ids & test_ids    # split by story
    langs = {e.language for e in load_examples(tmp_path / "p")}
    assert langs == {"en", "zh"}                                    # 2 of 8 stories in Chinese


def test_synth_references_follow_the_graph(tmp_path):
    paths = write_dataset(tmp_path, 10, seed=5, fmt="jsonl", zh_ratio=0.2)
    graphs = json.loads(paths["graphs"].read_text(encoding="utf-8"))
    episodes = {g["setting"]["story_id"]: {e["episode_id"]: e for e in g["episodes"]} for g in graphs["stories"]}
    rows = defaultdict(list)
    for split in ("train", "test"):
        for line in paths[split].read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            rows[row["extra_info"]["story_id"]].append(row)
    assert set(rows) == set(episodes)
    for story_id, story_rows in rows.items():
        eps = episodes[story_id]
        story_rows.sort(key=lambda r: r["turn_index"])
        assert [r["turn_index"] for r in story_rows] == list(range(len(story_rows)))
        current, transitions = "1", 0
        for row in story_rows:
            reference = ast.literal_eval(row["target_response"])["next_episode"]
            narrative = ast.literal_eval(row["target_response"])["plot_list"][0]["narrative"]
            conditions = {t["next_episode"]: t["condition"] for t in eps[current]["triggers"]}
            counter = re.search(r"Round (\d+) of (\d+)|第(\d+)轮，共(\d+)轮", row["system_prompt"])
            rnd, budget = (int(g) for g in counter.groups() if g is not None)
            if reference == current:
                # Staying: nothing in the reference story text meets a trigger condition.
                assert not any(c in narrative for c in conditions.values())
                assert rnd < budget
            else:
                # Moving: the target is a trigger of the current episode, the reference story
                # states that trigger's condition, and it happens on the episode's last round.
                assert reference in conditions, (story_id, current, reference)
                assert narrative.startswith(conditions[reference])
                assert ast.literal_eval(row["user_input"])["type"] == "normal"
                assert rnd == budget
                current, transitions = reference, transitions + 1
        assert current == "-1" and transitions >= 3     # every story plays to its end


def test_synth_graph_is_consistent():
    stories, _ = generate(12, seed=2)
    for story in stories:
        eps = story.episodes
        for eid, ep in eps.items():
            for pred in ep["predecessors"]:
                assert eid in [t["next_episode"] for t in eps[pred]["triggers"]]
            assert (eid == "1") == (ep["predecessors"] == [])
        conditions = [t["condition"] for ep in eps.values() for t in ep["triggers"]]
        assert len(conditions) == len(set(conditions))     # one trigger per action
        for path in story.setting["paths"]:
            assert path[0] == "1"
            for a, b in zip(path, path[1:]):
                assert b in [t["next_episode"] for t in eps[a]["triggers"]]
            assert "-1" in [t["next_episode"] for t in eps[path[-1]]["triggers"]]


def test_synth_prompts_are_short_and_teach_the_format():
    _, rows = generate(12, seed=4)
    for row in rows["train"] + rows["test"]:
        system = row["system_prompt"]
        words = sum(len(m["content"].split()) for m in row["prompt"])
        assert words <= 230, words   # ~400 SmolLM2 tokens at most for English chats
        for needle in ("plot_list", "next_episode", "```json", "Round", "Triggers", "Goal", "Scene"):
            assert needle in system
        # The example answer embedded in the prompt is itself a perfectly formatted answer.
        example = system[system.rindex("```json"):]
        assert parse_response(example).strict_valid
        # The reference answer scores full format and accuracy credit with recipe A's rewards.
        target = ast.literal_eval(row["target_response"])
        text = "```json\n" + json.dumps(target) + "\n```"
        scores = score_episodebench(text, target["next_episode"], strict=True)
        assert scores["fmt"] == 1.0 and scores["acc"] == 1.0


def test_synth_cli(tmp_path, capsys):
    assert synth_main(["--out", str(tmp_path / "o"), "--stories", "3", "--seed", "1", "--format", "jsonl"]) == 0
    assert {p.name for p in (tmp_path / "o").iterdir()} == {"train.jsonl", "test.jsonl", "graphs.json"}
    assert "train:" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        synth_main(["--out", str(tmp_path / "o2"), "--stories", "0"])
