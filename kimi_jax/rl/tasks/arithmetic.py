"""Integer arithmetic: "17+4*3=" -> "29". Difficulty d: d + 1 operands below 10^min(d, 3); "*" from d = 2 on."""

from __future__ import annotations

import random
import re

from kimi_jax.rl.tasks import expression
from kimi_jax.rl.tasks.base import Problem, Reward, exact

FAMILY = "arithmetic"
DIFFICULTIES = (1, 2, 3, 4)


def make(rng: random.Random, difficulty: int) -> Problem:
    high = 10 ** min(difficulty, 3) - 1
    ops = "+-*" if difficulty >= 2 else "+-"
    text = str(rng.randint(0, high))
    for _ in range(difficulty):
        text += rng.choice(ops) + str(rng.randint(0, high))
    value = expression.evaluate(expression.parse(text))
    return Problem(FAMILY, difficulty, prompt=f"{text}=", answer=str(int(value)), key=text)


def verify(problem: Problem, response: str) -> Reward:
    """1.0 iff the response's last line is the integer value (an optional leading "-", digits only)."""
    return exact(response, problem.answer, parse=_integer)


def _integer(text: str) -> int:
    if re.fullmatch(r"-?[0-9]+", text) is None:
        raise ValueError(text)
    return int(text)
