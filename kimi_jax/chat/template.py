"""The Kimi-K2-Instruct chat template in Python, byte-identical to the Jinja original.

The original is tests/fixtures/chat/chat_template.jinja (README there: where it comes from); transformers'
renderings of it are tests/fixtures/chat/rendered.json, which tests/chat/test_render.py compares with `render`.
A dialogue renders as

    [<|im_system|>tool_declare<|im_middle|>\\n  # Tools\\n  {tools as JSON}<|im_end|>]       only with tools
    [<|im_system|>system<|im_middle|>{DEFAULT_SYSTEM_PROMPT}<|im_end|>]                  unless messages[0] is system
    then per message: <|im_system|> / <|im_user|> / <|im_assistant|> + (message "name" or the role) + <|im_middle|>
    + the body + <|im_end|>, and with add_generation_prompt a final <|im_assistant|>assistant<|im_middle|>.

Bodies: text content (a string, or a list of {"type": "text", "text": ...} parts, concatenated); an assistant
turn with tool calls is its content followed by
    <|tool_calls_section_begin|>(<|tool_call_begin|>{id}<|tool_call_argument_begin|>{arguments}<|tool_call_end|>)*
    <|tool_calls_section_end|>
(arguments verbatim when a string, else JSON with ", " / ": " separators and non-ASCII kept); a tool result is
"## Return of {tool_call_id}\\n    {content}" (the template's indentation is part of the format).

Tool-call ids. The template renders whatever id the client gives, but the model was trained on
`functions.{name}:{idx}` with idx counting the calls of the whole dialogue from 0. By default (canonical_ids=True)
`render` therefore rewrites every call's id to that form and every tool result's `tool_call_id` to the id of
the call it answers: the pending (not yet answered) call whose client id, or canonical id, equals the result's
`tool_call_id`, else the oldest pending call (results answer calls in order). A tool result with no pending
call is an error. canonical_ids=False renders the ids exactly as given, as the template does (a missing id
renders as "").
"""

from __future__ import annotations

import json
from typing import Any, Sequence

IM_END, IM_USER, IM_ASSISTANT, IM_SYSTEM, IM_MIDDLE = (
    "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>")
TOOL_CALLS_SECTION_BEGIN, TOOL_CALLS_SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
TOOL_CALL_BEGIN, TOOL_CALL_ARGUMENT_BEGIN, TOOL_CALL_END = (
    "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>")

DEFAULT_SYSTEM_PROMPT = "You are Kimi, an AI assistant created by Moonshot AI."
GENERATION_PROMPT = f"{IM_ASSISTANT}assistant{IM_MIDDLE}"
ROLE_TOKENS = {"system": IM_SYSTEM, "user": IM_USER, "assistant": IM_ASSISTANT, "tool": IM_SYSTEM}

Message = dict[str, Any]


def tojson(value: Any) -> str:
    """The template's `tojson` as transformers defines it: json.dumps with ensure_ascii=False."""
    return json.dumps(value, ensure_ascii=False)


def canonical_call_id(name: str, idx: int) -> str:
    """`functions.{name}:{idx}`, the id form Kimi K2 was trained on (idx counts the dialogue's calls)."""
    return f"functions.{name}:{idx}"


def _jinja_str(message: Message, key: str) -> str:
    """`{{ message[key] }}`: "" when the key is missing, else str(value) (None renders as "None")."""
    return str(message[key]) if key in message else ""


