"""Multi-turn episode rollouts for recipe A's transition timing (pure: no Ray, vLLM or torch).

The card (RECIPES.md, recipe A; the EpisodeBench model card): with an interaction budget T,
the round at which the model first advances (its answer's next_episode differs from the
current episode), as a share of T, falls in one of four buckets (``rlsys.eval_metrics.
timing_bucket``). Single prompts from the data cannot measure that: the round at which a
model leaves depends on what it answered before, so each episode is played as a rollout in
which the model's own answers feed the next prompt.

How an episode is played (choices marked *ours*; the card gives only the budget and buckets):

* Stories come from graphs.json (``Story.from_json``); per story one path of episodes is
  walked, chosen by an RNG seeded with the run seed and the story id. Every episode on the path
  is one independent rollout, so a model that fails one episode is still timed on the next:
  its "Story so far" holds the trigger sentences of the path's earlier episodes and, past the
  first episode, its chat history starts with the previous episode's closing exchange as the
  data generator writes it (the user's trigger action and the reference answer moving into
  this episode), as in the training rows.
* The user is rule-based (*ours*): rounds r = 1 .. floor(1.5·T); before round T the user acts
  without meeting a trigger (a normal, abnormal or "hacking" action drawn as the generator
  draws them); from round T on the user's action satisfies the trigger to the path's next
  episode. So a model that follows the triggers advances at round T exactly (on time), one
  that ignores the user advances when it likes, and one that never moves runs out of rounds.
  Each episode's user draws from its own RNG (run seed, story id, episode id), so what the
  user does in round r does not depend on the model's answers or on the other rollouts.
* Round r's prompt is the data's prompt (``rlsys.data.synth.turn_prompt``, the one
  ``story_rows`` uses): the system prompt carries "round r of T", then the previous exchange
  with the model's own answer (its text after the one think rule, ``rewards.think.strip_think``)
  as chat history, then the user's input.
* A rollout ends at the first round whose answer names a next_episode other than the current
  one (``rewards.episodebench.parse_response``; only a schema-valid answer names one, as for
  R_acc). An answer that does not parse is "did not advance" for that round and is counted.
  A move to an episode that is not one of the current episode's trigger targets is recorded
  as a wrong target (a failure whatever the round). An answer of None (the engine could not
  take the prompt, e.g. too long) ends the rollout as skipped: left out of the shares.
* All rollouts run in lockstep: each round calls ``generate`` once with the prompts of every
  rollout still running, so the engine sees one large batch per round.
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from rewards.episodebench import parse_response
from rewards.think import strip_think
from rlsys.data.synth import exchange, fenced, play_turn, turn_prompt
from rlsys.data.synth_graph import END, Story

log = logging.getLogger(__name__)

__all__ = ["Generate", "EpisodeOutcome", "GraphsError", "default_graphs_path", "load_stories",
           "max_rounds", "simulate_episodes", "story_path"]

Messages = list[dict[str, str]]
# One call per round: the chat prompts of every running rollout -> one answer text per prompt,
# in order (None: the engine could not take that prompt).
Generate = Callable[[list[Messages]], Sequence[str | None]]


class GraphsError(ValueError):
    """The episode graphs that transition timing needs are missing or incomplete."""


@dataclass(frozen=True)
class EpisodeOutcome:
    """How one episode's rollout ended."""

    story_id: str
    episode_id: str
    target: str                  # the path's next episode: the trigger the user meets from round T on
    budget: int                  # T
    advanced_round: int | None   # first round whose answer left the episode; None: never (or skipped)
    moved_to: str | None         # the episode that answer named
    wrong_target: bool           # moved to an episode that is not one of this episode's trigger targets
    answers: int                 # answers the model gave in this rollout
    parse_failures: int          # of those, answers with no schema-valid next_episode
    skipped: bool = False        # the engine could not take a prompt: not timed


def max_rounds(budget: int) -> int:
    """floor(1.5·T): past it every bucket but failure is out of reach, so the rollout stops."""
    return (3 * budget) // 2


@dataclass
class _Rollout:
    """One episode being played: the user's script and what the model has done so far."""

    story: Story
    episode_id: str
    target: str
    budget: int
    history: list[str]           # "Story so far": trigger sentences of the path's earlier episodes
    previous: Messages           # the last exchange, carried into the next prompt
    rng: random.Random
    user_input: str = ""
    answers: int = 0
    parse_failures: int = 0
    advanced_round: int | None = None
    moved_to: str | None = None
    skipped: bool = False
    triggers: set[str] = field(default_factory=set)

    def prompt(self, rnd: int) -> Messages:
        """Round `rnd`'s prompt; the user meets the trigger to the target from round T on."""
        reference = self.target if rnd >= self.budget else self.episode_id
        self.user_input, _ = play_turn(self.story, self.episode_id, reference, self.rng)
        return turn_prompt(self.story, self.episode_id, rnd, self.budget, self.history, self.previous,
                           self.user_input, self.rng)

    def answer(self, rnd: int, text: str | None) -> bool:
        """Take the model's answer to round `rnd`; True while the rollout goes on."""
        if text is None:
            self.skipped = True
            return False
        self.answers += 1
        parsed = parse_response(text)
        if not parsed.schema_valid or parsed.next_episode is None:
            self.parse_failures += 1
        elif parsed.next_episode != self.episode_id:
            self.advanced_round, self.moved_to = rnd, parsed.next_episode
            return False
        self.previous = exchange(self.user_input, strip_think(text))
        return True

    def outcome(self) -> EpisodeOutcome:
        return EpisodeOutcome(
            story_id=str(self.story.setting["story_id"]), episode_id=self.episode_id, target=self.target,
            budget=self.budget, advanced_round=self.advanced_round, moved_to=self.moved_to,
            wrong_target=self.moved_to is not None and self.moved_to not in self.triggers,
            answers=self.answers, parse_failures=self.parse_failures, skipped=self.skipped)


