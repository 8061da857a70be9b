"""Word lists for the synthetic episode graphs (English and Chinese genre packs).

Kept apart from the generator so the logic in ``synth_graph`` / ``synth`` stays readable.
A ``deed`` is (first-person form, third-person form) of a verb applied to an object; a
trigger condition is "<hero> <deed> the <object>", unique within a story.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Genre:
    """Everything the generator draws from for one kind of story."""

    language: str
    titles: tuple[str, ...]       # formatted with {place}, {object}
    style: tuple[str, ...]
    names: tuple[str, ...]
    roles: tuple[str, ...]
    places: tuple[str, ...]
    objects: tuple[str, ...]
    deeds: tuple[tuple[str, str], ...]
    threats: tuple[str, ...]


EN_GENRES: tuple[Genre, ...] = (
    Genre(
        "en", ("The Secret of the {object}", "Shadows over {place}", "The Road to {place}"),
        ("adventure", "fantasy", "hopeful", "mysterious", "heroic"),
        ("Mara", "Ilo", "Bran", "Tessa", "Odo", "Lena", "Rook", "Fen"),
        ("a young smuggler", "an old map-maker", "a loyal knight", "a clever thief",
         "a wandering healer", "a stern captain"),
        ("the misty docks", "the ruined tower", "the silver forest", "the old library",
         "the frozen pass", "the night market", "the sunken temple", "the king's hall"),
        ("iron gate", "cursed lantern", "stone key", "hidden map", "broken sword",
         "sealed letter", "silver bell", "red crystal"),
        (("open", "opens"), ("find", "finds"), ("destroy", "destroys"), ("steal", "steals"),
         ("repair", "repairs"), ("hide", "hides")),
        ("the shadow hounds", "the tyrant's soldiers", "a rising storm", "the hungry fog"),
    ),
    Genre(
        "en", ("Signal from {place}", "The Last {object}", "Orbit of {place}"),
        ("science fiction", "tense", "curious", "lonely", "bright"),
        ("Vega", "Kai", "Juno", "Rex", "Nova", "Ash", "Pim", "Sol"),
        ("a ship engineer", "a rogue android", "a tired pilot", "a young cadet",
         "a station doctor", "a cargo trader"),
        ("the cargo bay", "the red moon base", "the dead station", "the engine room",
         "the ice comet", "the bridge", "the alien garden", "the docking ring"),
        ("power core", "star chart", "escape pod", "data chip", "alien seed",
         "radio beacon", "oxygen valve", "door code"),
        (("repair", "repairs"), ("find", "finds"), ("launch", "launches"), ("hack", "hacks"),
         ("seal", "seals"), ("decode", "decodes")),
        ("a hull breach", "the pirate drones", "a solar storm", "the silent virus"),
    ),
    Genre(
        "en", ("Murder at {place}", "The {object} Affair", "Rain over {place}"),
        ("mystery", "noir", "suspenseful", "witty", "dark"),
        ("Iris", "Hale", "Dora", "Finch", "Moss", "Clay", "Nell", "Quinn"),
        ("a sharp detective", "a nervous butler", "a rich widow", "a young reporter",
         "a retired inspector", "a jazz singer"),
        ("the grand hotel", "the rainy pier", "the locked study", "the old theatre",
         "the train station", "the quiet garden", "the jazz club", "the city archive"),
        ("torn photo", "gold watch", "poison bottle", "diary page", "train ticket",
         "bloody glove", "safe code", "wedding ring"),
        (("find", "finds"), ("examine", "examines"), ("hide", "hides"), ("burn", "burns"),
         ("decode", "decodes"), ("return", "returns")),
        ("the hidden killer", "a corrupt officer", "a blackmailer", "the midnight thief"),
    ),
)

# Chinese packs: a deed has one form ("打开"); conditions read "<hero>打开了<object>".
ZH_GENRES: tuple[Genre, ...] = (
    Genre(
        "zh", ("{place}风云", "{object}之谜", "夜行{place}"),
        ("武侠", "热血", "悬疑", "江湖"),
        ("林月", "陈风", "苏青", "赵岳", "白霜", "李墨"),
        ("年轻剑客", "神秘医女", "老镖头", "落魄书生", "江湖大盗"),
        ("雪山古寺", "长安酒楼", "竹林小径", "江南渡口", "荒漠客栈", "皇城地牢"),
        ("玉佩", "密信", "铁剑", "药方", "令牌", "古琴", "地图", "铜镜"),
        (("打开", "打开"), ("找到", "找到"), ("毁掉", "毁掉"), ("藏起", "藏起"), ("交出", "交出")),
        ("黑衣刺客", "朝廷鹰犬", "风雪", "毒雾"),
    ),
)
