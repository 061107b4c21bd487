"""A tokenizer's vocabulary for masking: token bytes, how each token behaves inside a free string
(`_split_plain`), VocabIndex (the tokens' bytes sorted: an implicit trie) and vocab_index (cached)."""

from __future__ import annotations

import bisect
import threading
import weakref
from typing import Any

import numpy as np

from kimi_jax.chat.template import IM_ASSISTANT, IM_END, IM_MIDDLE, IM_SYSTEM, IM_USER, TOOL_CALLS_SECTION_BEGIN

from .config import _ALL_CHAT_NAMES, ATOMS
from .grammar import _BYTE, _UTF8_LEAD
from .regex import _LT, _PIPE

_TURN_TOKENS = (IM_END, IM_USER, IM_ASSISTANT, IM_SYSTEM, IM_MIDDLE)       # tokens that delimit a turn


def _token_bytes(tokenizer) -> dict[int, bytes]:
    """Ordinary token id -> its bytes (ByteTokenizer: the byte; KimiTokenizer: the BPE token's bytes; any
    other tokenizer needs a `token_bytes(id)` method)."""
    specials = set(tokenizer.special_tokens.values())
    if hasattr(tokenizer, "token_bytes"):
        return {i: tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size) if i not in specials}
    encoding = getattr(tokenizer, "_encoding", None)             # KimiTokenizer's tiktoken.Encoding
    if encoding is not None:
        return {i: encoding.decode_single_token_bytes(i) for i in range(tokenizer.num_base_tokens)}
    if tokenizer.vocab_size <= 512:                              # ByteTokenizer: ids < 256 are bytes
        return {i: bytes((i,)) for i in range(min(256, tokenizer.vocab_size)) if i not in specials}
    raise TypeError(f"cannot read the token bytes of {type(tokenizer).__name__}; give it a token_bytes(id) method")


# How a token behaves inside a string without pattern (see `_split_plain`).
PLAIN, CLOSES, OPENS_CHAR, ESCAPES, DEAD = range(5)


def _split_plain(data: bytes) -> tuple[int, int, bytes]:
    """A token as string content: its longest prefix of complete characters that are plain string content (no
    quote, backslash or control character, no '|' right after '<'), and what follows it -> (characters of the
    prefix, kind, tail). kind: PLAIN (nothing follows), CLOSES (a quote follows; tail: the bytes after it, which
    the enclosing JSON must take), OPENS_CHAR (a valid start of a UTF-8 character runs to the end), ESCAPES (a
    backslash follows) or DEAD (anything else: control character, '<|', invalid or stray UTF-8)."""
    i, chars, lt = 0, 0, False
    while i < len(data):
        b = data[i]
        if b < 0x80:
            if b == 0x22:
                return chars, CLOSES, data[i + 1:]
            if b == 0x5C:
                return chars, ESCAPES, b""
            if b < 0x20 or (b == _PIPE and lt):
                return chars, DEAD, b""
            lt, chars, i = b == _LT, chars + 1, i + 1
            continue
        if b not in _UTF8_LEAD:
            return chars, DEAD, b""
        _, rem, lo, hi = _UTF8_LEAD[b]
        j = i + 1
        while rem and j < len(data):
            if not lo <= data[j] <= hi:
                return chars, DEAD, b""
            lo, hi, j, rem = 0x80, 0xBF, j + 1, rem - 1
        if rem:
            return chars, OPENS_CHAR, b""
        lt, chars, i = False, chars + 1, j
    return chars, PLAIN, b""


def _group_ends(toks: list[bytes]) -> list[int]:
    """For each byte b: the index of the first token of the sorted `toks` that starts above b."""
    return [bisect.bisect_left(toks, _BYTE[b + 1]) if b < 255 else len(toks) for b in range(256)]


class VocabIndex:
    """A tokenizer's vocabulary for masking: the ordinary tokens' bytes sorted (`toks`, `ids`, `group_end`), the
    chat special tokens' ids by name (`atoms`), and per token id its behaviour inside a string without pattern
    (`_split_plain`: `prefix_chars`, `kind`, `pipe_first`; `tail_of`: index of its tail among the sorted distinct
    tails after a closing quote, `tails`; `escape_toks` / `quote_toks`: the tokens of kind ESCAPES / of kinds
    CLOSES and ESCAPES, sorted)."""

    def __init__(self, tokenizer):
        self.vocab_size = int(tokenizer.vocab_size)
        table = _token_bytes(tokenizer)
        self.bytes_of = table
        pairs = sorted((b, i) for i, b in table.items() if b)
        self.id_of = {b: i for b, i in pairs}
        self.toks = [b for b, _ in pairs]
        self.ids = np.array([i for _, i in pairs], np.int64)
        self.group_end = _group_ends(self.toks)
        self.max_len = max(len(b) for b in self.toks)
        self.atoms = {name: tokenizer.special_tokens[name] for name in _ALL_CHAT_NAMES
                      if name in tokenizer.special_tokens}
        self.atom_of = {i: name for name, i in self.atoms.items()}
        missing = [a for a in (TOOL_CALLS_SECTION_BEGIN,) + ATOMS if a not in self.atoms]
        if missing:
            raise ValueError(f"{type(tokenizer).__name__} lacks the chat special tokens {missing}")
        self.section_begin = self.atoms[TOOL_CALLS_SECTION_BEGIN]
        self.turn_ids = {self.atoms[n] for n in _TURN_TOKENS if n in self.atoms}
        self.prefix_chars = np.zeros(self.vocab_size, np.int32)
        self.kind = np.full(self.vocab_size, DEAD, np.int8)
        self.pipe_first = np.zeros(self.vocab_size, bool)
        tails: dict[int, bytes] = {}
        for i, b in table.items():
            if b:
                self.prefix_chars[i], self.kind[i], tail = _split_plain(b)
                self.pipe_first[i] = b[0] == _PIPE
                if self.kind[i] == CLOSES:
                    tails[i] = tail
        self.tails = sorted(set(tails.values()) - {b""})
        position = {t: k for k, t in enumerate(self.tails)}
        self.tail_of = np.full(self.vocab_size, -1, np.int64)         # -1: nothing after the quote
        for i, t in tails.items():
            self.tail_of[i] = position.get(t, -1)
        self.tail_ids = np.arange(len(self.tails), dtype=np.int64)
        self.tail_group_end = _group_ends(self.tails)
        escapes = [(b, i) for b, i in pairs if self.kind[i] == ESCAPES]
        self.escape_toks = [b for b, _ in escapes]
        self.escape_ids = np.array([i for _, i in escapes], np.int64)
        self.escape_group_end = _group_ends(self.escape_toks)
        quotes = [(b, i) for b, i in pairs if self.kind[i] in (CLOSES, ESCAPES)]
        self.quote_toks = [b for b, _ in quotes]                      # tokens that close or escape, sorted
        self.quote_ids = np.array([i for _, i in quotes], np.int64)
        self.quote_group_end = _group_ends(self.quote_toks)


_VOCABS: "weakref.WeakKeyDictionary[Any, VocabIndex]" = weakref.WeakKeyDictionary()
_VOCABS_LOCK = threading.Lock()


def vocab_index(tokenizer) -> VocabIndex:
    """The (cached) VocabIndex of a tokenizer."""
    with _VOCABS_LOCK:
        index = _VOCABS.get(tokenizer)
        if index is None:
            index = _VOCABS[tokenizer] = VocabIndex(tokenizer)
        return index
