"""The judge on hand-made good and bad trajectories: each rule, the LLM judge's verdict parsing, statistics."""

import copy
import json

import pytest

from kimi_jax.agentic import (RejectionStats, ScriptedBackend, Trajectory, env_files, judge, parse_verdict,
                              scripted_judge)

from agentic_helpers import find_task

TASK = find_task(env_files.make_task, lambda t: t.solution[-1]["arguments"].get("path") == "/config/port.txt")
PORT = TASK.solution[-1]["arguments"]["content"]
INI = TASK.setup["files"]["/config/app.ini"]


def _call(name, arguments, idx):
    return {"role": "assistant", "content": "", "tool_calls": [{"id": f"functions.{name}:{idx}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments)}}]}


def _good() -> Trajectory:
    read, write = {"path": "/config/app.ini"}, {"path": "/config/port.txt", "content": PORT}
    messages = [{"role": "system", "content": TASK.agent.system_prompt}, {"role": "user", "content": TASK.prompt},
                _call("read_file", read, 0),
                {"role": "tool", "tool_call_id": "functions.read_file:0", "content": json.dumps({"content": INI})},
                _call("write_file", write, 1),
                {"role": "tool", "tool_call_id": "functions.write_file:1", "content": '{"bytes": 4}'},
                {"role": "assistant", "content": f"Wrote port {PORT} to /config/port.txt."}]
    return Trajectory(TASK.task_id, messages, list(TASK.agent.tools), reward=1.0, done=True,
                      calls=[{"name": "read_file", "arguments": read, "result": {"content": INI}},
                             {"name": "write_file", "arguments": write, "result": {"bytes": 4}}])


LLM = ScriptedBackend(scripted_judge)


def test_a_good_trajectory_passes_rules_and_llm_judge():
    verdict = judge(TASK, _good(), LLM)
    assert verdict.passed and verdict.reasons == []
    prompt = LLM.calls[-1][0][1]["content"]
    assert f"ASSISTANT CALLS write_file({json.dumps({'path': '/config/port.txt', 'content': PORT})})" in prompt
    assert prompt.endswith(f"FINAL ANSWER:\nWrote port {PORT} to /config/port.txt.")


def _bad(kind):
    t = _good()
    if kind == "malformed_calls":
        t.errors = [{"kind": "invalid_json", "message": "arguments are not valid JSON", "span": [3, 9]}]
    elif kind == "end_state":
        t.goal_failures, t.reward = [f"files//config/port.txt: expected {PORT!r}, got '<absent>'"], 0.0
    elif kind == "missing_tools":
        t.calls = t.calls[1:]
    elif kind == "tool_order":
        t.calls = t.calls[::-1]
    elif kind == "checkpoint":
        t.calls[1]["arguments"] = {"path": "/config/port.txt", "content": PORT + "0"}
    elif kind == "not_done":
        t.messages, t.done, t.truncated = t.messages[:-1], True, True
    elif kind == "backend_error":
        t.messages, t.done, t.backend_error = t.messages[:-1], False, "http://x: 429 after 4 attempt(s)"
    elif kind == "llm_judge":
        t.messages[-1]["content"] = "Done, the port is written."
    return t


@pytest.mark.parametrize("kind, reasons", [
    ("malformed_calls", ["malformed_calls: 1 (invalid_json)"]),
    ("end_state", [f"end_state: files//config/port.txt: expected {PORT!r}, got '<absent>'"]),
    ("missing_tools", ["missing_tools: ['read_file']"]),
    ("tool_order", ["tool_order: first calls came as ['write_file', 'read_file'], expected "
                    "['read_file', 'write_file']"]),
    ("checkpoint", [f"checkpoint: wrote the port (write_file {{'path': '/config/port.txt', 'content': '{PORT}'}})"]),
    ("not_done", ["not_done: no final answer (truncated)"]),
    ("backend_error", ["backend_error: http://x: 429 after 4 attempt(s)", "not_done: no final answer"]),
    ("llm_judge", [f"llm_judge: the final answer does not state ['{PORT}']"]),
])
def test_bad_trajectories_are_rejected_with_the_reason(kind, reasons):
    calls_before = len(LLM.calls)
    verdict = judge(TASK, _bad(kind), LLM)
    assert not verdict.passed and verdict.reasons == reasons
    assert len(LLM.calls) - calls_before == (kind == "llm_judge")    # the LLM judge only sees rule-clean ones


def test_unreadable_llm_verdicts_reject():
    verdict = judge(TASK, _good(), ScriptedBackend(lambda m, t: "Looks fine to me!"))
    assert verdict.reasons == ["llm_judge_unparseable: no verdict in 'Looks fine to me!'"]


@pytest.mark.parametrize("text, expected", [
    ('{"verdict": "pass", "reason": "ok"}', (True, "ok")),
    ('thinking {"draft": 1} ... {"verdict": "FAIL", "reason": "wrong file"} trailing', (False, "wrong file")),
    ("Verdict: pass", (True, "")),
    ('{"verdict": "maybe"}', (None, "no verdict in '{\"verdict\": \"maybe\"}'")),
])
def test_parse_verdict(text, expected):
    assert parse_verdict(text) == expected


def test_rejection_statistics():
    stats = RejectionStats()
    for t in [_good(), _bad("checkpoint"), _bad("missing_tools"), _bad("llm_judge"), _good()]:
        stats.add(judge(TASK, t, LLM))
    merged = RejectionStats()
    merged.merge(stats.to_json())
    merged.merge(copy.deepcopy(stats.to_json()))
    assert stats.to_json() == {"kept": 2, "rejected": 3, "by_kind": {"checkpoint": 1, "llm_judge": 1,
                                                                      "missing_tools": 1}}
    assert merged.to_json() == {"kept": 4, "rejected": 6, "by_kind": {"checkpoint": 2, "llm_judge": 2,
                                                                       "missing_tools": 2}}
