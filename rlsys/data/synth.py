"""Synthetic EpisodeBench data: turn rows in the published turn-level schema.

For each story (see ``synth_graph``) one path through the graph is played. Each episode on
it gets a budget of rounds; on every round but the last the user acts without meeting a
trigger (a normal, abnormal or "hacking" action) and the reference next_episode is the
current episode; on the last round the user's action satisfies the trigger that leads to
the next episode on the path, which becomes the reference. So the label is always the
one the graph implies for the visible action.

Output: ``train`` and ``test`` files (split by story) plus ``graphs.json``. The same seed
gives byte-identical files; each story draws from its own RNG seeded by "seed:index", so
adding stories does not change earlier ones.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any, Callable, Sequence

from rlsys.atomic import write_file
from rlsys.data.synth_graph import END, Story, make_story
from rlsys.data.synth_text import TEXT
from rlsys.data.synth_vocab import EN_GENRES, ZH_GENRES

__all__ = ["generate", "story_rows", "play_turn", "turn_prompt", "exchange", "fenced", "write_dataset",
           "synth_main"]

MIN_ROUNDS, MAX_ROUNDS = 3, 5      # per-episode budget (the paper's T = 10, shortened for CPU)
KIND_WEIGHTS = (("normal", 0.7), ("abnormal", 0.2), ("hacking", 0.1))
TEST_FRACTION = 0.2


def _pick_kind(rng: random.Random) -> str:
    kinds, weights = zip(*KIND_WEIGHTS)
    return rng.choices(kinds, weights)[0]


def _system_prompt(story: Story, ep: dict[str, Any], rnd: int, budget: int,
                   history: list[str], example: dict[str, Any]) -> str:
    t = TEXT[story.language]
    s = story.setting
    sep = ", " if story.language == "en" else "，"
    triggers = "\n".join(str(t["trigger_line"]).format(**tr) for tr in ep["triggers"])
    return str(t["system"]).format(
        hero=s["leading_role"], name=s["name"], style=sep.join(s["style"][:2]),
        description=s["description"],
        # Only the episode's cast: the whole cast costs tokens the turn does not use.
        characters="; ".join(f"{k} ({s['characters'][k]})" for k in ep["characters"]),
        eid=ep["episode_id"], episode_desc=ep["description"], goal=ep["goal"],
        scene=ep["scene"], triggers=triggers, round=rnd, budget=budget,
        pacing=t["pacing_last"] if rnd == budget else t["pacing"],
        history=str(t["space"]).join(history[-2:]) or t["story_start"],
        example=json.dumps(example, ensure_ascii=False),
    )


def _answer(narrative: str, ally: str, line: str, next_episode: str) -> dict[str, Any]:
    return {"plot_list": [{"narrative": narrative,
                           "role_dialogue": {"name": ally, "utterance": line}}],
            "next_episode": next_episode}


def fenced(answer: dict[str, Any]) -> str:
    """An answer as the reference writes it: its JSON in a ```json block."""
    return "```json\n" + json.dumps(answer, ensure_ascii=False) + "\n```"


def play_turn(story: Story, eid: str, reference: str, rng: random.Random) -> tuple[str, dict[str, Any]]:
    """The user's input for one round of episode ``eid`` and the reference answer to it.

    ``reference == eid``: the user acts without meeting a trigger (a normal, abnormal or
    "hacking" action, drawn with ``KIND_WEIGHTS``) and the answer stays; otherwise the user's
    action satisfies the trigger to ``reference`` and the answer moves there. Shared by the
    data (``story_rows``) and rlsys eval's episode simulator (``rlsys.eval_episodes``), so the
    simulated user acts exactly as the training data's user does.
    """
    t = TEXT[story.language]
    slots = story.slots[eid]
    if reference != eid:
        kind = "normal"
        action, narrative = story.trigger_actions[(eid, reference)]
        narrative += str(t["space"]) + str(t["after_final"])
    else:
        kind = _pick_kind(rng)
        action, narrative = (s.format(**slots) for s in rng.choice(t[f"{kind}_actions"]))
        narrative += str(t["space"]) + rng.choice(t["atmosphere"]).format(**slots)
    line = rng.choice(t["lines"]).format(**slots)
    return str({"type": kind, "action": action}), _answer(narrative, slots["ally"], line, reference)


def turn_prompt(story: Story, eid: str, rnd: int, budget: int, history: list[str],
                previous: list[dict[str, str]], user_input: str, rng: random.Random) -> list[dict[str, str]]:
    """The chat prompt of round ``rnd`` of ``budget`` in episode ``eid``: the system prompt
    (outline, triggers, round counter, "Story so far" from ``history``, a drawn example answer),
    then ``previous`` (the last exchange, see ``exchange``), then the user's input."""
    t = TEXT[story.language]
    slots = story.slots[eid]
    example = _answer(rng.choice(t["atmosphere"]).format(**slots), slots["ally"],
                      rng.choice(t["lines"]).format(**slots), eid)
    system = _system_prompt(story, story.episodes[eid], rnd, budget, history, example)
    return [{"role": "system", "content": system}, *previous, {"role": "user", "content": user_input}]


def exchange(user_input: str, answer_text: str) -> list[dict[str, str]]:
    """One round as the chat history of the next round's prompt.

    Only the last exchange is carried: it shows the answer format once more while keeping
    prompts short; older events live in "Story so far".
    """
    return [{"role": "user", "content": user_input}, {"role": "assistant", "content": answer_text}]


def story_rows(story: Story, rng: random.Random, split: str) -> list[dict[str, Any]]:
    """Play one path of ``story`` and return its turn rows (extra_info.index left at 0)."""
    t = TEXT[story.language]
    path = rng.choice(story.setting["paths"])
    plan: list[tuple[str, int, int, str]] = []   # (episode, round, budget, reference)
    for pos, eid in enumerate(path):
        nxt = path[pos + 1] if pos + 1 < len(path) else END
        budget = rng.randint(MIN_ROUNDS, MAX_ROUNDS)
        plan += [(eid, r, budget, nxt if r == budget else eid) for r in range(1, budget + 1)]

    rows: list[dict[str, Any]] = []
    history: list[str] = []
    previous: list[dict[str, str]] = []
    for turn, (eid, rnd, budget, reference) in enumerate(plan):
        user_input, answer = play_turn(story, eid, reference, rng)
        prompt = turn_prompt(story, eid, rnd, budget, history, previous, user_input, rng)
        system = prompt[0]["content"]
        rows.append({
            "prompt": prompt,
            "system_prompt": system,
            "conversation_history": list(previous),
            "user_input": user_input,
            "target_response": str(answer),
            "judge_system_prompt": str(t["judge"]),
            "turn_index": turn,
            "total_turns": len(plan),
            "language": story.language,
            "extra_info": {"index": 0, "split": split, "story_id": story.setting["story_id"],
                           "total_turns": len(plan), "turn_index": turn},
        })
        previous = exchange(user_input, fenced(answer))
        if reference != eid:
            history.append(story.trigger_actions[(eid, reference)][1])
    return rows


def _is_zh(i: int, zh_ratio: float) -> bool:
    """Spread round(n·zh_ratio) Chinese stories evenly over the story indices."""
    return int((i + 1) * zh_ratio) > int(i * zh_ratio)


def generate(n_stories: int, seed: int, zh_ratio: float = 0.0
             ) -> tuple[list[Story], dict[str, list[dict[str, Any]]]]:
    """Stories and their rows by split; the last ~20 % of stories (at least one when there
    are two or more) form the test split, so no test story is seen in training."""
    if n_stories < 1:
        raise ValueError(f"need at least one story, got {n_stories}")
    if not 0.0 <= zh_ratio <= 1.0:
        raise ValueError(f"zh_ratio must be in [0, 1], got {zh_ratio}")
    n_test = max(1, round(n_stories * TEST_FRACTION)) if n_stories > 1 else 0
    stories: list[Story] = []
    rows: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    for i in range(n_stories):
        rng = random.Random(f"{seed}:{i}")   # str seeds hash with sha512: stable across runs
        zh = _is_zh(i, zh_ratio)
        genre = rng.choice(ZH_GENRES if zh else EN_GENRES)
        story = make_story(rng, f"{'zh' if zh else 'en'}-{seed}-{i:04d}", genre)
        split = "test" if i >= n_stories - n_test else "train"
        stories.append(story)
        rows[split].extend(story_rows(story, rng, split))
    for split_rows in rows.values():
        for index, row in enumerate(split_rows):
            row["extra_info"]["index"] = index
    return stories, rows


def write_rows(path: Path, rows: list[dict[str, Any]], fmt: str, schema: Any = None) -> None:
    """Write dataset rows as jsonl, or as parquet with `schema` (a pyarrow schema; default the
    EpisodeBench turn schema). Byte-identical for identical rows, as the generators promise."""
    if fmt == "jsonl":  # written atomically: a killed generator leaves the old file or none
        write_file(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        return
    import pyarrow as pa  # deferred: jsonl users need no pyarrow
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema or turn_schema()), sink)
    write_file(path, sink.getvalue().to_pybytes())


def check_rows_args(n: int, fmt: str) -> None:
    """The arguments every row-dataset generator takes: a row count and a file format."""
    if fmt not in ("parquet", "jsonl"):
        raise ValueError(f"fmt must be 'parquet' or 'jsonl', got {fmt!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")


def write_train_test(out_dir: str | Path, rows: list[dict[str, Any]], test_fraction: float, fmt: str,
                     schema: Callable[[], Any]) -> dict[str, Path]:
    """Write the last `test_fraction` of `rows` to ``test.<fmt>`` and the rest to ``train.<fmt>``
    (`write_rows`, atomic; `schema()` is the parquet schema, built only for parquet)."""
    n_test = int(len(rows) * test_fraction)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, part in (("train", rows[:len(rows) - n_test]), ("test", rows[len(rows) - n_test:])):
        paths[split] = out / f"{split}.{fmt}"
        write_rows(paths[split], part, fmt, schema() if fmt == "parquet" else None)
    return paths


def chat_message_type() -> Any:
    """pyarrow type of one chat message {role, content}."""
    import pyarrow as pa
    return pa.struct([("role", pa.string()), ("content", pa.string())])


def turn_schema() -> Any:
    """pyarrow schema of EpisodeBench turn rows."""
    import pyarrow as pa

    message = chat_message_type()
    return pa.schema([
        ("prompt", pa.list_(message)), ("system_prompt", pa.string()),
        ("conversation_history", pa.list_(message)), ("user_input", pa.string()),
        ("target_response", pa.string()), ("judge_system_prompt", pa.string()),
        ("turn_index", pa.int64()), ("total_turns", pa.int64()), ("language", pa.string()),
        ("extra_info", pa.struct([("index", pa.int64()), ("split", pa.string()),
                                  ("story_id", pa.string()), ("total_turns", pa.int64()),
                                  ("turn_index", pa.int64())])),
    ])


def write_dataset(out_dir: str | Path, n_stories: int, seed: int, fmt: str = "parquet",
                  zh_ratio: float = 0.0) -> dict[str, Path]:
    """Write ``train.<fmt>``, ``test.<fmt>`` and ``graphs.json`` under ``out_dir``."""
    if fmt not in ("parquet", "jsonl"):
        raise ValueError(f"fmt must be 'parquet' or 'jsonl', got {fmt!r}")
    stories, rows = generate(n_stories, seed, zh_ratio)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {split: out / f"{split}.{fmt}" for split in rows}
    for split, split_rows in rows.items():
        write_rows(paths[split], split_rows, fmt)
    graphs = {"seed": seed, "stories": [s.to_json() for s in stories]}
    paths["graphs"] = out / "graphs.json"
    write_file(paths["graphs"], json.dumps(graphs, ensure_ascii=False, indent=1) + "\n")
    return paths


def synth_main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``rlsys data synth --out DIR --stories N --seed S [--format parquet|jsonl]``."""
    parser = argparse.ArgumentParser(prog="rlsys data synth",
                                     description="Write a synthetic EpisodeBench dataset.")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--stories", type=int, default=20, help="number of stories (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--format", choices=("parquet", "jsonl"), default="parquet")
    parser.add_argument("--zh-ratio", type=float, default=0.0,
                        help="share of stories written in Chinese (default 0)")
    args = parser.parse_args(argv)
    try:
        paths = write_dataset(args.out, args.stories, args.seed, args.format, args.zh_ratio)
    except ValueError as exc:
        parser.error(str(exc))
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def rows_dataset_cli(argv: Sequence[str] | None, prog: str, description: str, default_n: int,
                     write: Callable[[str, int, int, str], dict]) -> int:
    """The CLI of a row-dataset generator: ``PROG --out DIR [--n N] [--seed S] [--format parquet|jsonl]``
    calling ``write(out, n, seed, format)`` and printing the paths it returns."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--n", type=int, default=default_n, help=f"number of rows, train + test (default {default_n})")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--format", choices=("parquet", "jsonl"), default="parquet")
    args = parser.parse_args(argv)
    try:
        paths = write(args.out, args.n, args.seed, args.format)
    except ValueError as exc:
        parser.error(str(exc))
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0
