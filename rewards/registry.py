"""The reward-channel registry: the built-in channels and the user's functions, built the same way.

A recipe is a configuration that lists channels with weights (``reward.weights``); nothing
branches on a recipe name. Each entry builds a ``rewards.channels.Channel`` from the reward
configuration (its options) and the process's heavy resources (an embedding model, a judge),
which only the channels that use them ask for.

Recipe A (EpisodeBench): ``fmt``, ``acc`` (needs the row's ``reference_next_episode``), ``len``,
``div`` (per group: DPP diversity of the group's embeddings).
Recipe B (POLARIS): ``sq`` (LLM judge, needs ``messages``), ``rep``, ``len_pen`` (target from
``target_word_count`` or the prompt's "N words long"), ``blank``.
Recipe C (QwenStoryteller2, text-only): ``st_struct``, ``st_reid`` (needs ``synthetic``),
``st_ground`` (rewards/storyteller.py), and ``st_progress``, our shaping channel for a base
model that never saw the format.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from rewards.channels import Channel, Masked, Per
from rewards.diversity import Encoder, dpp_diversity
from rewards.episodebench import ParsedResponse, accuracy_reward, format_reward, length_reward, parse_response
from rewards.polaris import blank_penalty, length_penalty, requested_word_count, self_repetition
from rewards.storyteller import st_ground, st_progress, st_reid, st_struct


class Resources(Protocol):
    """Heavy state a process builds once, on demand (actors/reward.py provides it)."""

    def encoder(self) -> Encoder: ...

    def judge(self) -> Any:
        """An object with ``score_items([{"prompt", "story"}]) -> [{"score", "masked", "reason"}]``
        (rlsys.judge.JudgeScorer)."""


@dataclass(frozen=True)
class Builtin:
    name: str
    per: Per
    doc: str
    build: Callable[[Any, Resources], Channel]
    """(reward options: rlsys.config.RewardConfig, resources) -> the channel."""
    requires: tuple[str, ...] = ()
    """Example fields (data columns) it reads; a dataset without them fails before Ray starts."""


BUILTIN_CHANNELS: dict[str, Builtin] = {}


def _register(name: str, per: Per, doc: str, requires: tuple[str, ...] = ()):
    def deco(build: Callable[[Any, Resources], Channel]) -> Callable[[Any, Resources], Channel]:
        BUILTIN_CHANNELS[name] = Builtin(name, per, doc, build, requires)
        return build
    return deco


# ---------------------------------------------------------------- recipe A (EpisodeBench)

@functools.lru_cache(maxsize=256)
def _parsed_str(text: str) -> ParsedResponse:
    return parse_response(text)


def _parsed(text: Any) -> ParsedResponse:
    """fmt, acc and len read the same parse of a response: parse it once."""
    return _parsed_str(text) if isinstance(text, str) else parse_response(text)


def fmt_reward(text: Any, *, strict: bool = False) -> float:
    return format_reward(_parsed(text), strict)


def acc_reward(text: Any, reference_next_episode: Any, *, strict: bool = False) -> float:
    return accuracy_reward(_parsed(text), reference_next_episode, strict=strict)


def len_reward(text: Any, *, l_min: int, l_max: int, sigma: float, strict: bool = False) -> float:
    return length_reward(_parsed(text), l_min, l_max, sigma, strict=strict)


def div_reward(texts: list[Any], *, encoder: Encoder, eta: float) -> list[float]:
    return dpp_diversity(list(texts), encoder, eta)


@_register("fmt", "sample", "R_fmt: fenced JSON, parsed dict, valid schema (0.15/0.25/0.6)")
def _fmt(opts: Any, res: Resources) -> Channel:
    return Channel("fmt", fmt_reward, kwargs={"strict": opts.strict_format}, timeout_s=None, inline=True)


@_register("acc", "sample", "R_acc: next_episode equals the row's reference_next_episode",
           requires=("reference_next_episode",))
def _acc(opts: Any, res: Resources) -> Channel:
    return Channel("acc", acc_reward, kwargs={"strict": opts.strict_format}, timeout_s=None, inline=True)


@_register("len", "sample", "R_len: narrative length inside [l_min, l_max], Gaussian decay outside")
def _len(opts: Any, res: Resources) -> Channel:
    ln = opts.length
    return Channel("len", len_reward, kwargs={"l_min": ln.l_min, "l_max": ln.l_max, "sigma": ln.sigma,
                                              "strict": opts.strict_format}, timeout_s=None, inline=True)


@_register("div", "group", "R_div: DPP diversity of the group's sentence embeddings")
def _div(opts: Any, res: Resources) -> Channel:
    return Channel("div", div_reward, per="group", kwargs={"encoder": res.encoder(), "eta": opts.diversity.eta},
                   timeout_s=None, inline=True)


# ---------------------------------------------------------------- recipe B (POLARIS)

def len_pen_penalty(text: Any, messages: Any = None, target_word_count: Any = None) -> float:
    return length_penalty(text, requested_word_count(messages, target_word_count))


def judge_story_quality(batch: list[tuple[list[Any], dict[str, Any]]], *, judge: Any) -> list[list[Any]]:
    """SQ (overall/100) of every story of every group, in one judge call so its workers see the
    whole backlog. A story the judge could not score is Masked with the judge's reason."""
    items = [{"prompt": fields.get("messages"), "story": t} for texts, fields in batch for t in texts]
    verdicts = judge.score_items(items)
    out, pos = [], 0
    for texts, _ in batch:
        out.append([Masked(v["reason"]) if v["masked"] else v["score"] for v in verdicts[pos:pos + len(texts)]])
        pos += len(texts)
    return out


