"""Name -> function tables for advantage estimators and policy losses."""
from typing import Callable

ADVANTAGE_ESTIMATORS: dict[str, Callable] = {}
POLICY_LOSSES: dict[str, Callable] = {}
PREFERENCE_LOSSES: dict[str, Callable] = {}


def register_advantage(name: str):
    def deco(fn):
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn
    return deco


def register_loss(name: str):
    def deco(fn):
        POLICY_LOSSES[name] = fn
        return fn
    return deco


def register_preference_loss(name: str):
    def deco(fn):
        PREFERENCE_LOSSES[name] = fn
        return fn
    return deco
