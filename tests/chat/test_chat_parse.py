"""kimi_jax.chat.parse_assistant: round trips through the rendered fixtures, and structured errors (never an
exception) on malformed model output."""

import json
import random
import re
from pathlib import Path

import pytest

from kimi_jax.chat import ChatParseError, parse_assistant, with_canonical_ids

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "chat"
CASES = json.loads((FIXTURES / "rendered.json").read_text(encoding="utf-8"))["cases"]
WEATHER = next(c for c in CASES if c["name"] == "single_call_dict_arguments")["tools"]
B, E = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CB, CA, CE = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"


def test_parse_a_turn_with_content_and_two_calls():
    text = (f"Let me check.{B}{CB}functions.get_weather:0{CA}{{\"city\": \"北京\"}}{CE}"
            f"{CB}functions.get_weather:1{CA}{{\"city\":\"Paris\",\"unit\":\"celsius\"}}{CE}{E}")
    parsed = parse_assistant(text, WEATHER, first_call_index=0)
    assert parsed.ok and parsed.errors == []
    assert parsed.content == "Let me check."
    assert parsed.tool_calls == [
        {"id": "functions.get_weather:0", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}},
        {"id": "functions.get_weather:1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city":"Paris","unit":"celsius"}'}}]
    assert parsed.to_message() == {"role": "assistant", "content": "Let me check.", "tool_calls": parsed.tool_calls}
    assert parse_assistant("Just text, 你好.").to_message() == {"role": "assistant", "content": "Just text, 你好."}


def assistant_turns(case):
    """(message with canonical ids, its body in the fixture's rendering without <|im_end|>, calls before it)
    per assistant turn."""
    messages = with_canonical_ids(case["messages"])
    bodies = re.findall(r"<\|im_assistant\|>assistant<\|im_middle\|>(.*?)<\|im_end\|>", case["expected"], re.DOTALL)
    turns, calls_before = [], 0
    for message, body in zip([m for m in messages if m["role"] == "assistant"], bodies, strict=True):
        turns.append((message, body, calls_before))
        calls_before += len(message.get("tool_calls") or [])
    return turns


@pytest.mark.parametrize("case", [c for c in CASES if '"role": "assistant"' in json.dumps(c["messages"])],
                         ids=lambda c: c["name"])
def test_parse_recovers_every_rendered_assistant_turn(case):
    turns = assistant_turns(case)
    assert turns
    for message, body, calls_before in turns:
        parsed = parse_assistant(body, case["tools"], first_call_index=calls_before)
        assert parsed.errors == []
        expected = {"role": "assistant", "content": message.get("content") or ""}
        if message.get("tool_calls"):
            expected["tool_calls"] = [
                {"id": c["id"], "type": "function", "function": {
                    "name": c["function"]["name"],
                    "arguments": a if isinstance(a := c["function"]["arguments"], str) else
                    json.dumps(a, ensure_ascii=False)}} for c in message["tool_calls"]]
        assert parsed.to_message() == expected
        for call, original in zip(parsed.tool_calls, message.get("tool_calls") or []):
            arguments = original["function"]["arguments"]
            assert json.loads(call["function"]["arguments"]) == (
                json.loads(arguments) if isinstance(arguments, str) else arguments)


GOOD = f"{CB}functions.get_weather:0{CA}{{\"city\": \"Oslo\"}}{CE}"


@pytest.mark.parametrize("text, kind, span_text, good_calls", [
    (f"hi{B}{GOOD}", "unterminated_section", f"{B}{GOOD}", 1),
    (f"{B}{CB}functions.get_weather:0{CA}{{\"city\": \"Oslo\"}}{E}", "unterminated_call",
     f"{CB}functions.get_weather:0{CA}{{\"city\": \"Oslo\"}}", 0),
    (f"{B}{CB}functions.get_weather:0{{\"city\": \"Oslo\"}}{CE}{E}", "missing_arguments",
     'functions.get_weather:0{"city": "Oslo"}', 0),
    (f"{B}{CB}get_weather:0{CA}{{}}{CE}{E}", "bad_id", "get_weather:0", 0),
    (f"{B}{CB}call_abc123{CA}{{}}{CE}{E}", "bad_id", "call_abc123", 0),
    (f"{B}{CB}functions.get_time:0{CA}{{}}{CE}{GOOD}{E}", "unknown_tool", "functions.get_time:0", 1),
    (f"{B}{CB}functions.get_weather:0{CA}{{\"city\": \"Oslo\"{CE}{E}", "invalid_json", '{"city": "Oslo"', 0),
    (f"{B}{CB}functions.get_weather:0{CA}[\"Oslo\"]{CE}{E}", "arguments_not_object", '["Oslo"]', 0),
    (f"{B}{CB}functions.get_weather:0{CA}{{\"city\": 5}}{CE}{E}", "arguments_schema", '{"city": 5}', 0),
    (f"{B}{CB}functions.get_weather:0{CA}{{\"unit\": \"celsius\"}}{CE}{E}", "arguments_schema",
     '{"unit": "celsius"}', 0),
    (f"{B}{GOOD}{E} and more", "text_after_section", " and more", 1),
    (f"{B}{GOOD} by the way {E}", "unexpected_text", " by the way ", 1),
    (f"{B}{GOOD}<|im_user|>{E}", "unexpected_token", "<|im_user|>", 1),
    (f"answer<|im_end|><|im_user|>more", "unexpected_token", "<|im_end|>", 0),
    (f"text {CB}functions.get_weather:0{CA}{{}}{CE}", "unexpected_token", CB, 0),
])
def test_malformed_output_gives_structured_errors(text, kind, span_text, good_calls):
    parsed = parse_assistant(text, WEATHER)
    assert not parsed.ok
    first = parsed.errors[0]
    assert isinstance(first, ChatParseError) and first.kind == kind and first.message
    assert text[first.span[0]:first.span[1]] == span_text
    assert len(parsed.tool_calls) == good_calls


def test_error_messages_name_the_problem():
    unknown = parse_assistant(f"{B}{CB}functions.get_time:0{CA}{{}}{CE}{E}", WEATHER).errors[0]
    assert unknown.message == "unknown tool 'get_time'; the tools are ['get_weather']"
    schema = parse_assistant(f"{B}{CB}functions.get_weather:0{CA}{{\"city\": \"Oslo\", \"unit\": \"K\"}}{CE}{E}",
                             WEATHER).errors[0]
    assert schema.kind == "arguments_schema" and schema.message.startswith("arguments at unit: 'K' is not one of")
    late = parse_assistant(f"{B}{GOOD}{E}", WEATHER, first_call_index=3).errors[0]
    assert (late.kind, late.message) == ("bad_id", "tool call id 'functions.get_weather:0' should have index 3")


def test_without_tools_any_name_and_schema_pass():
    parsed = parse_assistant(f"{B}{CB}functions.anything:7{CA}{{\"x\": [1, 2]}}{CE}{E}")
    assert parsed.ok and parsed.tool_calls[0]["function"] == {"name": "anything", "arguments": '{"x": [1, 2]}'}


def test_garbage_never_raises():
    pieces = [B, E, CB, CA, CE, "<|im_end|>", "functions.get_weather:0", "functions.x:1", '{"city": "Oslo"}',
              "{", "}", "text", " ", "\n", "é", ":", "functions."]
    rng = random.Random(0)
    for _ in range(500):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        for tools in (None, WEATHER):
            parsed = parse_assistant(text, tools, first_call_index=rng.choice([None, 0]))
            assert text.startswith(parsed.content)
            for error in parsed.errors:
                assert 0 <= error.span[0] <= error.span[1] <= len(text), (text, error)
