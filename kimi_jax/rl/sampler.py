"""Which prompts an RL iteration trains on, at which temperature, and the held-out pass@k estimate.

- `PromptSampler`: a fixed pool of training problems; each iteration draws `count` distinct ones, uniformly or,
  with k1.5's prioritised sampling (arXiv 2501.12599 section 2.3.4), with probability proportional to
  (1 - success rate) of each problem so far (a problem never tried counts as rate 0). The draw is a function of
  (seed, iteration) and the success counts, which are the sampler's whole state (`state_dict`, JSON), so a
  resumed run draws what the uninterrupted run would.
- `temperature`: K2's temperature decay (section 3.2.3: high early for exploration, lower later); the schedule is
  not published: linear from `start` to `end` over `decay_steps` iterations, then constant.
- `pass_at_k`: the unbiased estimator of Chen et al. (arXiv 2107.03374): 1 - C(n - c, k) / C(n, k).
"""

from __future__ import annotations

from math import comb
from typing import Sequence

import numpy as np

from kimi_jax.rl.tasks import Problem

SAMPLINGS = ("uniform", "prioritised")
PRIORITY_FLOOR = 1e-3      # weight of a problem always solved so far, so that it can still come back


class PromptSampler:
    def __init__(self, pool: Sequence[Problem], sampling: str = "uniform", seed: int = 0):
        if sampling not in SAMPLINGS:
            raise ValueError(f"config.prompts.sampling must be one of {SAMPLINGS}, got {sampling!r}")
        self.pool, self.sampling, self.seed = list(pool), sampling, seed
        self.attempts = np.zeros(len(pool), np.int64)
        self.successes = np.zeros(len(pool), np.int64)

    def draw(self, iteration: int, count: int) -> list[int]:
        """Indices into the pool of `count` distinct problems for `iteration`."""
        if count > len(self.pool):
            raise ValueError(f"config.prompts.per_step ({count}) exceeds the pool (config.prompts.pool_size "
                             f"{len(self.pool)})")
        rng = np.random.default_rng([self.seed, iteration])
        weights = None
        if self.sampling == "prioritised":
            rate = self.successes / np.maximum(self.attempts, 1)
            weights = np.maximum(1.0 - rate, PRIORITY_FLOOR)
            weights = weights / weights.sum()
        return [int(i) for i in rng.choice(len(self.pool), size=count, replace=False, p=weights)]

    def record(self, indices: Sequence[int], correct: np.ndarray) -> None:
        """correct: [len(indices), K] bool (or None-free 0/1) outcomes of each drawn problem's samples."""
        correct = np.asarray(correct)
        np.add.at(self.attempts, list(indices), correct.shape[1])
        np.add.at(self.successes, list(indices), correct.sum(axis=1).astype(np.int64))

    def state_dict(self) -> dict:
        return {"attempts": self.attempts.tolist(), "successes": self.successes.tolist()}

    def load_state_dict(self, state: dict) -> None:
        if len(state["attempts"]) != len(self.pool):
            raise ValueError(f"the checkpoint's prompt sampler has {len(state['attempts'])} problems, the pool "
                             f"(config.prompts.pool_size) {len(self.pool)}")
        self.attempts = np.asarray(state["attempts"], np.int64)
        self.successes = np.asarray(state["successes"], np.int64)


def temperature(iteration: int, *, start: float, end: float, decay_steps: int) -> float:
    """Sampling temperature of `iteration` (0-based): start -> end linearly over decay_steps, then end
    (decay_steps 0: always start)."""
    if decay_steps <= 0:
        return float(start)
    fraction = min(iteration / decay_steps, 1.0)
    return float(start + (end - start) * fraction)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k of the n samples (c of them correct) is correct."""
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n samples, got k={k}, n={n}")
    return 1.0 - comb(n - c, k) / comb(n, k)
