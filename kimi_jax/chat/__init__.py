"""The Kimi-K2-Instruct chat format: render dialogues (with tool calls) exactly as the official template does,
encode them to token ids with an assistant loss mask, and parse generated assistant turns back into content
and tool calls."""

from kimi_jax.chat.encode import encode, stop_token_ids
from kimi_jax.chat.parse import ChatParseError, ParsedAssistant, parse_assistant
from kimi_jax.chat.template import (DEFAULT_SYSTEM_PROMPT, GENERATION_PROMPT, canonical_call_id, render,
                                    render_segments, with_canonical_ids)

__all__ = [
    "ChatParseError", "DEFAULT_SYSTEM_PROMPT", "GENERATION_PROMPT", "ParsedAssistant", "canonical_call_id", "encode",
    "parse_assistant", "render", "render_segments", "stop_token_ids", "with_canonical_ids",
]
