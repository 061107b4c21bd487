"""Parse a generated Kimi-K2 assistant turn into content and OpenAI-style tool calls.

The text is what the model generated after <|im_assistant|>assistant<|im_middle|>, up to (not including) the
<|im_end|> that ends the turn:

    {content}[<|tool_calls_section_begin|>
              (<|tool_call_begin|>functions.{name}:{idx}<|tool_call_argument_begin|>{JSON object}<|tool_call_end|>)*
              <|tool_calls_section_end|>]

Malformed output never raises: each problem becomes a ChatParseError(kind, message, span) on the result (span:
[start, end) character offsets into the text), so an environment can hand it back to the model. Only
well-formed calls land in `tool_calls`. Error kinds:

    unexpected_token      a chat special token where none belongs (in the content, or between calls)
    unexpected_text       text inside the section that is not a call
    unterminated_section  <|tool_calls_section_begin|> without <|tool_calls_section_end|>
    unterminated_call     <|tool_call_begin|> without <|tool_call_end|>
    missing_arguments     a call without <|tool_call_argument_begin|>
    bad_id                an id that is not functions.{name}:{idx} (or, with first_call_index, not the next idx)
    unknown_tool          a name not among `tools` (only checked when tools are given)
    invalid_json          arguments that are not JSON
    arguments_not_object  arguments that are JSON but not an object
    arguments_schema      arguments that break the tool's `parameters` JSON schema (when tools are given)
    text_after_section    non-whitespace text after <|tool_calls_section_end|>
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Sequence

import jsonschema

from kimi_jax.chat.template import (TOOL_CALL_ARGUMENT_BEGIN, TOOL_CALL_BEGIN, TOOL_CALL_END,
                                    TOOL_CALLS_SECTION_BEGIN, TOOL_CALLS_SECTION_END)
from kimi_jax.data.tokenizers import CHAT_SPECIAL_TOKENS

CALL_ID = re.compile(r"functions\.([A-Za-z0-9_.\-]+):(\d+)")
_SPECIAL = re.compile("|".join(re.escape(t) for t in CHAT_SPECIAL_TOKENS))


@dataclasses.dataclass(frozen=True)
class ChatParseError:
    kind: str               # one of the kinds in the module docstring
    message: str            # what is wrong, for a person or the model
    span: tuple[int, int]   # [start, end) character offsets into the parsed text


@dataclasses.dataclass
class ParsedAssistant:
    content: str                                   # the text before the tool-calls section
    tool_calls: list[dict[str, Any]]               # OpenAI style; arguments as the generated JSON string
    errors: list[ChatParseError] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_message(self) -> dict[str, Any]:
        """{"role": "assistant", "content": ..., ["tool_calls": [...]]}, ready to append to a dialogue."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        return message


def _stray_tokens(text: str, start: int, end: int, where: str) -> list[ChatParseError]:
    return [ChatParseError("unexpected_token", f"{m.group()} is not allowed {where}", (m.start(), m.end()))
            for m in _SPECIAL.finditer(text, start, end)]


def _check_arguments(args: str, tool: dict | None, span) -> ChatParseError | None:
    try:
        value = json.loads(args)
    except json.JSONDecodeError as e:
        return ChatParseError("invalid_json", f"arguments are not valid JSON: {e}", span)
    if not isinstance(value, dict):
        return ChatParseError("arguments_not_object", f"arguments must be a JSON object, got {type(value).__name__}",
                              span)
    schema = (tool or {}).get("function", {}).get("parameters")
    if schema:
        error = jsonschema.exceptions.best_match(jsonschema.validators.validator_for(schema)(schema).iter_errors(value))
        if error is not None:
            path = "/".join(str(p) for p in error.absolute_path)
            return ChatParseError("arguments_schema", f"arguments{' at ' + path if path else ''}: {error.message}",
                                  span)
    return None


