"""kimi_jax.chat.render against transformers' renderings of the official Kimi-K2-Instruct template
(tests/fixtures/chat/rendered.json, made by make_chat_fixtures.py), byte for byte."""

import copy
import json
from pathlib import Path

import pytest

from kimi_jax.chat import DEFAULT_SYSTEM_PROMPT, render, render_segments, with_canonical_ids

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "chat"
CASES = json.loads((FIXTURES / "rendered.json").read_text(encoding="utf-8"))["cases"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_render_matches_the_template_byte_for_byte(case):
    messages = copy.deepcopy(case["messages"])
    text = render(messages, case["tools"], case["add_generation_prompt"])
    assert text == case["expected"]
    assert text.encode("utf-8") == case["expected"].encode("utf-8")
    assert render(messages, case["tools"], case["add_generation_prompt"], canonical_ids=False) == \
        case["expected_verbatim"]
    assert messages == case["messages"]  # the caller's messages are not changed
    segments = render_segments(messages, case["tools"], case["add_generation_prompt"])
    assert "".join(t for t, _ in segments) == case["expected"]


def test_fixture_covers_the_features():
    names = {c["name"] for c in CASES}
    assert len(names) == len(CASES) >= 12
    assert any(c["tools"] for c in CASES) and any(not c["tools"] for c in CASES)
    assert {c["add_generation_prompt"] for c in CASES} == {True, False}
    assert sum(c["expected"] != c["expected_verbatim"] for c in CASES) == 3  # client ids rewritten
    assert any("北京" in c["expected"] for c in CASES)  # non-ASCII arguments kept (tojson, ensure_ascii=False)


def test_default_system_prompt_is_the_templates():
    template = (FIXTURES / "chat_template.jinja").read_text(encoding="utf-8")
    assert f"<|im_system|>system<|im_middle|>{DEFAULT_SYSTEM_PROMPT}<|im_end|>" in template
    assert DEFAULT_SYSTEM_PROMPT == "You are Kimi, an AI assistant created by Moonshot AI."


def _call(call_id, name):
    body = {"type": "function", "function": {"name": name, "arguments": "{}"}}
    return body if call_id is None else {"id": call_id, **body}


def test_canonical_ids_count_over_the_dialogue_and_follow_the_results():
    messages = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "tool_calls": [_call("a", "f"), _call(None, "g"), _call("c", "f")]},
        {"role": "tool", "tool_call_id": "c", "content": "3"},           # by client id
        {"role": "tool", "content": "1"},                                # oldest pending: a
        {"role": "tool", "tool_call_id": "functions.g:1", "content": "2"},  # by canonical id
        {"role": "assistant", "tool_calls": [_call("a", "g")]},         # a client id used again
        {"role": "tool", "tool_call_id": "a", "content": "4"},
    ]
    out = with_canonical_ids(messages)
    assert [c["id"] for c in out[1]["tool_calls"]] == ["functions.f:0", "functions.g:1", "functions.f:2"]
    assert [m["tool_call_id"] for m in out[2:5]] == ["functions.f:2", "functions.f:0", "functions.g:1"]
    assert out[5]["tool_calls"][0]["id"] == "functions.g:3" and out[6]["tool_call_id"] == "functions.g:3"
    assert messages[1]["tool_calls"][0]["id"] == "a" and "tool_call_id" not in messages[3]


@pytest.mark.parametrize("messages, match", [
    ([{"role": "developer", "content": "x"}], r"message 0: role must be one of"),
    ([{"content": "x"}], r"message 0: role must be one of"),
    ([{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "f:0", "content": "1"}],
     r"message 1: tool result \(tool_call_id='f:0'\) answers no pending tool call"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}],
     r"message 0 \(user\): only text content parts"),
    ([{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}], r"message 0: a tool call needs"),
    ([{"role": "assistant", "tool_calls": ["f()"]}], r"message 0: a tool call needs function.name"),
    ([{"role": "assistant", "tool_calls": [{"id": "x", "function": {"name": "f"}}]}],
     r"message 0 \(assistant\): tool call 0 has no function.arguments"),
    ([{"role": "assistant", "content": [{"type": "text", "text": "t"}], "tool_calls": [_call("x", "f")]}],
     r"needs string content"),
    ([{"role": "assistant", "tool_calls": [_call("x", "f")]}, {"role": "tool", "content": {"t": 1}}],
     r"message 1 \(tool\): a tool result needs string content"),
])
def test_bad_messages_raise_errors_that_name_them(messages, match):
    with pytest.raises(ValueError, match=match):
        render(messages)
