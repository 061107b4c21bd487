"""A dialogue as token ids with a loss mask over the assistant's turns."""

from __future__ import annotations

from typing import Sequence

from kimi_jax.chat.template import IM_END, Message, render_segments


def encode(tokenizer, messages: Sequence[Message], tools: Sequence[Message] | None = None,
           add_generation_prompt: bool = False, *, canonical_ids: bool = True) -> tuple[list[int], list[int]]:
    """-> (ids, loss_mask), two lists of one length: ids == tokenizer.encode(render(...), allow_special=True), and
    loss_mask[t] = 1 exactly on the tokens of assistant turns (content, tool calls and the turn's closing
    <|im_end|>), 0 on everything else (tool declaration, system/user/tool turns, each assistant turn's
    <|im_assistant|>assistant<|im_middle|> header, the generation prompt). tokenizer: ByteTokenizer or
    KimiTokenizer (any Tokenizer whose encode splits at special tokens)."""
    ids: list[int] = []
    mask: list[int] = []
    for text, is_assistant in render_segments(messages, tools, add_generation_prompt, canonical_ids=canonical_ids):
        piece = tokenizer.encode(text, allow_special=True)
        ids.extend(piece)
        mask.extend([int(is_assistant)] * len(piece))
    return ids, mask


def stop_token_ids(tokenizer) -> list[int]:
    """The ids that end an assistant turn: [<|im_end|>, the tokenizer's EOS]."""
    return [tokenizer.token_to_id(IM_END), tokenizer.eos_id]
