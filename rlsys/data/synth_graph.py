"""Synthetic episode graphs G = (E, T, B) in the EpisodeBench layout.

A story is a small DAG of 4–6 episodes with ids "1".."n". Episode i always has a trigger
to i+1 and sometimes a second one to i+2, so every episode is reachable and some turns
have to pick between two successors; the last episode's trigger leads to "-1" (the end
of the story, as in the published data). Every trigger condition is a distinct
"<hero> <deed> the <object>", so exactly one trigger matches a satisfying user action.

All randomness comes from the ``random.Random`` passed in, so a seed fixes the graph.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from rlsys.data.synth_text import TEXT
from rlsys.data.synth_vocab import Genre

END = "-1"
MIN_EPISODES, MAX_EPISODES = 4, 6
BRANCH_PROB = 0.4


@dataclass
class Story:
    """A generated story: the published graph fields plus what the turn generator needs."""

    setting: dict[str, Any]
    episodes: dict[str, dict[str, Any]]
    # (episode id, next episode id) -> (user's first-person action, narrator's sentence)
    # that satisfy that trigger. Not part of the published graph schema.
    trigger_actions: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)
    # episode id -> template slots (hero, ally, place, object, threat) for turn texts.
    slots: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def language(self) -> str:
        return str(self.setting["language"])

    def to_json(self) -> dict[str, Any]:
        """The graph as written to graphs.json: settings and the episode list (the published
        layout), plus (*ours*, extra keys a reader of the published layout ignores) the trigger
        actions and template slots, so ``from_json`` rebuilds the whole Story: rlsys eval's
        episode simulator plays the user from them."""
        return {"setting": self.setting, "episodes": list(self.episodes.values()),
                "trigger_actions": [{"episode_id": eid, "next_episode": nxt, "action": action, "narration": narration}
                                    for (eid, nxt), (action, narration) in self.trigger_actions.items()],
                "slots": self.slots}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Story":
        """The Story ``to_json`` wrote. KeyError names the first missing key: graphs.json files
        written before trigger actions and slots were stored lack them."""
        return cls(setting=data["setting"], episodes={str(ep["episode_id"]): ep for ep in data["episodes"]},
                   trigger_actions={(str(a["episode_id"]), str(a["next_episode"])): (a["action"], a["narration"])
                                    for a in data["trigger_actions"]},
                   slots=data["slots"])


def _title(text: str, language: str) -> str:
    if language != "en":
        return text
    return text.removeprefix("the ").title()


def _all_paths(episodes: dict[str, dict[str, Any]], start: str = "1") -> list[list[str]]:
    """Every episode sequence from ``start`` to the end of the story (the graph is a DAG)."""
    paths: list[list[str]] = []

    def walk(eid: str, prefix: list[str]) -> None:
        for trigger in episodes[eid]["triggers"]:
            nxt = trigger["next_episode"]
            if nxt == END:
                paths.append(prefix + [eid])
            else:
                walk(nxt, prefix + [eid])

    walk(start, [])
    return paths


def _condition_pairs(rng: random.Random, genre: Genre, k: int) -> list[tuple[tuple[str, str], str]]:
    """``k`` distinct (deed, object) pairs; objects repeat only once all have been used,
    so early conditions (and the history sentences built from them) read as different."""
    objects = rng.sample(genre.objects, len(genre.objects))
    used: set[tuple[tuple[str, str], str]] = set()
    pairs = []
    for j in range(k):
        obj = objects[j % len(objects)]
        deed = rng.choice([d for d in genre.deeds if (d, obj) not in used])
        used.add((deed, obj))
        pairs.append((deed, obj))
    return pairs


def make_story(rng: random.Random, story_id: str, genre: Genre) -> Story:
    """Draw one story graph from ``genre`` using ``rng``."""
    t = TEXT[genre.language]
    n = rng.randint(MIN_EPISODES, MAX_EPISODES)
    names = rng.sample(genre.names, 4)
    hero, allies = names[0], names[1:]
    characters = dict(zip(names, rng.sample(genre.roles, 4)))
    places = rng.sample(genre.places, min(len(genre.places), n + 1))
    threat = rng.choice(genre.threats)
    pairs = _condition_pairs(rng, genre, 2 * n)  # at most two triggers per episode
    unused = iter(pairs)
    slots = {"hero": hero, "hero_role": characters[hero], "threat": threat,
             "place": places[0], "object": pairs[0][1]}
    setting: dict[str, Any] = {
        "story_id": story_id,
        "name": rng.choice(genre.titles).format(place=_title(places[-1], genre.language),
                                                object=_title(pairs[0][1], genre.language)),
        "style": rng.sample(genre.style, 3),
        "description": str(t["description"]).format(**slots),
        "characters": characters,
        "leading_role": hero,
        "goal": str(t["story_goal"]).format(**slots),
        "language": genre.language,
    }
    story = Story(setting, {})
    for i in range(1, n + 1):
        eid = str(i)
        targets = [END] if i == n else [str(i + 1)]
        if i + 2 <= n and rng.random() < BRANCH_PROB:
            targets.append(str(i + 2))
        ally = allies[(i - 1) % len(allies)]
        conditions = [next(unused) for _ in targets]
        # The episode's goal names the object of its main trigger.
        ep_slots = dict(slots, ally=ally, place=places[(i - 1) % len(places)],
                        object=conditions[0][1])
        story.slots[eid] = {k: ep_slots[k] for k in ("hero", "ally", "place", "object", "threat")}
        triggers = []
        for target, ((deed1, deed3), obj) in zip(targets, conditions):
            s = dict(ep_slots, deed1=deed1, deed3=deed3, object=obj)
            triggers.append({"condition": str(t["condition"]).format(**s), "next_episode": target})
            first, third = t["final_action"]  # type: ignore[misc]
            story.trigger_actions[(eid, target)] = (first.format(**s), third.format(**s))
        story.episodes[eid] = {
            "episode_id": eid,
            "description": str(t["episode_desc"]).format(**ep_slots),
            "goal": str(t["episode_goal"]).format(**ep_slots),
            "scene": str(t["scene"]).format(**ep_slots, time=rng.choice(t["times"])),  # type: ignore[arg-type]
            "characters": [hero, ally],
            "predecessors": [],
            "triggers": triggers,
        }
    for eid, ep in story.episodes.items():
        for trigger in ep["triggers"]:
            if trigger["next_episode"] != END:
                story.episodes[trigger["next_episode"]]["predecessors"].append(eid)
    setting["paths"] = _all_paths(story.episodes)
    return story
