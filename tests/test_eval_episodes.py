"""Recipe A's transition timing over multi-turn episode rollouts (rlsys/eval_episodes.py and
eval_metrics.timing_*), driven by scripted fake models: no Ray, no engine."""
from __future__ import annotations

import json
import math
import re
from typing import Callable

import pytest

from rewards.think import strip_think
from rlsys.data.synth import generate, write_dataset
from rlsys.data.synth_graph import Story
from rlsys.eval_episodes import GraphsError, load_stories, max_rounds, simulate_episodes, story_path
from rlsys.eval_metrics import TIMING_BUCKETS, timing_bucket, timing_metrics

T = 10
SEED = 3


@pytest.fixture(scope="module")
def stories() -> list[Story]:
    return generate(3, seed=7)[0]   # English only: the fake models read the English prompt


def n_episodes(stories: list[Story]) -> int:
    return sum(len(story_path(s, SEED)) for s in stories)


def turn(messages: list[dict[str, str]]) -> tuple[str, int, list[str]]:
    """What a scripted model reads from its prompt: current episode, round, trigger targets."""
    system = messages[0]["content"]
    episode = re.search(r"^Episode (\S+):", system, re.M).group(1)
    rnd = int(re.search(r"Round (\d+) of (\d+)", system).group(1))
    return episode, rnd, re.findall(r'^- if .*: next_episode is "([^"]+)"', system, re.M)


def answer(next_episode: str, narrative: str = "n") -> str:
    return "```json\n" + json.dumps({"plot_list": [{"narrative": narrative}], "next_episode": next_episode}) + "\n```"


class Scripted:
    """A fake model: `decide(episode, round, triggers)` -> the answer text; records every call."""

    def __init__(self, decide: Callable[[str, int, list[str]], str]) -> None:
        self.decide = decide
        self.calls: list[list[list[dict[str, str]]]] = []

    def __call__(self, prompts: list[list[dict[str, str]]]) -> list[str]:
        self.calls.append(prompts)
        return [self.decide(*turn(p)) for p in prompts]


def advance_at(rnd_to_move: int, where: Callable[[list[str]], str] = lambda tr: tr[0]) -> Scripted:
    return Scripted(lambda ep, rnd, tr: answer(where(tr) if rnd >= rnd_to_move else ep))


def run(stories: list[Story], model: Scripted, budget: int = T) -> dict[str, float]:
    outcomes = simulate_episodes(stories, model, budget, SEED)
    assert len(outcomes) == n_episodes(stories)
    m = timing_metrics(outcomes)
    assert sum(m[f"A/timing_{b}"] for b in TIMING_BUCKETS) == pytest.approx(1.0)
    assert m["A/timing_episodes"] == n_episodes(stories)
    return m


def test_advancing_at_round_one_is_too_fast(stories):
    model = advance_at(1)
    m = run(stories, model)
    assert m["A/timing_too_fast"] == 1.0 and m["A/timing_first_advance_over_T"] == pytest.approx(1 / T)
    assert len(model.calls) == 1 and m["A/timing_answers"] == n_episodes(stories)


def test_advancing_at_round_t_is_on_time(stories):
    m = run(stories, advance_at(T))
    assert m["A/timing_on_time"] == 1.0 and m["A/timing_first_advance_over_T"] == 1.0
    assert m["A/timing_wrong_target"] == 0.0 and m["A/timing_parse_failures"] == 0


def test_advancing_at_1_2_t_is_too_slow(stories):
    m = run(stories, advance_at(int(1.2 * T)))
    assert m["A/timing_too_slow"] == 1.0 and m["A/timing_first_advance_over_T"] == pytest.approx(1.2)


def test_never_advancing_is_failure_after_floor_1_5_t_rounds(stories):
    model = Scripted(lambda ep, rnd, tr: answer(ep))
    m = run(stories, model)
    assert m["A/timing_failure"] == 1.0 and math.isnan(m["A/timing_first_advance_over_T"])
    assert len(model.calls) == max_rounds(T) == 15
    assert m["A/timing_answers"] == 15 * n_episodes(stories)