def _call_name(call: Message, where: str) -> str:
    function = call.get("function") if isinstance(call, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: a tool call needs function.name (a non-empty string), got {call!r}")
    return name


def with_canonical_ids(messages: Sequence[Message]) -> list[Message]:
    """Copies of `messages` with tool-call ids `functions.{name}:{idx}` (idx over the dialogue) and each tool
    result's `tool_call_id` set to the id of the call it answers (module docstring); the input is not changed."""
    out, pending, counter = [], [], 0  # pending: [(client id, canonical id)] of calls not yet answered
    for i, message in enumerate(messages):
        if message.get("role") == "assistant" and message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                new_id = canonical_call_id(_call_name(call, f"message {i}"), counter)
                counter += 1
                pending.append((call.get("id"), new_id))
                calls.append({**call, "id": new_id})
            message = {**message, "tool_calls": calls}
        elif message.get("role") == "tool":
            if not pending:
                raise ValueError(f"message {i}: tool result (tool_call_id={message.get('tool_call_id')!r}) "
                                 f"answers no pending tool call")
            given = message.get("tool_call_id")
            k = next((k for k, ids in enumerate(pending) if given is not None and given in ids), 0)
            message = {**message, "tool_call_id": pending.pop(k)[1]}
        out.append(message)
    return out


def _text_content(message: Message, where: str) -> str:
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or "text" not in part or part.get("type") == "image" \
                    or "image" in part or "image_url" in part:
                raise ValueError(f"{where}: only text content parts ({{'type': 'text', 'text': ...}}) are "
                                 f"supported, got {part!r}")
            parts.append(str(part["text"]))
        return "".join(parts)
    raise ValueError(f"{where}: content must be a string, a list of text parts or None, got {type(content).__name__}")


def _tool_calls(message: Message, where: str) -> str:
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise ValueError(f"{where}: an assistant turn with tool_calls needs string content (or None), "
                         f"got {type(content).__name__}")
    calls = []
    for k, call in enumerate(message["tool_calls"]):
        _call_name(call, where)
        if "arguments" not in call["function"]:
            raise ValueError(f"{where}: tool call {k} has no function.arguments")
        args = call["function"]["arguments"]
        args = args if isinstance(args, str) else tojson(args)
        calls.append(f"{TOOL_CALL_BEGIN}{_jinja_str(call, 'id')}{TOOL_CALL_ARGUMENT_BEGIN}{args}{TOOL_CALL_END}")
    return (content or "") + TOOL_CALLS_SECTION_BEGIN + "".join(calls) + TOOL_CALLS_SECTION_END


def _body(message: Message, where: str) -> str:
    role = message["role"]
    if role == "assistant" and message.get("tool_calls"):
        return _tool_calls(message, where)
    if role == "tool":
        if not isinstance(message.get("content"), str):
            raise ValueError(f"{where}: a tool result needs string content, got {message.get('content')!r}")
        return f"## Return of {_jinja_str(message, 'tool_call_id')}\n    {message['content']}"
    return _text_content(message, where)


def render_segments(messages: Sequence[Message], tools: Sequence[Message] | None = None,
                    add_generation_prompt: bool = False, *, canonical_ids: bool = True) -> list[tuple[str, bool]]:
    """The rendered dialogue as [(text, is_assistant)]: "".join(texts) == render(...). is_assistant marks each
    assistant turn's body and its closing <|im_end|> (what a model is trained to produce), not its
    <|im_assistant|>assistant<|im_middle|> header. Every segment boundary is next to a special token."""
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLE_TOKENS:
            raise ValueError(f"message {i}: role must be one of {sorted(ROLE_TOKENS)}, got {message!r}")
    if canonical_ids:
        messages = with_canonical_ids(messages)
    segments = []
    if tools:
        segments.append((f"{IM_SYSTEM}tool_declare{IM_MIDDLE}\n  # Tools\n  {tojson(list(tools))}{IM_END}", False))
    if messages and messages[0]["role"] != "system":
        segments.append((f"{IM_SYSTEM}system{IM_MIDDLE}{DEFAULT_SYSTEM_PROMPT}{IM_END}", False))
    for i, message in enumerate(messages):
        role = message["role"]
        header = f"{ROLE_TOKENS[role]}{message.get('name') or role}{IM_MIDDLE}"
        body = _body(message, f"message {i} ({role})") + IM_END
        segments.extend([(header, False), (body, True)] if role == "assistant" else [(header + body, False)])
    if add_generation_prompt:
        segments.append((GENERATION_PROMPT, False))
    return segments


def render(messages: Sequence[Message], tools: Sequence[Message] | None = None,
           add_generation_prompt: bool = False, *, canonical_ids: bool = True) -> str:
    """OpenAI-style messages (roles system/user/assistant/tool; assistant `tool_calls` with
    function.arguments a dict or a JSON string; tool results with `tool_call_id`) and OpenAI-style tools ->
    the Kimi-K2-Instruct prompt text, byte-identical to the Jinja template under transformers. Tool-call ids
    are made canonical unless canonical_ids=False (module docstring). Bad messages raise ValueError."""
    return "".join(text for text, _ in render_segments(messages, tools, add_generation_prompt,
                                                       canonical_ids=canonical_ids))