def _rule(name: str, fn: Callable[..., float], doc: str, requires: tuple[str, ...] = ()) -> None:
    """Register a per-sample built-in without options: cheap and trusted, so called inline on
    the scoring loop, with no deadline."""
    _register(name, "sample", doc, requires)(lambda opts, res: Channel(name, fn, timeout_s=None, inline=True))


_rule("rep", self_repetition, "self-repetition of the story (n-grams, worst window, repeated lines), in [0, 1.5]")
_rule("len_pen", len_pen_penalty, "distance outside the requested length band, in [0, 1]")
_rule("blank", blank_penalty, "1 for a (nearly) blank story, else 0")


@_register("sq", "batch", "LLM-judge story quality (overall/100); needs reward.judge", requires=("messages",))
def _sq(opts: Any, res: Resources) -> Channel:
    judge = res.judge()
    # The judge has its own deadlines, retries and masking per request (rlsys.judge); the whole
    # batch runs on one thread so the sync JudgeScorer is never entered twice at once.
    return Channel("sq", functools.partial(judge_story_quality, judge=judge), per="batch", timeout_s=None,
                   concurrency=1)



# ---------------------------------------------------------------- recipe C (QwenStoryteller2, text-only)

_rule("st_struct", st_struct, "1 when the <think> tables and grounding tags parse (gates st_reid, st_ground)")
_rule("st_reid", st_reid, "cross-frame entity links: +share on real sequences, -share on synthetic ones",
      requires=("synthetic",))
_rule("st_ground", st_ground, "share of pronouns and names grounded in <gdo> tags")
_rule("st_progress", st_progress, "ours: share of 4 format markers present (shaping for a base model)")


# ---------------------------------------------------------------- the user's functions

def user_channel(name: str, fn: Callable[..., Any], *, per: Per = "sample", kwargs: dict[str, Any] | None = None,
                 timeout_s: float | None = 60.0, concurrency: int = 8) -> Channel:
    """A channel from a user's function (rewards.functions.load_reward_function loads it)."""
    return Channel(name, fn, per=per, kwargs=dict(kwargs or {}), timeout_s=timeout_s, concurrency=concurrency)


def build_channels(opts: Any, names: list[str], res: Resources) -> list[Channel]:
    """The channels `names` (in that order) for reward options `opts` (rlsys.config.RewardConfig):
    built-ins from the registry, the rest from `opts.functions`."""
    from rewards.functions import load_reward_function

    out = []
    for name in names:
        if name in BUILTIN_CHANNELS:
            out.append(BUILTIN_CHANNELS[name].build(opts, res))
            continue
        spec = opts.functions[name]
        out.append(user_channel(name, load_reward_function(spec.function), per=spec.per, kwargs=spec.kwargs,
                                timeout_s=spec.timeout_s, concurrency=spec.concurrency))
    return out


def missing_fields(opts: Any, names: list[str], fields: list[str]) -> dict[str, list[str]]:
    """{channel: [required example fields absent from `fields`]} for the channels `names`,
    without building any channel (no model is loaded, no judge contacted)."""
    from rewards.functions import load_reward_function

    out = {}
    for name in names:
        if name in BUILTIN_CHANNELS:
            lacking = sorted(set(BUILTIN_CHANNELS[name].requires) - set(fields))
        else:
            spec = opts.functions[name]
            ch = user_channel(name, load_reward_function(spec.function), per=spec.per, kwargs=spec.kwargs)
            lacking = ch.missing_fields(fields)
        if lacking:
            out[name] = lacking
    return out
