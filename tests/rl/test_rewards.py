"""kimi_jax.rl.rewards: batched scoring, failures that name the task, sandbox errors left out, budget control and
k1.5's length reward on hand-computed examples."""

import numpy as np
import pytest

from kimi_jax.rl import rewards, sandbox, tasks
from kimi_jax.rl.tasks import arithmetic, python_functions, strings


def test_score_mixed_batch():
    a = tasks.generate(arithmetic, 0, 1, difficulty=1)[0]
    s = tasks.generate(strings, 0, 1, difficulty=1)[0]
    p = tasks.generate(python_functions, 0, 1, difficulty=1)[0]
    result = rewards.score([a, p, s, p, a], [a.answer, p.answer, "nope", "def f(x):\n    return 0\n", "x"],
                           timeout_s=2.0)
    assert [r.score for r in result] == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert result[1].reason == "passed: 5 tests passed" and rewards.excluded(result) == 0
    with pytest.raises(ValueError, match="2 problems but 1 responses"):
        rewards.score([a, a], ["1"])


def test_a_raising_verifier_names_the_task(monkeypatch):
    problem = tasks.generate(arithmetic, 0, 1, difficulty=1)[0]

    def broken(problem, response):
        raise KeyError("spec")

    monkeypatch.setattr(arithmetic, "verify", broken)
    with pytest.raises(rewards.RewardError, match=rf"'arithmetic' \(task '{problem.key}'\) raised KeyError"):
        rewards.score([problem], ["1"])
    unknown = tasks.Problem("sudoku", 1, "", "", "s1")
    with pytest.raises(rewards.RewardError, match="no verifier for task family 'sudoku'"):
        rewards.score([unknown], [""])


def test_sandbox_errors_are_retried_then_left_out(monkeypatch):
    monkeypatch.setattr(sandbox, "SUPERVISOR", "/nonexistent/sandbox_supervisor.py")
    problem = tasks.generate(python_functions, 0, 1, difficulty=1)[0]
    calls = []
    real = python_functions.run_python
    monkeypatch.setattr(python_functions, "run_python", lambda *a, **k: calls.append(1) or real(*a, **k))
    result = rewards.score([problem], [problem.answer], timeout_s=1.0)
    assert result[0].score is None and result[0].reason.startswith("sandbox_error")
    assert len(calls) == 2 and rewards.excluded(result) == 1


def test_apply_budget():
    """Two responses after a 2-token prompt: 3 and 5 response tokens (then padding); budget 4."""
    mask = np.array([[0, 0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1]], np.float32)
    kept, truncated = rewards.apply_budget(mask, 4)
    np.testing.assert_array_equal(kept, [[0, 0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(truncated, [False, True])
    kept, truncated = rewards.apply_budget(mask, np.array([2, 9]))           # a budget per task
    np.testing.assert_array_equal(kept.sum(-1), [2, 5])
    np.testing.assert_array_equal(truncated, [True, False])
    with pytest.raises(ValueError, match="budgets must be >= 0"):
        rewards.apply_budget(mask, -1)


def test_budget_penalty():
    shaped = rewards.budget_penalty(np.array([[1.0, 0.0, 1.0]]), np.array([[False, True, True]]), penalty=0.5)
    np.testing.assert_allclose(shaped, [[1.0, -0.5, 0.5]])
    with pytest.raises(ValueError, match="one shape"):
        rewards.budget_penalty(np.zeros((1, 3)), np.zeros((3,), bool))


def test_length_reward_k15():
    """Lengths 10, 20, 30 (min 10, max 30): lambda = 0.5, 0, -0.5; correct keeps lambda, wrong min(0, lambda).
    Equal lengths give 0."""
    result = rewards.length_reward(np.array([[10, 20, 30, 30], [5, 5, 5, 5]]),
                                   np.array([[True, True, True, False], [True, False, True, False]]))
    np.testing.assert_allclose(result, [[0.5, 0.0, -0.5, -0.5], [0.0, 0.0, 0.0, 0.0]])
    wrong_short = rewards.length_reward(np.array([[10, 30]]), np.array([[False, False]]))
    np.testing.assert_allclose(wrong_short, [[0.0, -0.5]])
    with pytest.raises(ValueError, match=r"\[prompts, K\]"):
        rewards.length_reward(np.array([1, 2]), np.array([True, False]))