def test_moving_to_an_episode_that_is_no_trigger_target_is_a_wrong_target_failure(stories):
    m = run(stories, advance_at(T, where=lambda tr: "99"))
    assert m["A/timing_failure"] == 1.0 and m["A/timing_wrong_target"] == 1.0
    assert m["A/timing_first_advance_over_T"] == 1.0      # it did leave, at round T
    # Leaving before round T for a real trigger target is a valid (too fast) move, not a wrong one.
    m = run(stories, advance_at(2, where=lambda tr: tr[-1]))
    assert m["A/timing_too_fast"] == 1.0 and m["A/timing_wrong_target"] == 0.0


def test_garbage_never_advances_and_every_answer_is_a_parse_failure(stories):
    model = Scripted(lambda ep, rnd, tr: "I refuse to write JSON. next_episode: 2")
    m = run(stories, model)
    assert m["A/timing_failure"] == 1.0 and m["A/timing_wrong_target"] == 0.0
    assert m["A/timing_parse_failures"] == m["A/timing_answers"] == 15 * n_episodes(stories)
    # A schema-invalid answer (no plot_list) names no next_episode either.
    m = run(stories, Scripted(lambda ep, rnd, tr: '```json\n{"next_episode": "' + tr[0] + '"}\n```'))
    assert m["A/timing_failure"] == 1.0 and m["A/timing_parse_failures"] == m["A/timing_answers"]


def test_the_models_own_answer_is_the_next_prompts_history(stories):
    def decide(ep: str, rnd: int, tr: list[str]) -> str:
        return f"<think>secret plan {rnd}</think>" + answer(ep, narrative=f"my own words, round {rnd}, episode {ep}")

    model = Scripted(decide)
    simulate_episodes(stories, model, 4, SEED)
    assert len(model.calls) == max_rounds(4)
    for rnd, (before, after) in enumerate(zip(model.calls, model.calls[1:]), start=1):
        assert len(before) == len(after)           # nobody left: same rollouts, same order
        for prompt, nxt in zip(before, after):
            ep = turn(prompt)[0]
            assert [m["role"] for m in nxt] == ["system", "user", "assistant", "user"]
            assert nxt[1]["content"] == prompt[-1]["content"]          # the user's previous input
            said = nxt[2]["content"]                                   # the model's previous answer
            assert said == strip_think(decide(ep, rnd, [])) and "secret" not in said
            assert f"round {rnd}, episode {ep}" in said
            assert turn(nxt)[:2] == (ep, rnd + 1)
    # Round 1: a story's first episode starts with no history; a later one opens on the previous
    # episode's closing exchange (the data's trigger action and reference answer into this episode).
    first_of_story = [pos == 0 for s in stories for pos in range(len(story_path(s, SEED)))]
    assert len(model.calls[0]) == len(first_of_story)
    for prompt, first in zip(model.calls[0], first_of_story):
        assert len(prompt) == (2 if first else 4)
        if not first:
            assert '"next_episode": "' + turn(prompt)[0] + '"' in prompt[2]["content"]


def test_one_call_per_round_with_every_running_rollout(stories):
    # Episode "1" advances on time, every other episode never advances.
    model = Scripted(lambda ep, rnd, tr: answer(tr[0] if ep == "1" and rnd >= T else ep))
    outcomes = simulate_episodes(stories, model, T, SEED)
    firsts = sum(o.episode_id == "1" for o in outcomes)
    total = n_episodes(stories)
    assert [len(c) for c in model.calls] == [total] * T + [total - firsts] * (max_rounds(T) - T)
    m = timing_metrics(outcomes)
    assert m["A/timing_on_time"] == pytest.approx(firsts / total)
    assert m["A/timing_failure"] == pytest.approx(1 - firsts / total)


