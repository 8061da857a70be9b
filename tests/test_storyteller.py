"""Recipe C (QwenStoryteller2, text-only) without Ray: the structure gate, the contrastive
re-identification reward and the grounding share on hand-written outputs, hostile input (every
value finite and in range, fast), the ``think_text`` rule, the row reader (errors naming file,
row and field) and the synthetic generator (determinism, real/synthetic share, cast rules)."""
import json
import math
import random
import time

import pytest

from rewards.storyteller import (MAX_OUTPUT_CHARS, MAX_TAGS, grounding_reward, parse_story, reid_reward,
                                 st_ground, st_reid, st_struct, structure_ok)
from rewards.think import answer_text, think_text
from rlsys.data import DataError
from rlsys.data.storyteller import (SYSTEM_PROMPT, StorytellerExample, load_storyteller,
                                    write_storyteller_dataset)

TABLES = """<think>
Anna and Ben are in the park; the kite links the frames.

| Character ID | Name | Description |
|---|---|---|
| char1 | Anna | a girl in a red coat |
| char2 | Ben | her brother |

| Object ID | Name | Description |
|:--|---|---|
| obj1 | kite | a paper kite |

| Setting ID | Name |
|---|---|
| loc1 | park |
</think>
"""
FRAME1 = ("<gdi image1><gdo char1>Anna</gdo> <gda char1>flies</gda> a <gdo obj1>kite</gdo> "
          "in <gdl loc1>the park</gdl>.</gdi>\n")
FRAME2 = "<gdi image2><gdo char2>Ben</gdo> <gda char2>watches</gda> from a bench.</gdi>\n"
FRAME3 = ("<gdi image3>The wind takes the <gdo obj1>kite</gdo>, and <gdo char1>she</gdo> "
          "<gda char1>runs</gda> after it.</gdi>")
STORY = TABLES + FRAME1 + FRAME2 + FRAME3
# char1 in frames 1 and 3, obj1 in 1 and 3, char2 only in 2: 2 links of 3 entities.
REID = 2 / 3


def frames_of(text: str) -> list[tuple[str, tuple[str, ...]]]:
    return [(f.image, f.entities) for f in parse_story(text).frames]


# ================================================================ well-formed outputs
def test_well_formed_real_story_links_entities():
    parsed = parse_story(STORY)
    assert parsed.well_formed and parsed.reason == ""
    assert parsed.tables == {"character": ("char1", "char2"), "object": ("obj1",), "location": ("loc1",)}
    assert frames_of(STORY) == [("image1", ("char1", "obj1")), ("image2", ("char2",)), ("image3", ("obj1", "char1"))]
    assert parsed.frames[0].locations == ("loc1",)
    assert structure_ok(STORY) == st_struct(STORY) == 1.0
    assert reid_reward(STORY, False) == pytest.approx(REID)


def test_synthetic_sequence_penalises_the_same_links():
    assert reid_reward(STORY, True) == pytest.approx(-REID)
    # A story that keeps the frames apart (no id in two frames) is neither rewarded nor penalised.
    apart = TABLES + FRAME1 + FRAME2
    assert reid_reward(apart, True) == reid_reward(apart, False) == 0.0


@pytest.mark.parametrize("flag, expected", [(True, -REID), (1, -REID), (False, REID), (0, REID),
                                            (None, REID), ("yes", REID), (1.0, REID), (2, REID)])
def test_channel_reads_bool_or_0_1_and_anything_else_as_real(flag, expected):
    assert st_reid(STORY, flag) == pytest.approx(expected)


def test_entity_tags_may_name_several_ids_and_tables_merge():
    text = TABLES.replace("</think>", "\n| character  id | Name |\n|---|---|\n| char3 | Cleo |\n</think>")
    text += ("<gdi image1><gdo char1, char3>The girls</gdo> play.</gdi>"
             "<gdi image2><gdo char3 char2>Cleo and Ben</gdo> rest.</gdi>")
    assert parse_story(text).tables["character"] == ("char1", "char2", "char3")
    assert frames_of(text) == [("image1", ("char1", "char3")), ("image2", ("char3", "char2"))]
    assert reid_reward(text, False) == pytest.approx(1 / 3)  # char3 of char1, char3, char2


