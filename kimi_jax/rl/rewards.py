"""Rewards for RL on verifiable tasks, and the reward shaping of K2 and k1.5 (POSTTRAINING.md sections 1-2).

`score(problems, responses)` is the one batched entry point: a Reward (score, reason) per response, dispatched on
the problem's family (kimi_jax.rl.tasks.FAMILIES); code runs in the sandbox, whose infrastructure errors come back
as score None (left out of the reward and counted with `excluded`, never scored 0). A verifier that raises fails
the whole call with a RewardError naming the task, never a silent 0.

Shaping, on arrays (NumPy, host side), P prompts x K samples:
- `apply_budget` + `budget_penalty`: K2's budget control (section 3.2.3): a response longer than its task's token
  budget is truncated to it and penalised. Budgets and the penalty are not published.
- `length_reward`: k1.5's length reward (arXiv 2501.12599 section 2.3.3).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from kimi_jax.rl.sandbox import Limits, SandboxPool
from kimi_jax.rl.tasks import FAMILIES, Problem, Reward, python_functions

DEFAULT_BUDGET_PENALTY = 0.5     # subtracted from a truncated response's reward (not published; our choice)


class RewardError(RuntimeError):
    pass


def score(problems: Sequence[Problem], responses: Sequence[str], *, pool: SandboxPool | None = None,
          timeout_s: float = python_functions.DEFAULT_TIMEOUT_S, limits: Limits = Limits()) -> list[Reward]:
    """One Reward per (problem, response). Code problems run on `pool` (else one at a time in this process's
    children) with timeout_s and limits."""
    if len(problems) != len(responses):
        raise ValueError(f"{len(problems)} problems but {len(responses)} responses")
    rewards: list[Reward | None] = [None] * len(problems)
    code = [i for i, problem in enumerate(problems) if problem.family == python_functions.FAMILY]
    for i, (problem, response) in enumerate(zip(problems, responses)):
        if problem.family == python_functions.FAMILY:
            continue
        if problem.family not in FAMILIES:
            raise RewardError(f"no verifier for task family {problem.family!r} (task {problem.key!r}); "
                              f"known: {sorted(FAMILIES)}")
        verify = FAMILIES[problem.family].verify
        rewards[i] = _checked(problem.family, [problem.key], lambda: verify(problem, response))
    if code:
        batch = _checked(python_functions.FAMILY, [problems[i].key for i in code],
                         lambda: python_functions.verify_batch([problems[i] for i in code],
                                                               [responses[i] for i in code], pool=pool,
                                                               timeout_s=timeout_s, limits=limits))
        for i, reward in zip(code, batch):
            rewards[i] = reward
    return rewards


def excluded(rewards: Sequence[Reward]) -> int:
    """How many rewards are None (sandbox errors): left out of the mean reward, logged as a count."""
    return sum(reward.score is None for reward in rewards)


def _checked(family: str, keys: list[str], call):
    try:
        return call()
    except Exception as e:
        shown = ", ".join(repr(key) for key in keys[:3]) + (", ..." if len(keys) > 3 else "")
        raise RewardError(f"the reward of task family {family!r} (task {shown}) raised {e!r}") from e


def apply_budget(mask: np.ndarray, budget) -> tuple[np.ndarray, np.ndarray]:
    """K2's budget control, the cut: mask [..., T] (1 on response tokens), budget: tokens per response, an int or an
    array broadcasting to mask.shape[:-1] (per task type) -> (mask keeping each response's first `budget` tokens,
    truncated bool [...]: the response had more). Sample with a length limit above the budget (or flag the
    responses the sampler itself cut as truncated) so that reaching the budget is seen."""
    mask = np.asarray(mask)
    budget = np.asarray(budget)[..., None]
    if np.any(budget < 0):
        raise ValueError("budgets must be >= 0")
    position = np.cumsum(mask, axis=-1)
    return mask * (position <= budget), position[..., -1] > budget[..., 0]


def budget_penalty(rewards: np.ndarray, truncated: np.ndarray, penalty: float = DEFAULT_BUDGET_PENALTY) -> np.ndarray:
    """K2's budget control, the penalty: rewards - penalty where truncated (the truncated text is scored as is)."""
    if np.shape(rewards) != np.shape(truncated):
        raise ValueError(f"rewards {np.shape(rewards)} and truncated {np.shape(truncated)} must have one shape")
    return np.asarray(rewards, np.float32) - penalty * np.asarray(truncated, np.float32)


def length_reward(lengths: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """k1.5's length reward over the K samples of each prompt (lengths, correct [P, K] -> [P, K]):

        lambda_i = 0.5 - (len_i - min_len) / (max_len - min_len)
        reward_i = lambda_i if correct_i else min(0, lambda_i)

    with min/max over the prompt's samples; lambda = 0 when all K have one length (the formula is 0/0 there).
    k1.5 adds it to the task reward with a weight (warmed up during training)."""
    lengths = np.asarray(lengths, np.float64)
    if lengths.ndim != 2 or np.shape(correct) != lengths.shape:
        raise ValueError(f"lengths and correct must be [prompts, K]: {lengths.shape}, {np.shape(correct)}")
    low, high = lengths.min(1, keepdims=True), lengths.max(1, keepdims=True)
    spread = np.where(high > low, high - low, 1.0)
    lam = np.where(high > low, 0.5 - (lengths - low) / spread, 0.0)
    return np.where(np.asarray(correct, bool), lam, np.minimum(0.0, lam)).astype(np.float32)