def test_the_user_meets_the_trigger_from_round_t_on(stories):
    model = Scripted(lambda ep, rnd, tr: answer(ep))
    simulate_episodes(stories[:1], model, 3, SEED)
    story = stories[0]
    path = story_path(story, SEED)
    for rnd, batch in enumerate(model.calls, start=1):
        for prompt, (pos, ep) in zip(batch, enumerate(path)):
            target = path[pos + 1] if pos + 1 < len(path) else "-1"
            trigger_action = story.trigger_actions[(ep, target)][0]
            assert f"Round {rnd} of 3." in prompt[0]["content"]
            assert (trigger_action in prompt[-1]["content"]) == (rnd >= 3), (rnd, ep)
    # The same seed gives the same user; another seed another one.
    again = Scripted(lambda ep, rnd, tr: answer(ep))
    simulate_episodes(stories[:1], again, 3, SEED)
    assert again.calls == model.calls
    other = Scripted(lambda ep, rnd, tr: answer(ep))
    simulate_episodes(stories[:1], other, 3, SEED + 1)
    assert other.calls != model.calls


def test_bucket_edges_are_the_cards():
    assert timing_bucket(None, 10) == "failure"
    assert [timing_bucket(r, 10) for r in (7, 8, 10, 11, 15, 16)] == \
        ["too_fast", "on_time", "on_time", "too_slow", "too_slow", "failure"]
    assert timing_bucket(4, 5) == "on_time" and timing_bucket(3, 5) == "too_fast"    # 0.8·T exactly
    assert timing_bucket(3, 2) == "too_slow" and timing_bucket(2, 3) == "too_fast"   # 1.5·T exactly; 0.67
    assert max_rounds(10) == 15 and max_rounds(3) == 4 and max_rounds(1) == 1


@pytest.mark.parametrize("budget, rnd, bucket", [(5, 4, "on_time"), (10, 8, "on_time"), (2, 3, "too_slow"),
                                                 (10, 15, "too_slow"), (10, 7, "too_fast")])
def test_bucket_edges_through_the_simulator(stories, budget, rnd, bucket):
    m = run(stories[:1], advance_at(rnd), budget)
    assert m[f"A/timing_{bucket}"] == 1.0


def test_skipped_prompts_are_counted_not_timed(stories):
    def model(prompts):
        return [None if turn(p)[0] == "1" else answer(turn(p)[2][0]) for p in prompts]

    outcomes = simulate_episodes(stories, model, T, SEED)
    m = timing_metrics(outcomes)
    assert m["A/timing_skipped_episodes"] == len(stories)
    assert m["A/timing_episodes"] == n_episodes(stories) - len(stories) and m["A/timing_too_fast"] == 1.0
    assert math.isnan(timing_metrics([])["A/timing_on_time"])


def test_graphs_json_rebuilds_the_stories_and_missing_graphs_fail_clearly(tmp_path):
    paths = write_dataset(tmp_path / "d", 3, seed=7, fmt="jsonl")
    made = generate(3, seed=7)[0]
    ids = [s.setting["story_id"] for s in made]
    assert load_stories(paths["graphs"], ids[::-1]) == made[::-1]
    with pytest.raises(GraphsError, match=r"nowhere\.json does not exist.*--no-timing"):
        load_stories(tmp_path / "nowhere.json", ids)
    with pytest.raises(GraphsError, match=r"no graph for stories \['zz'\].*--timing-graphs"):
        load_stories(paths["graphs"], ["zz"])
    old = json.loads(paths["graphs"].read_text(encoding="utf-8"))   # as written before trigger actions were
    for s in old["stories"]:
        del s["trigger_actions"], s["slots"]
    (tmp_path / "old.json").write_text(json.dumps(old), encoding="utf-8")
    with pytest.raises(GraphsError, match=r"old\.json lacks 'trigger_actions'.*rlsys data synth.*--no-timing"):
        load_stories(tmp_path / "old.json", ids)
    (tmp_path / "bad.json").write_text("{", encoding="utf-8")
    with pytest.raises(GraphsError, match=r"bad\.json is not a graphs\.json"):
        load_stories(tmp_path / "bad.json", ids)


def test_generate_must_answer_every_prompt(stories):
    with pytest.raises(ValueError, match="answers for"):
        simulate_episodes(stories, lambda prompts: [], T, SEED)
