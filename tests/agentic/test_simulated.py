"""The LLM-simulated tool environment: state kept across calls through the simulator's prompt, seeded failure
injection (errors, timeouts, partial results), bad simulator replies retried once, then a tool error."""

import json

from kimi_jax.agentic import ScriptedBackend, SimulatedToolEnv, scripted_simulator, simulated_tasks
from kimi_jax.agentic.env_simulated import parse_simulator_reply

from agentic_helpers import find_task, solve

NO_FAILURES = {"error": 0.0, "timeout": 0.0, "partial": 0.0}


def _call(env, name, **arguments):
    observation, _, _, info = env.step({"role": "assistant", "content": "", "tool_calls": [
        {"id": "x", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}]})
    assert not info["errors"]
    return json.loads(observation[0]["content"])


def _notes_task():
    return find_task(simulated_tasks.make_task, lambda t: t.solution[0]["name"] == "create_note")


def test_state_is_kept_across_calls():
    backend = ScriptedBackend(scripted_simulator)
    env = SimulatedToolEnv(backend, failures=NO_FAILURES)
    env.reset(_notes_task())
    made = _call(env, "create_note", title="Pets", body="feed the cat", tags=["home"])
    assert made == {"note_id": "n1", "title": "Pets", "body": "feed the cat", "tags": ["home"]}
    assert _call(env, "search_notes", query="CAT")["notes"] == [made]
    assert _call(env, "search_notes", query="cat", tag="work")["notes"] == []
    assert env.state() == {"notes": [made]}
    # the simulator saw the state summary in its prompt
    assert '\nSTATE: {"notes": [{"note_id": "n1", "title": "Pets"' in backend.calls[-1][0][1]["content"]


def test_failures_are_injected_deterministically_under_a_seed():
    task = find_task(simulated_tasks.make_task, lambda t: t.solution[0]["name"] == "get_current_weather")
    failures = {"error": 0.2, "timeout": 0.2, "partial": 0.3}

    def run(seed):
        env = SimulatedToolEnv(ScriptedBackend(scripted_simulator), failures=failures, seed=seed, max_turns=40)
        trajectory, _ = solve(env, task)
        return env.injected, trajectory.to_json()

    injected, trajectory = run(10)
    assert (injected, trajectory) == run(10)
    assert injected == ["error", "partial", "timeout", "partial"] and run(11)[0] == ["error", "partial"]
    results = [c["result"] for c in trajectory["calls"]]
    assert {"error": "503 service unavailable", "retryable": True} in results
    assert {"error": "the tool timed out after 30 s", "retryable": True} in results
    partial = [r for r in results if r.get("partial")]
    [forecast] = [r for r in partial if "days" in r]          # a partial forecast keeps the first half of the days
    assert len(forecast["days"]) == task.solution[1]["arguments"]["days"] // 2
    assert trajectory["done"] and trajectory["reward"] == 1.0     # the solver retried through the failures


def test_bad_simulator_replies_are_retried_then_become_a_tool_error():
    replies = iter(["no json here", json.dumps({"result": 1, "state": {}}), "[]", "{\"result\": 2}"])
    backend = ScriptedBackend(lambda messages, tools: next(replies))
    env = SimulatedToolEnv(backend, failures=NO_FAILURES)
    env.reset(_notes_task())
    assert _call(env, "search_notes", query="x") == 1
    assert backend.calls[1][0][-1]["content"] == ("Invalid reply: the reply holds no JSON object. "
                                                  "Answer with the JSON object.")
    assert _call(env, "search_notes", query="x") == {
        "error": "the tool simulator gave no valid reply (the JSON object needs \"result\" and \"state\" (an object))"}
    assert parse_simulator_reply('x {"result": [], "state": {"a": 1}} y') == ({"result": [], "state": {"a": 1}}, "")


def test_failure_rates_are_validated():
    try:
        SimulatedToolEnv(ScriptedBackend(scripted_simulator), failures={"error": 0.7, "crash": 0.5})
    except ValueError as e:
        assert "failures: kinds must be among ['error', 'partial', 'timeout']" in str(e)
    else:
        raise AssertionError("bad failure rates were accepted")