def _parse_call(text: str, start: int, end: int, tools: dict | None, expected_idx: int | None):
    """One call text[start:end] (between <|tool_call_begin|> and <|tool_call_end|>) -> (call or None, error)."""
    arg = text.find(TOOL_CALL_ARGUMENT_BEGIN, start, end)
    if arg < 0:
        return None, ChatParseError("missing_arguments", f"tool call has no {TOOL_CALL_ARGUMENT_BEGIN}", (start, end))
    call_id, args = text[start:arg], text[arg + len(TOOL_CALL_ARGUMENT_BEGIN):end]
    m = CALL_ID.fullmatch(call_id)
    if m is None:
        return None, ChatParseError("bad_id", f"tool call id {call_id!r} is not functions.NAME:IDX", (start, arg))
    name, idx = m.group(1), int(m.group(2))
    if expected_idx is not None and idx != expected_idx:
        return None, ChatParseError("bad_id", f"tool call id {call_id!r} should have index {expected_idx}",
                                    (start, arg))
    if tools is not None and name not in tools:
        return None, ChatParseError("unknown_tool", f"unknown tool {name!r}; the tools are {sorted(tools)}",
                                    (start, arg))
    error = _check_arguments(args, None if tools is None else tools[name], (arg + len(TOOL_CALL_ARGUMENT_BEGIN), end))
    if error is not None:
        return None, error
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}, None


def parse_assistant(text: str, tools: Sequence[dict] | None = None, *,
                    first_call_index: int | None = None) -> ParsedAssistant:
    """Generated assistant text (without the closing <|im_end|>) -> ParsedAssistant(content, tool_calls, errors).

    tools: the OpenAI-style tools offered; when given, calls must name one of them and their arguments must
    satisfy its `parameters` schema. first_call_index: when given, the calls' ids must count on from it (the
    number of calls earlier in the dialogue)."""
    by_name = None if tools is None else {t["function"]["name"]: t for t in tools}
    section = text.find(TOOL_CALLS_SECTION_BEGIN)
    content_end = len(text) if section < 0 else section
    errors = _stray_tokens(text, 0, content_end, "in the content")
    result = ParsedAssistant(text[:content_end], [], errors)
    if section < 0:
        return result
    pos = section + len(TOOL_CALLS_SECTION_BEGIN)
    section_end = text.find(TOOL_CALLS_SECTION_END, pos)
    if section_end < 0:
        errors.append(ChatParseError("unterminated_section", f"{TOOL_CALLS_SECTION_BEGIN} is never closed by "
                                     f"{TOOL_CALLS_SECTION_END}", (section, len(text))))
        body_end = len(text)
    else:
        body_end = section_end
        after = section_end + len(TOOL_CALLS_SECTION_END)
        if text[after:].strip():
            errors.append(ChatParseError("text_after_section", f"text after {TOOL_CALLS_SECTION_END}",
                                         (after, len(text))))
    n_calls = 0
    while pos < body_end:
        begin = text.find(TOOL_CALL_BEGIN, pos, body_end)
        gap_end = body_end if begin < 0 else begin
        if text[pos:gap_end].strip():
            stray = _stray_tokens(text, pos, gap_end, "between tool calls")
            errors.extend(stray or [ChatParseError("unexpected_text", "text between tool calls", (pos, gap_end))])
        if begin < 0:
            break
        start = begin + len(TOOL_CALL_BEGIN)
        end = text.find(TOOL_CALL_END, start, body_end)
        if end < 0:
            errors.append(ChatParseError("unterminated_call", f"{TOOL_CALL_BEGIN} is never closed by "
                                         f"{TOOL_CALL_END}", (begin, body_end)))
            break
        expected = None if first_call_index is None else first_call_index + n_calls
        call, error = _parse_call(text, start, end, by_name, expected)
        n_calls += 1
        if call is not None:
            result.tool_calls.append(call)
        else:
            errors.append(error)
        pos = end + len(TOOL_CALL_END)
    return result
