"""String transformations: "reverse then upper: abcde" -> "EDCBA".

Difficulty d: a mixed-case word of 2 + 2 d letters and 1 (d <= 2), 2 (d = 3) or 3 (d = 4) chained operations."""

from __future__ import annotations

import random
import string

from kimi_jax.rl.tasks.base import Problem, Reward, exact

FAMILY = "strings"
DIFFICULTIES = (1, 2, 3, 4)
OPERATIONS = {
    "reverse": lambda s: s[::-1],
    "sort": lambda s: "".join(sorted(s)),
    "upper": str.upper,
    "lower": str.lower,
    "swapcase": str.swapcase,
    "dedupe": lambda s: "".join(dict.fromkeys(s)),     # drop repeated characters, keep the first of each
}


def make(rng: random.Random, difficulty: int) -> Problem:
    word = "".join(rng.choice(string.ascii_letters[:8] + string.ascii_uppercase[:8])
                   for _ in range(2 + 2 * difficulty))
    names = rng.sample(sorted(OPERATIONS), max(1, difficulty - 1))
    result = word
    for name in names:
        result = OPERATIONS[name](result)
    prompt = f"{' then '.join(names)}: {word}"
    return Problem(FAMILY, difficulty, prompt=prompt, answer=result, key=prompt)


def verify(problem: Problem, response: str) -> Reward:
    """1.0 iff the last line equals the transformed string exactly (case included)."""
    return exact(response, problem.answer)
