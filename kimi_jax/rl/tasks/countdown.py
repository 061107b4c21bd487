"""Countdown: reach a target with given numbers, + - * / and parentheses, each given number used at most once.

Prompt "Use 3 7 25 50 to make 68:", a correct response's last line e.g. "50+25-7". Difficulty d: d + 2 numbers from
1..(5, 10, 25, 100)[d - 1]; every problem is solvable (the target is the value of a random expression over a
subset of the numbers, a positive integer up to 1000). The verifier parses the line with kimi_jax.rl.tasks.expression
(never `eval`), checks the multiset of numbers it uses against the given one, and the exact value.
"""

from __future__ import annotations

import collections
import random

from kimi_jax.rl.tasks import expression
from kimi_jax.rl.tasks.base import Problem, Reward, last_line

FAMILY = "countdown"
DIFFICULTIES = (1, 2, 3, 4)
MAX_TARGET = 1000
_HIGHEST = (5, 10, 25, 100)


def make(rng: random.Random, difficulty: int) -> Problem:
    numbers = sorted(rng.randint(1, _HIGHEST[difficulty - 1]) for _ in range(difficulty + 2))
    while True:
        chosen = rng.sample(numbers, rng.randint(2, len(numbers)))
        text = str(chosen[0])
        for number in chosen[1:]:
            op = rng.choice("+-*/")
            left = f"({text})" if op in "*/" and ("+" in text or "-" in text) else text
            text = f"{left}{op}{number}"
        value = expression.evaluate(expression.parse(text))
        if value.denominator == 1 and 0 < value <= MAX_TARGET:
            break
    target = int(value)
    listed = " ".join(map(str, numbers))
    return Problem(FAMILY, difficulty, prompt=f"Use {listed} to make {target}:", answer=text,
                   key=f"{listed}->{target}", spec={"numbers": tuple(numbers), "target": target})


def verify(problem: Problem, response: str) -> Reward:
    line = last_line(response)
    try:
        tree = expression.parse(line)
        value = expression.evaluate(tree)
    except expression.ExpressionError as e:
        return Reward(0.0, f"not an expression ({e}): {line[:50]!r}")
    overused = collections.Counter(expression.numbers(tree)) - collections.Counter(problem.spec["numbers"])
    if overused:
        return Reward(0.0, f"uses numbers not given or more often than given: {sorted(overused.elements())}")
    if value != problem.spec["target"]:
        return Reward(0.0, f"{line[:50]} = {value}, not {problem.spec['target']}")
    return Reward(1.0, "correct")
