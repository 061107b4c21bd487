"""What every task family shares: the Problem and Reward records, the held-out split, answer extraction.

A family is a module with FAMILY (its name), DIFFICULTIES, `make(rng, difficulty) -> Problem` (one random problem
from a random.Random) and a verifier (`verify(problem, response) -> Reward`, or a batched one for code).
`generate` turns `make` into a seedable generator of distinct problems of one split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from typing import Any, Callable, Mapping

DEFAULT_HELD_OUT_FRACTION = 0.1     # share of each family's problem space reserved for evaluation (our choice)
SPLITS = ("train", "held_out")


@dataclasses.dataclass(frozen=True)
class Problem:
    family: str
    difficulty: int
    prompt: str
    answer: str                     # one correct response (for supervised warm-up and tests)
    key: str                        # canonical identity: equal keys are the same problem; decides the split
    spec: Mapping[str, Any] = dataclasses.field(default_factory=dict)     # what the verifier needs


@dataclasses.dataclass(frozen=True)
class Reward:
    score: float | None             # None: not scored (infrastructure failure), left out of the batch's reward
    reason: str


def in_held_out(key: str, fraction: float = DEFAULT_HELD_OUT_FRACTION) -> bool:
    """A problem belongs to the held-out split iff a stable hash of its key falls below `fraction`, so the two
    splits are disjoint by construction, whatever the seeds."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2 ** 64


def generate(family, seed: int, count: int, *, difficulty: int, split: str = "train",
             held_out_fraction: float = DEFAULT_HELD_OUT_FRACTION) -> list[Problem]:
    """`count` distinct problems of `family` (a family module) at `difficulty` from `split`, determined by `seed`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if difficulty not in family.DIFFICULTIES:
        raise ValueError(f"{family.FAMILY} has difficulties {family.DIFFICULTIES}, got {difficulty}")
    rng = random.Random(f"{family.FAMILY}/{difficulty}/{split}/{seed}")
    problems: dict[str, Problem] = {}
    for _ in range(100 * count + 1000):
        if len(problems) == count:
            break
        problem = family.make(rng, difficulty)
        if in_held_out(problem.key, held_out_fraction) == (split == "held_out"):
            problems.setdefault(problem.key, problem)
    if len(problems) < count:
        raise ValueError(f"{family.FAMILY} at difficulty {difficulty} gave only {len(problems)} distinct {split} "
                         f"problems of the {count} asked")
    return list(problems.values())


def last_line(response: str) -> str:
    """The final answer of a response: its last non-empty line, stripped (reasoning may precede it)."""
    lines = [line.strip() for line in response.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def exact(response: str, expected: str, parse: Callable[[str], Any] = str) -> Reward:
    """1.0 iff parse(last line) == parse(expected)."""
    got = last_line(response)
    try:
        correct = parse(got) == parse(expected)
    except ValueError:
        return Reward(0.0, f"unreadable answer {got[:50]!r}")
    return Reward(1.0, "correct") if correct else Reward(0.0, f"wrong answer {got[:50]!r}, expected {expected!r}")