def story_path(story: Story, seed: int) -> list[str]:
    """The path of episodes played through `story`: one of its paths, drawn by the run seed
    and the story id (independent of which other stories are timed)."""
    return list(random.Random(f"{seed}:{story.setting['story_id']}").choice(story.setting["paths"]))


def _story_rollouts(story: Story, budget: int, seed: int) -> list[_Rollout]:
    """One rollout per episode of one seeded path through `story`."""
    story_id = str(story.setting["story_id"])
    path = story_path(story, seed)
    rollouts = []
    for pos, eid in enumerate(path):
        rng = random.Random(f"{seed}:{story_id}:{eid}")
        previous: Messages = []
        if pos > 0:  # the previous episode's closing exchange, as the data writes it
            user_input, reference_answer = play_turn(story, path[pos - 1], eid, rng)
            previous = exchange(user_input, fenced(reference_answer))
        rollouts.append(_Rollout(
            story=story, episode_id=eid, target=path[pos + 1] if pos + 1 < len(path) else END, budget=budget,
            history=[story.trigger_actions[(a, b)][1] for a, b in zip(path[:pos], path[1:pos + 1])],
            previous=previous, rng=rng,
            triggers={str(t["next_episode"]) for t in story.episodes[eid]["triggers"]}))
    return rollouts


def simulate_episodes(stories: Sequence[Story], generate: Generate, budget: int = 10,
                      seed: int = 0) -> list[EpisodeOutcome]:
    """Play every episode of one path per story against `generate` (module docstring), all in
    lockstep: at most floor(1.5·budget) calls, each with every rollout still running."""
    if budget < 1:
        raise ValueError(f"the interaction budget must be >= 1, got {budget}")
    rollouts = [r for story in stories for r in _story_rollouts(story, budget, seed)]
    running = list(rollouts)
    for rnd in range(1, max_rounds(budget) + 1):
        if not running:
            break
        prompts = [r.prompt(rnd) for r in running]
        texts = list(generate(prompts))
        if len(texts) != len(prompts):
            raise ValueError(f"generate returned {len(texts)} answers for {len(prompts)} prompts")
        running = [r for r, text in zip(running, texts) if r.answer(rnd, text)]
        log.info("timing round %d/%d: %d of %d episodes still running", rnd, max_rounds(budget),
                 len(running), len(rollouts))
    return [r.outcome() for r in rollouts]


def default_graphs_path(data_path: str | Path) -> Path:
    """Where `rlsys data synth` writes the graphs of a turn file's stories: next to it."""
    return Path(data_path).expanduser().parent / "graphs.json"


def load_stories(graphs_path: str | Path, story_ids: Sequence[str]) -> list[Story]:
    """The stories `story_ids` (in that order) from a graphs.json written by `rlsys data synth`.

    Raises GraphsError naming the file and the fix when the file is missing, unreadable, from
    before graphs.json stored the trigger actions the simulated user needs, or lacks a story.
    """
    path = Path(graphs_path)
    skip = "or pass --no-timing to skip transition timing"
    if not path.is_file():
        raise GraphsError(f"transition timing needs the episode graphs of the evaluated stories: {path} does not "
                          "exist. `rlsys data synth --out DIR` writes DIR/graphs.json next to the turn files; pass "
                          f"--timing-graphs FILE if yours lives elsewhere, {skip}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        stored = {str(s["setting"]["story_id"]): s for s in data["stories"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise GraphsError(f"{path} is not a graphs.json written by `rlsys data synth` ({exc!r}); {skip}") from exc
    missing = [s for s in story_ids if s not in stored]
    if missing:
        raise GraphsError(f"{path} has no graph for stories {missing[:5]}{' ...' if len(missing) > 5 else ''} of the "
                          f"evaluated data; point --timing-graphs at the graphs.json written with that data, {skip}")
    try:
        return [Story.from_json(stored[s]) for s in story_ids]
    except (KeyError, TypeError, ValueError) as exc:
        raise GraphsError(
            f"{path} lacks {exc} of story graphs: it was written before graphs.json stored the trigger actions and "
            "slots the simulated user needs. Regenerate the data with `rlsys data synth` (the same --stories, --seed "
            f"and --zh-ratio give the same stories and turn rows), {skip}") from exc
