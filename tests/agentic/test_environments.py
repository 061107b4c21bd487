"""Programmatic environments: the reference solution reaches the goal's end state, wrong actions do not, tool
failures come back as results, and everything is deterministic under a seed."""

import json

import pytest

from kimi_jax.agentic import AccountsEnv, CalendarEnv, FilesEnv, goal_failures
from kimi_jax.agentic import env_accounts, env_calendar, env_files
from kimi_jax.agentic.tasks import ABSENT, lookup

from agentic_helpers import find_task, solve, user

MAKERS = {AccountsEnv: env_accounts.make_task, CalendarEnv: env_calendar.make_task, FilesEnv: env_files.make_task}


def _call(env, name, **arguments):
    message = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "x", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}]}
    observation, reward, done, info = env.step(message)
    assert not info["errors"] and not done
    return json.loads(observation[0]["content"])


@pytest.mark.parametrize("env_cls", list(MAKERS))
def test_reference_solutions_reach_the_goal(env_cls):
    for index in range(8):
        task = MAKERS[env_cls](3, index)
        env = env_cls(seed=3, user=user())
        trajectory, _ = solve(env, task)
        assert trajectory.done and not trajectory.truncated and not trajectory.errors
        assert trajectory.reward == 1.0, (task.task_id, trajectory.goal_failures)
        assert trajectory.final_answer == task.answer


@pytest.mark.parametrize("env_cls", list(MAKERS))
def test_tasks_and_episodes_are_deterministic_under_a_seed(env_cls):
    make = MAKERS[env_cls]
    assert [make(5, i) for i in range(6)] == [make(5, i) for i in range(6)]
    assert [make(5, i).setup for i in range(6)] != [make(6, i).setup for i in range(6)]
    runs = [[solve(env_cls(seed=5, user=user()), make(5, i), error_rate=0.5, seed=1)[0].to_json() for i in range(6)]
            for _ in range(2)]
    assert runs[0] == runs[1]
    assert sum(t["reward"] for t in runs[0]) < 6            # the mistakes on purpose cost some goals


def test_accounts_cancel_credits_the_balance_and_refuses_shipped_orders():
    task = find_task(env_accounts.make_task, lambda t: t.solution[-1].get("name") == "cancel_order"
                     and t.persona is None)
    env = AccountsEnv()
    env.reset(task)
    oid = task.solution[-1]["arguments"]["order_id"]
    order = _call(env, "get_order", order_id=oid)
    before = env.state()["customers"][str(order["customer_id"])]["balance"]
    assert _call(env, "cancel_order", order_id=oid, reason="dup") == {
        "order_id": oid, "status": "cancelled", "credited_cents": order["total_cents"]}
    state = env.state()
    assert state["orders"][str(oid)]["status"] == "cancelled"
    assert state["customers"][str(order["customer_id"])]["balance"] == before + order["total_cents"]
    assert goal_failures(state, task.goal) == []
    assert _call(env, "cancel_order", order_id=oid, reason="again") == {
        "error": f"order {oid} is cancelled; only pending orders can be cancelled"}
    assert _call(env, "get_order", order_id=999) == {"error": "no order with id 999"}
    _, reward, done, info = env.step({"role": "assistant", "content": "Done."})
    assert done and reward == 1.0 and info["goal_failures"] == []


def test_accounts_wrong_order_misses_the_end_state():
    task = find_task(env_accounts.make_task, lambda t: t.solution[-1].get("name") == "cancel_order"
                     and t.persona is None)
    env = AccountsEnv()
    env.reset(task)
    oid = task.solution[-1]["arguments"]["order_id"]
    other = next(o["id"] for o in task.setup["orders"] if o["status"] == "pending" and o["id"] != oid)
    _call(env, "cancel_order", order_id=other, reason="wrong one")
    _, reward, done, info = env.step({"role": "assistant", "content": "Done."})
    assert done and reward == 0.0
    assert info["goal_failures"][0] == f"orders/{oid}/status: expected 'cancelled', got 'pending'"


def test_multi_turn_task_asks_the_simulated_user():
    task = find_task(env_accounts.make_task, lambda t: t.persona is not None)
    trajectory, _ = solve(AccountsEnv(user=user()), task)
    roles = [m["role"] for m in trajectory.messages]
    assert roles[:5] == ["system", "user", "assistant", "user", "assistant"]
    assert trajectory.messages[3]["content"] == f"My e-mail address is {task.persona.facts['e-mail address']}."
    assert trajectory.reward == 1.0
    without_user, _ = solve(AccountsEnv(user=None), task)       # nobody answers: the episode ends unfinished
    assert without_user.done and without_user.reward == 0.0 and len(without_user.messages) == 3


def test_calendar_rejects_overlaps_and_books_free_slots():
    task = env_calendar.make_task(0, 0)
    env = CalendarEnv()
    env.reset(task)
    first = task.setup["events"][0]
    clash = _call(env, "create_event", title="x", date=first["date"], start=first["start"], end=first["end"])
    assert clash["error"].startswith(f"{first['date']} {first['start']}-{first['end']} overlaps {first['id']}")
    slot = env_calendar.free_slot(task.setup["events"], first["date"], 60)
    made = _call(env, "create_event", title="Focus", date=first["date"], start=slot,
                 end=env_calendar.hhmm(env_calendar.minutes(slot) + 60))
    assert made["event_id"] == f"ev{len(task.setup['events']) + 1}"
    listed = _call(env, "list_events", date=first["date"])["events"]
    assert [e["start"] for e in listed] == sorted(e["start"] for e in listed) and made in listed
    assert _call(env, "delete_event", event_id="ev999") == {"error": "no event with id 'ev999'"}


def test_file_system_is_sandboxed_and_normalises_paths():
    task = env_files.make_task(0, 0)
    env = FilesEnv()
    env.reset(task)
    assert _call(env, "read_file", path="/docs/../../docs/notes.txt")["content"] == "meeting notes\n"
    assert _call(env, "list_directory", path="/")["entries"] == ["config/", "docs/", "home/", "tmp/"]
    assert _call(env, "write_file", path="/../../etc/passwd", content="x") == {"path": "/etc/passwd", "bytes": 1}
    assert _call(env, "write_file", path="/docs", content="x") == {"error": "'/docs' is a directory"}
    assert _call(env, "move_path", source="/docs/notes.txt", destination="/docs/report.txt") == {
        "error": "destination '/docs/report.txt' exists"}
    _call(env, "write_file", path="/home/todo.md", content="- more\n", mode="append")
    assert env.state()["files"]["/home/todo.md"].endswith("\n- more\n")
    assert lookup(env.state(), "files//etc/passwd") == "x" and lookup(env.state(), "files//nope") == ABSENT


def test_step_before_reset_and_truncation():
    with pytest.raises(RuntimeError, match="step before reset"):
        FilesEnv().step({"role": "assistant", "content": "hi"})
    task = env_files.make_task(0, 0)
    env = FilesEnv(max_turns=2)
    env.reset(task)
    _call(env, "list_directory", path="/")
    _, reward, done, info = env.step({"role": "assistant", "content": "", "tool_calls": [
        {"id": "x", "type": "function", "function": {"name": "list_directory", "arguments": '{"path": "/"}'}}]})
    assert done and info["truncated"] and reward == 0.0
    with pytest.raises(RuntimeError, match="step after the episode ended"):
        env.step({"role": "assistant", "content": "hi"})
