"""Shared helpers for the agentic tests: find a generated task of a kind, run the reference solution."""

from kimi_jax.agentic import ScriptedBackend, ScriptedSolver, SimulatedUser, run_episode, scripted_user


def find_task(make_task, predicate, seed=0, limit=200):
    for index in range(limit):
        task = make_task(seed, index)
        if predicate(task):
            return task
    raise AssertionError("no generated task matches")


def solve(env, task, error_rate=0.0, seed=0):
    """Run the scripted solver on task in env -> (trajectory, solver)."""
    solver = ScriptedSolver(task, error_rate=error_rate, seed=seed)
    return run_episode(env, task, solver), solver


def user():
    return SimulatedUser(ScriptedBackend(scripted_user))