def test_tags_are_case_insensitive_and_other_tables_are_ignored():
    text = TABLES.replace("<think>", "<think>\n| Frame | Mood |\n|---|---|\n| 1 | calm |\n")
    text += "<GDI Image1><GDO Char1>Anna</GDO> waits.</gdi>"
    assert structure_ok(text) == 1.0 and frames_of(text) == [("image1", ("char1",))]


# ================================================================ structure failures
BROKEN = {
    "no think": (STORY.replace(TABLES, ""), "exactly one closed <think>"),
    "unclosed think": (STORY.replace("</think>", ""), "exactly one closed <think>"),
    "two think blocks": (STORY + "<think>more</think>", "exactly one closed <think>"),
    "trailing unclosed think": (STORY + "<think>and then", "exactly one closed <think>"),
    "no characters table": (STORY.replace("Character ID", "Person"), "no character id"),
    "table without separator": (STORY.replace("| Name | Description |\n|---|---|---|\n| char1",
                                              "| Name | Description |\n| char1", 1), "no separator row"),
    "bad id in a table": (STORY.replace("| char2 |", "| Ben |"), "expected a character id like char1"),
    "unbalanced tag": (STORY.replace("watches</gda>", "watches"), "</gdi> closes <gda>"),
    "tag closed by another": (STORY.replace("Ben</gdo>", "Ben</gda>"), "</gda> closes <gdo>"),
    "unclosed frame": (STORY[:-len("</gdi>")], "<gdi image3> is never closed"),
    "unknown id": (STORY.replace("<gdo char2>", "<gdo char9>"), "ids not in any table: char9"),
    "nested gdi": (STORY.replace(FRAME2, FRAME2.replace("</gdi>\n", "") + "<gdi image4>x</gdi></gdi>"),
                   "<gdi> nested inside <gdi image2>"),
    "gdo inside gdo": (STORY.replace("<gdo char2>Ben</gdo>", "<gdo char2><gdo char1>Ben</gdo></gdo>"),
                       "<gdo> nested inside <gdo>"),
    "gdo outside a frame": (STORY + " <gdo char1>Anna</gdo>", "outside a <gdi> frame"),
    "empty gdo": (STORY.replace("<gdo char2>Ben</gdo>", "<gdo char2> </gdo>"), "is empty"),
    "empty frame": (STORY.replace(FRAME2, "<gdi image2> </gdi>"), "holds no text"),
    "no frame": (TABLES + "Anna flies a kite.", "no <gdi imageK> frame"),
    "repeated frame": (STORY.replace("image3", "image1"), "frame image1 appears twice"),
    "bad frame id": (STORY.replace("image2", "frame2"), "expected one id like image1"),
    "id-less gdo": (STORY.replace("<gdo char2>", "<gdo>"), "expected ids like char1"),
    "malformed tag": (STORY.replace("<gdo char2>", "<gdo char2"), "malformed grounding tag"),
    "closing tag with attributes": (STORY.replace("Ben</gdo>", "Ben</gdo char2>"), "carries attributes"),
    "stray closing tag": (STORY + "</gdl>", "</gdl> without a matching opening tag"),
    "too long": (STORY + " " * (MAX_OUTPUT_CHARS - len(STORY) + 1), "longer than"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_structure_gates_every_reward(case):
    text, reason = BROKEN[case]
    assert text != STORY
    parsed = parse_story(text)
    assert not parsed.well_formed and reason in parsed.reason, parsed.reason
    assert structure_ok(text) == 0.0
    for synthetic in (False, True):
        assert reid_reward(text, synthetic) == 0.0
    assert grounding_reward(text) == 0.0 and st_ground(text) == 0.0


def test_the_length_limit_is_exact():
    assert structure_ok(STORY + " " * (MAX_OUTPUT_CHARS - len(STORY))) == 1.0


def test_unknown_ids_are_all_listed():
    text = STORY.replace("<gdo char2>", "<gdo char9>").replace("<gdl loc1>", "<gdl loc7>")
    assert parse_story(text).unknown_ids == ("loc7", "char9")


# ================================================================ grounding
def test_grounding_share_by_hand():
    text = TABLES + (
        "<gdi image1><gdo char1>Anna</gdo> met Ben at <gdl loc1>the Park</gdl>. "
        "He smiled at <gdo char1>her</gdo>, and she waved to <gdo char2>Ben</gdo>.</gdi>\n"
        "<gdi image2>Then <gdo char1>Anna</gdo> said, \"Come here, I know.\" Their <gdo obj1>kite</gdo> fell.</gdi>")
    # Candidates (pronouns anywhere; capitalised words not starting a sentence; none inside gdl):
    #   frame 1: Anna (starts the frame: no), Ben (yes, outside gdo), Park (inside gdl: no),
    #            He (pronoun, outside), her (pronoun, in gdo), she (pronoun, outside), Ben (in gdo)
    #   frame 2: Then (starts the frame: no), Anna (in gdo), Come (after an opening quote: no),
    #            I (not name-like: no), Their (pronoun: starts a sentence but pronouns always count, outside)
    # -> 7 candidates (Ben, He, her, she, Ben; Anna, Their), 3 grounded (her, Ben, Anna).
    assert grounding_reward(text) == pytest.approx(3 / 7)
    assert st_ground(text) == pytest.approx(3 / 7)


def test_grounding_is_zero_without_candidates_and_one_when_all_grounded():
    assert grounding_reward(TABLES + "<gdi image1><gdo char1>The girl</gdo> runs.</gdi>") == 0.0
    assert grounding_reward(STORY) == 1.0  # only "she" is a candidate, and it is in a gdo


# ================================================================ think_text
@pytest.mark.parametrize("text, thought", [
    ("<think>plan</think> story", "plan"),
    ("<THINK>a</Think> x <think>b</think> y", "ab"),
    ("pre <think>a</think> mid </think> answer", "pre a mid "),  # an orphan close: all before it
    ("reasoning</think> answer", "reasoning"),
    ("<think>a</think> story <think>never closed", "a"),
    ("<think>never closed", ""),
    ("no tags", ""),
    ('x {"s": "I <think> so"} y', ""),  # a tag inside a JSON string is content
    (None, ""), (b"<think>a</think>", ""),
])
def test_think_text_mirrors_answer_text(text, thought):
    assert think_text(text) == thought
    if isinstance(text, str) and "never closed" not in text and '"' not in text:  # nothing lost or doubled
        assert len(think_text(text)) + len(answer_text(text)) == len(text) - sum(
            len(t) for t in ("<think>", "</think>") for _ in range(text.lower().count(t)))


def test_think_text_is_linear_on_many_tags():
    # ~0.3 s each; a copy of the pieces per orphan tag (quadratic) would take minutes.
    for text, thought in (("</think>x" * 200_000, "x" * 199_999), ("<think>a</think>" * 100_000, "a" * 100_000)):
        start = time.perf_counter()
        assert think_text(text) == thought
        assert time.perf_counter() - start < 5.0


# ================================================================ hostile input
SOUP = ["<think>", "</think>", "<gdi image1>", "<gdi image2>", "<gdi image9>", "</gdi>", "<gdo char1>",
        "<gdo char2>", "</gdo>", "<gda char1>", "</gda>", "<gdl loc1>", "</gdl>", "<gdo>", "<gdo char9>",
        "<gdi>", "| Character ID | Name |\n|---|---|\n| char1 | Anna |\n", "| Object ID |\n", "Anna", " she",
        " Ben", ". ", "\n", "<gd", "<gdo char1", "</gdo x>", "\x00", "😀", "我們", "{\"a\": \"</think>\"}", "|"]


MENTIONS = ["<gdo char1>Anna</gdo>", "<gdo char2>he</gdo>", "<gda char1>runs</gda>", "<gdl loc1>the park</gdl>",
            "<gdo obj1>kite</gdo>", " and ", " she", " Ben", ". ", "\n"]


def soup_cases(n: int, seed: int = 7) -> list[str]:
    """Random tag soup from a seeded generator: a third pure soup, two thirds a valid think block
    then frames of random (mostly balanced) mentions with a few soup pieces mixed in, so every
    stage of the parser is reached and some outputs pass."""
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        if i % 3 == 0:
            cases.append("".join(rng.choice(SOUP) for _ in range(rng.randint(0, 120))))
            continue
        story = []
        for k in range(1, rng.randint(1, 5) + 1):
            body = [rng.choice(MENTIONS) for _ in range(rng.randint(1, 8))]
            for _ in range(rng.choice((0, 0, 1, 2))):  # a broken frame now and then
                body.insert(rng.randint(0, len(body)), rng.choice(SOUP))
            story.append(f"<gdi image{k}>" + "".join(body) + "</gdi>\n")
        cases.append(TABLES + "".join(story))
    return cases


def _big(unit: str, size: int = 2_000_000) -> str:
    return (unit * (size // len(unit) + 1))[:size]


OVER_MAX_TAGS = TABLES + "<gdi image1>" + "<gdo char1>x</gdo>" * 5_100 + "</gdi>"  # 10 202 tags, < 100k chars
HOSTILE = ([None, b"<think></think>", 42, 3.5, ["a"], {"text": STORY}, object(), "", " ", "\n"]
           + [_big(u) for u in ("<gdi image1>", "<gdo char1>", "</gdo>", "<think>", "| char1 |\n", "a ", "<gd")]
           + ["<gdi image1>" * 100_000, "<gdo char1>" * 100_000 + "</gdo>" * 100_000,
              TABLES + "<gdi image1>" + "<gdo char1>" * 8_000,
              OVER_MAX_TAGS,
              TABLES + "<gdo " + "c" * 90_000 + ">", "<think>" + "| Character ID |\n" * 6_000 + "</think>",
              STORY + " " * (MAX_OUTPUT_CHARS - len(STORY))]
           + soup_cases(280))


def test_hostile_cases_cover_the_parser():
    assert len(HOSTILE) >= 300
    assert len(OVER_MAX_TAGS) <= MAX_OUTPUT_CHARS
    assert parse_story(OVER_MAX_TAGS).reason == f"more than {MAX_TAGS} grounding tags"
    # The soup reaches every stage: some outputs fail at the think block, some in the story, some pass.
    reasons = [parse_story(t).reason for t in soup_cases(280)]
    assert sum(r == "" for r in reasons) >= 20 and sum("<gd" in r for r in reasons) >= 20
    assert any("<think>" in r for r in reasons)


@pytest.mark.parametrize("i", range(len(HOSTILE)))
def test_every_reward_is_finite_in_range_and_fast(i):
    text = HOSTILE[i]
    start = time.perf_counter()
    values = {"struct": structure_ok(text), "st_struct": st_struct(text), "reid": reid_reward(text, False),
              "reid_syn": st_reid(text, True), "ground": grounding_reward(text), "st_ground": st_ground(text)}
    elapsed = time.perf_counter() - start
    for name, v in values.items():
        assert isinstance(v, float) and math.isfinite(v), (name, v)
    assert values["struct"] in (0.0, 1.0) and values["struct"] == values["st_struct"]
    assert 0.0 <= values["reid"] <= 1.0 and -1.0 <= values["reid_syn"] <= 0.0
    assert values["reid_syn"] == -values["reid"]  # the same links, opposite sign
    assert 0.0 <= values["ground"] <= 1.0 and values["ground"] == values["st_ground"]
    if values["struct"] == 0.0:
        assert values["reid"] == values["ground"] == 0.0
    parsed = parse_story(text)
    assert isinstance(parsed.reason, str) and parsed.well_formed == (values["struct"] == 1.0)
    assert elapsed < 1.0, f"case {i}: {elapsed:.2f}s"


# ================================================================ reader
def frame(k: int, *entities: tuple[str, str, str], description: str = "A scene.") -> dict:
    return {"image": f"image{k}", "description": description,
            "entities": [{"id": i, "kind": kind, "name": name} for i, kind, name in entities]}


def row(**over) -> dict:
    """A valid row; a field given as ``...`` is left out."""
    r = {"frames": [frame(1, ("char1", "character", "Anna"), ("loc1", "location", "park")),
                    frame(2, ("char1", "character", "Anna"), ("obj1", "object", "kite"))],
         "synthetic": False, "uid": "u1"}
    r.update(over)
    return {k: v for k, v in r.items() if v is not ...}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_reader_builds_the_default_prompt_and_derives_uids(tmp_path):
    rows = [row(), row(uid=..., synthetic=True), row(uid=..., prompt="Tell it as a poem."),
            row(uid="u4", prompt=[{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])]
    a, b, c, d = load_storyteller(write_jsonl(tmp_path / "train.jsonl", rows))
    assert a == StorytellerExample("u1", a.messages, False, rows[0]["frames"])
    assert [m["role"] for m in a.messages] == ["system", "user"] and a.messages[0]["content"] == SYSTEM_PROMPT
    assert "frame descriptions" in SYSTEM_PROMPT
    assert "image1: A scene.\nimage2: A scene." in a.messages[1]["content"]
    assert b.synthetic and b.uid.startswith("st-") and len(b.uid) == 15
    assert c.messages == [{"role": "system", "content": SYSTEM_PROMPT},
                          {"role": "user", "content": "Tell it as a poem."}]
    assert c.uid != b.uid and d.messages[0] == {"role": "system", "content": "S"}
    # The derived uid depends on the content only: the same row elsewhere keeps it.
    [again] = load_storyteller(write_jsonl(tmp_path / "other.jsonl", [rows[1]]))
    assert again.uid == b.uid


@pytest.mark.parametrize("bad, field, problem", [
    (dict(frames=...), "frames", "missing or empty"),
    (dict(frames=[]), "frames", "missing or empty"),
    (dict(frames=["just text"]), "frames[0]", "expected {'image'"),
    (dict(frames=[frame(1), frame(3)]), "frames[1].image", "expected 'image2'"),
    (dict(frames=[frame(1, description=" ")]), "frames[0].description", "non-empty"),
    (dict(frames=[{"image": "image1", "description": "x", "entities": "char1"}]), "frames[0].entities",
     "expected a list"),
    (dict(frames=[frame(1, ("char1", "person", "Anna"))]), "frames[0].entities[0].kind", "expected one of"),
    (dict(frames=[frame(1, ("anna", "character", "Anna"))]), "frames[0].entities[0].id", "like char1"),
    (dict(frames=[frame(1, ("char1", "object", "kite"))]), "frames[0].entities[0].id", "like obj1"),
    (dict(frames=[frame(1, ("char1", "character", "A"), ("char1", "character", "B"))]),
     "frames[0].entities[1].id", "listed twice"),
    (dict(frames=[frame(1, ("char1", "character", ""))]), "frames[0].entities[0].name", "non-empty"),
    (dict(synthetic=...), "synthetic", "is missing"),
    (dict(synthetic=1), "synthetic", "expected true for a shuffled"),
    (dict(prompt=" "), "prompt", "is blank"),
    (dict(prompt=[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]), "prompt",
     "ends with a 'assistant'"),
    (dict(prompt=7), "prompt", "expected a chat list"),
    (dict(uid=True), "uid", "non-empty string"),
])
def test_reader_errors_name_file_row_and_field(tmp_path, bad, field, problem):
    path = write_jsonl(tmp_path / "train.jsonl", [row(uid="ok"), row(**bad)])
    with pytest.raises(DataError) as err:
        load_storyteller(path)
    msg = str(err.value)
    assert msg.startswith(f"{path} row 1 (line 2): field '{field}'") and problem in msg, msg


def test_reader_rejects_duplicate_uids_and_non_objects(tmp_path):
    with pytest.raises(DataError, match=r"row 1 \(line 2\): field 'uid' is 'u1', already used by .*row 0"):
        load_storyteller(write_jsonl(tmp_path / "a.jsonl", [row(), row()]))
    with pytest.raises(DataError, match=r"row 1 \(line 2\): field 'uid' is 'st-"):  # identical rows, derived uid
        load_storyteller(write_jsonl(tmp_path / "b.jsonl", [row(uid=...), row(uid=...)]))
    with pytest.raises(DataError, match=r"row 0 \(line 1\): expected an object"):
        load_storyteller(write_jsonl(tmp_path / "c.jsonl", [[1, 2]]))


# ================================================================ synthetic data
def tell(example: StorytellerExample, relink: bool = False) -> str:
    """An output that follows the format: tables from the frames' entities, one tagged sentence
    per frame. ``relink`` reuses frame 1's first character in every frame (a spurious link)."""
    entities = {e["id"]: e for f in example.frames for e in f["entities"]}
    rows = {kind: "".join(f"| {e['id']} | {e['name']} |\n" for e in entities.values() if e["kind"] == kind)
            for kind in ("character", "object", "location")}
    think = "".join(f"| {col} | Name |\n|---|---|\n{rows[kind]}\n"
                    for col, kind in (("Character ID", "character"), ("Object ID", "object"),
                                      ("Setting ID", "location")) if rows[kind])
    first = next(e for e in example.frames[0]["entities"] if e["kind"] == "character")
    story = ""
    for f in example.frames:
        tags = " ".join(f"<{'gdl' if e['kind'] == 'location' else 'gdo'} {e['id']}>{e['name']}</"
                        f"{'gdl' if e['kind'] == 'location' else 'gdo'}>" for e in f["entities"])
        if relink:
            tags += f" <gdo {first['id']}>{first['name']}</gdo>"
        story += f"<gdi {f['image']}>{tags}.</gdi>\n"
    return f"<think>\n{think}</think>\n{story}"


def test_synthetic_dataset_is_deterministic_with_the_share(tmp_path):
    a = write_storyteller_dataset(tmp_path / "a", 30, seed=3)
    b = write_storyteller_dataset(tmp_path / "b", 30, seed=3)
    c = write_storyteller_dataset(tmp_path / "c", 30, seed=4)
    assert set(a) == {"train", "test"}
    assert a["train"].read_bytes() == b["train"].read_bytes() and a["test"].read_bytes() == b["test"].read_bytes()
    assert a["train"].read_bytes() != c["train"].read_bytes()
    train, test = load_storyteller(a["train"]), load_storyteller(tmp_path / "a", split="test")
    assert len(train) == 24 and len(test) == 6 and len({e.uid for e in train + test}) == 30
    assert sum(e.synthetic for e in train + test) == 10  # 1/3 of 30, exactly
    assert sum(e.synthetic for e in test) == 2  # spread evenly, not bunched at one end
    assert sum(e.synthetic for e in load_storyteller(write_storyteller_dataset(tmp_path / "d", 9, 0, "jsonl",
                                                                               synthetic_share=0)["train"])) == 0
    assert all(e.synthetic for e in load_storyteller(write_storyteller_dataset(tmp_path / "e", 9, 0,
                                                                               synthetic_share=1.0)["train"]))


def test_real_casts_are_consistent_and_synthetic_casts_unrelated(tmp_path):
    examples = load_storyteller(write_storyteller_dataset(tmp_path, 40, seed=1, fmt="jsonl")["train"])
    assert {True, False} == {e.synthetic for e in examples}
    for e in examples:
        assert 3 <= len(e.frames) <= 5
        per_frame = [{x["id"]: x["name"] for x in f["entities"]} for f in e.frames]
        if not e.synthetic:  # the protagonist in every frame, each id always the same name
            assert all(p.get("char1") == per_frame[0]["char1"] for p in per_frame)
            names = {}
            for p in per_frame:
                for i, name in p.items():
                    assert names.setdefault(i, name) == name
        else:  # no id and no name in two frames
            ids = [i for p in per_frame for i in p]
            names = [n for p in per_frame for n in p.values()]
            assert len(ids) == len(set(ids)) and len(names) == len(set(names))


def test_rewards_on_generated_sequences(tmp_path):
    """The data and the reward agree: a faithful output links a real cast (reid > 0) and keeps a
    synthetic one apart (0); linking a synthetic sequence's frames is penalised."""
    examples = load_storyteller(write_storyteller_dataset(tmp_path, 20, seed=2)["train"])
    for e in examples:
        text = tell(e)
        assert structure_ok(text) == 1.0, parse_story(text).reason
        if e.synthetic:
            assert st_reid(text, e.synthetic) == 0.0 and st_reid(tell(e, relink=True), e.synthetic) < 0.0
        else:
            assert st_reid(text, e.synthetic) > 0.0


def test_generator_rejects_bad_arguments(tmp_path):
    for kwargs in (dict(n=0), dict(fmt="csv"), dict(synthetic_share=1.5), dict(synthetic_share=float("nan"))):
        args = {"n": 5, "seed": 0, **kwargs}
        with pytest.raises(ValueError):
            write_storyteller_dataset(tmp_path, **args)


def test_format_progress_counts_markers_independently():
    from rewards.storyteller import format_progress, st_progress

    assert format_progress("a plain story with no format at all") == 0.0
    assert format_progress("<gdi image2>Rain falls.</gdi>") == 0.25           # the frame tag alone
    assert format_progress("<think>plan</think> <gdi image1><gdo char1>Ana</gdo></gdi>") == 0.75
    full = "<think>\n| Character ID | Name |\n|---|---|\n| char1 | Ana |\n</think><gdi image1><gdo char1>Ana</gdo></gdi>"
    assert format_progress(full) == 1.0 and st_progress(full) == 1.0
    assert format_progress("</think> then <think>") == 0.0                      # not a closed block
    assert format_progress(None) == 0.0 and format_progress("<gdi image1>" * 100_000) == 0.0  # bounded
