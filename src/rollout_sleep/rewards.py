"""Verifiable reward functions: plain callables ``fn(completion: str, example: dict) -> float``.

Select them by name in a config (``rewards: [arithmetic_exact, digits_format]``); add your own with
:func:`register`.

>>> arithmetic_exact(" 42", {"answer": "42"})
1.0
>>> arithmetic_exact("41", {"answer": "42"})
0.0
>>> digits_format("12a4", {})
0.75
>>> round(length_target("x" * 8, {}, target=4), 2)
0.0
"""

from __future__ import annotations

import re
from typing import Callable

RewardFn = Callable[..., float]
REWARDS: dict[str, RewardFn] = {}


def register(fn: RewardFn) -> RewardFn:
    """Make a reward selectable by its function name."""
    REWARDS[fn.__name__] = fn
    return fn


@register
def arithmetic_exact(completion: str, example: dict) -> float:
    """1.0 when the first integer in the completion equals ``example["answer"]``."""
    m = re.search(r"-?\d+", completion)
    return float(m is not None and m.group(0) == str(example["answer"]).strip())


@register
def digits_format(completion: str, example: dict) -> float:
    """Share of the completion's non-space characters that are digits (a dense format reward)."""
    chars = [c for c in completion if not c.isspace()]
    return sum(c.isdigit() for c in chars) / len(chars) if chars else 0.0


@register
def length_target(completion: str, example: dict, target: int = 8) -> float:
    """1.0 at ``target`` characters, falling linearly to 0 at 0 or 2×target characters."""
    return max(0.0, 1.0 - abs(len(completion) - target) / target)


def get_reward(name: str) -> RewardFn:
    if name not in REWARDS:
        raise KeyError(f"unknown reward {name!r}; known: {sorted(REWARDS)}")
    return REWARDS[name]


def score(names: list[str], completions: list[str], examples: list[dict]) -> list[float]:
    """Sum of the named rewards for each (completion, example) pair."""
    fns = [get_reward(n) for n in names]
    return [sum(fn(c, ex) for fn in fns) for c, ex in zip(completions, examples)]
