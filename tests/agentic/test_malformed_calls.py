"""Malformed tool calls (raw model text parsed with kimi_jax.chat.parse_assistant, or OpenAI-style tool_calls
checked against the schema) come back to the model as a structured error observation, never an exception;
nothing runs and the episode goes on."""

import json

import pytest

from kimi_jax.agentic import FilesEnv, env_files
from kimi_jax.agentic.environment import ERROR_PREFIX
from kimi_jax.chat.template import (TOOL_CALL_ARGUMENT_BEGIN as ARG, TOOL_CALL_BEGIN as BEGIN,
                                    TOOL_CALL_END as END, TOOL_CALLS_SECTION_BEGIN as SECTION,
                                    TOOL_CALLS_SECTION_END as SECTION_END)

READ = '{"path": "/docs/notes.txt"}'


def _errors(observation):
    [message] = observation
    assert message["role"] == "user" and message["content"].startswith(ERROR_PREFIX + ": ")
    body = message["content"][len(ERROR_PREFIX) + 2:].split("\n")[0]
    return json.loads(body)["errors"]


@pytest.mark.parametrize("content, kind, covered", [
    (f"Reading.{SECTION}{BEGIN}functions.read_file:0{ARG}{READ}{END}", "unterminated_section",
     f"{SECTION}{BEGIN}functions.read_file:0{ARG}{READ}{END}"),
    (f"{SECTION}{BEGIN}functions.rm_rf:0{ARG}{READ}{END}{SECTION_END}", "unknown_tool", "functions.rm_rf:0"),
    (f"{SECTION}{BEGIN}functions.read_file:0{ARG}{{\"path\": \"/docs{END}{SECTION_END}", "invalid_json",
     '{"path": "/docs'),
    (f"{SECTION}{BEGIN}functions.read_file:3{ARG}{READ}{END}{SECTION_END}", "bad_id", "functions.read_file:3"),
    (f"{SECTION}{BEGIN}functions.read_file:0{ARG}{{\"path\": \"docs\"}}{END}{SECTION_END}", "arguments_schema",
     '{"path": "docs"}'),
    ("Done<|im_end|> really", "unexpected_token", "<|im_end|>"),
])
def test_raw_text_errors_become_observations(content, kind, covered):
    env = FilesEnv()
    env.reset(env_files.make_task(0, 0))
    observation, reward, done, info = env.step({"role": "assistant", "content": content})
    errors = _errors(observation)
    assert [e["kind"] for e in errors] == [kind]
    start, end = errors[0]["span"]
    assert content[start:end] == covered                     # the span points at the culprit
    assert errors == info["errors"] and info["calls"] == [] and not done and reward == 0.0
    assert info["assistant"] == {"role": "assistant", "content": content}
    # the episode goes on: a well-formed call now runs, with index 0 (the malformed one did not count)
    observation, _, _, info = env.step({"role": "assistant", "content": f"{SECTION}{BEGIN}functions.read_file:0"
                                        f"{ARG}{READ}{END}{SECTION_END}"})
    assert observation == [{"role": "tool", "tool_call_id": "functions.read_file:0",
                            "content": '{"content": "meeting notes\\n", "path": "/docs/notes.txt"}'}]


@pytest.mark.parametrize("function, kind, message", [
    ({"name": "format_disk", "arguments": "{}"}, "unknown_tool", "unknown tool 'format_disk'"),
    ({"name": "read_file", "arguments": "{'path': '/x'}"}, "invalid_json", "arguments are not valid JSON"),
    ({"name": "read_file", "arguments": "[1]"}, "arguments_not_object", "must be a JSON object, got list"),
    ({"name": "read_file", "arguments": {"path": 3}}, "arguments_schema", "arguments at path: 3 is not of type"),
    ({"name": "read_file", "arguments": "{}"}, "arguments_schema", "'path' is a required property"),
    ({"arguments": "{}"}, "unknown_tool", "unknown tool 'None'"),
])
def test_openai_tool_calls_are_checked_against_the_schema(function, kind, message):
    env = FilesEnv()
    env.reset(env_files.make_task(0, 0))
    observation, _, done, info = env.step({"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "read_file", "arguments": READ}},
        {"id": "call_2", "type": "function", "function": function}]})
    [error] = _errors(observation)
    assert error["kind"] == kind and message in error["message"] and not done
    assert info["calls"] == []                               # nothing of a malformed turn runs, not even call 1


def test_non_string_content_is_an_error_not_a_crash():
    env = FilesEnv()
    env.reset(env_files.make_task(0, 0))
    observation, _, done, _ = env.step({"role": "assistant", "content": [{"type": "image"}]})
    assert _errors(observation)[0]["kind"] == "bad_message" and not done


def test_canonical_ids_count_over_the_episode():
    env = FilesEnv()
    env.reset(env_files.make_task(0, 0))
    call = {"id": "abc", "type": "function", "function": {"name": "read_file", "arguments": READ}}
    _, _, _, first = env.step({"role": "assistant", "content": "", "tool_calls": [call, call]})
    _, _, _, second = env.step({"role": "assistant", "content": "", "tool_calls": [call]})
    assert [c["id"] for c in first["assistant"]["tool_calls"] + second["assistant"]["tool_calls"]] == [
        "functions.read_file:0", "functions.read_file:1", "functions.read_file:2"]
