"""Tokenizers: a byte-level one for the tiny preset and the Kimi K2 tiktoken BPE.

Both follow one small interface (`Tokenizer`): `encode(text, allow_special=False) -> list[int]`,
`decode(ids) -> str`, `token_to_id(name) -> int`, and the attributes `vocab_size`, `bos_id`, `eos_id`, `pad_id`
and `special_tokens` ({name: id}). Special-token strings in a text (e.g. "<|im_end|>") become their ids only with
allow_special=True (as when encoding a rendered chat); by default they are encoded as ordinary text. Encoding with
specials splits the text at them first, so encode(a + b) == encode(a) + encode(b) whenever a ends or b begins
with a special token (kimi_jax.chat.encode relies on it for its loss masks).

ByteTokenizer (vocab 272, the tiny preset's vocab): UTF-8 bytes map to ids 0..255. BOS = 0xFE (254),
EOS = 0xFF (255), PAD = 0xFD (253) are byte values that never occur in UTF-8 (0xF5..0xFF are invalid lead
bytes), so they cannot collide with text. Ids 256..265 are the Kimi chat special tokens (CHAT_SPECIAL_TOKENS, in
that order: <|im_end|> 256, <|im_user|> 257, <|im_assistant|> 258, <|im_system|> 259, <|im_middle|> 260,
<|tool_calls_section_begin|> 261, <|tool_calls_section_end|> 262, <|tool_call_begin|> 263,
<|tool_call_argument_begin|> 264, <|tool_call_end|> 265), so a tiny model can learn the real chat format;
266..271 are reserved (`<|reserved_token_{id}|>`). `decode` drops BOS/EOS/PAD, renders the other special ids as
their names and any invalid UTF-8 left over (a model's samples) as U+FFFD.

KimiTokenizer: the Kimi K2 `tiktoken.model` file (one `<base64 token> <rank>` per line; 163,584 ranks for K2)
plus 256 reserved special tokens at ids len(ranks) .. len(ranks) + 255, named as in the checkpoint's
tokenizer_config.json ([BOS] +0, [EOS] +1, <|im_end|> +2, ... [UNK] +254, [PAD] +255; the unnamed ones are
`<|reserved_token_{id}|>`), pre-tokenised with `KIMI_PAT_STR`, the `pat_str` of Kimi K2's
tokenization_kimi.py (Han runs split from other letters, digits in groups of at most 3).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from typing import Protocol, Sequence

import tiktoken


# The special tokens of the Kimi-K2-Instruct chat template (kimi_jax.chat), in ByteTokenizer id order.
CHAT_SPECIAL_TOKENS = (
    "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>",
    "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>",
    "<|tool_call_argument_begin|>", "<|tool_call_end|>",
)


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    special_tokens: dict[str, int]

    def encode(self, text: str, allow_special: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_to_id(self, token: str) -> int: ...


def _special_pattern(names) -> re.Pattern:
    """A regex that finds any of `names` (longest first, so no name hides a longer one)."""
    return re.compile("|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)))


def _split_specials(text: str, pattern: re.Pattern) -> list[tuple[str, bool]]:
    """text -> [(piece, is_special)] in order; ordinary pieces are non-empty."""
    pieces, start = [], 0
    for m in pattern.finditer(text):
        if m.start() > start:
            pieces.append((text[start:m.start()], False))
        pieces.append((m.group(), True))
        start = m.end()
    if start < len(text):
        pieces.append((text[start:], False))
    return pieces


def _token_to_id(tokenizer, token: str) -> int:
    if token not in tokenizer.special_tokens:
        raise KeyError(f"{token!r} is not a special token of {type(tokenizer).__name__}")
    return tokenizer.special_tokens[token]


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255 (BOS/EOS/PAD on bytes UTF-8 never uses), chat special tokens at 256..265,
    ids 266..271 reserved; vocab 272."""

    vocab_size = 272
    bos_id = 0xFE
    eos_id = 0xFF
    pad_id = 0xFD

    def __init__(self):
        first_reserved = 256 + len(CHAT_SPECIAL_TOKENS)
        self.special_tokens = {"[PAD]": self.pad_id, "[BOS]": self.bos_id, "[EOS]": self.eos_id,
                               **{name: 256 + k for k, name in enumerate(CHAT_SPECIAL_TOKENS)},
                               **{f"<|reserved_token_{i}|>": i for i in range(first_reserved, self.vocab_size)}}
        self._names = {i: name for name, i in self.special_tokens.items()}
        self._pattern = _special_pattern(self.special_tokens)

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Text -> UTF-8 bytes; with allow_special=True special-token names become their ids."""
        if not allow_special:
            return list(text.encode("utf-8", errors="surrogatepass"))
        ids: list[int] = []
        for piece, special in _split_specials(text, self._pattern):
            ids.extend([self.special_tokens[piece]] if special else piece.encode("utf-8", errors="surrogatepass"))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text: BOS/EOS/PAD dropped, the other special ids as their names, invalid UTF-8 as U+FFFD."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ByteTokenizer.decode: ids {bad[:5]} are outside 0..{self.vocab_size - 1}")
        parts, run = [], []
        for i in ids:
            if i in (self.bos_id, self.eos_id, self.pad_id):
                continue
            if i < 256:
                run.append(i)
                continue
            parts.append(bytes(run).decode("utf-8", errors="replace"))
            parts.append(self._names[i])
            run = []
        parts.append(bytes(run).decode("utf-8", errors="replace"))
        return "".join(parts)

    def token_to_id(self, token: str) -> int:
        """Id of a special token by name, e.g. "<|im_end|>" -> 256."""
        return _token_to_id(self, token)


# TikTokenTokenizer.pat_str of Kimi K2's tokenization_kimi.py (Hugging Face moonshotai/Kimi-K2-*), joined by "|".
KIMI_PAT_STR = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"""
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"""
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

NUM_RESERVED_SPECIAL_TOKENS = 256

# Named special tokens of Kimi K2 (tokenizer_config.json added_tokens_decoder), as offsets from len(ranks):
# with K2's 163,584 ranks, [BOS] = 163584, [EOS] = 163585, <|im_end|> = 163586, ... [PAD] = 163839.
KIMI_SPECIAL_OFFSETS = {
    "[BOS]": 0, "[EOS]": 1, "<|im_end|>": 2, "<|im_user|>": 3, "<|im_assistant|>": 4,
    "<|start_header_id|>": 6, "<|end_header_id|>": 7, "[EOT]": 9, "<|im_system|>": 10,
    "<|tool_calls_section_begin|>": 11, "<|tool_calls_section_end|>": 12, "<|tool_call_begin|>": 13,
    "<|tool_call_argument_begin|>": 14, "<|tool_call_end|>": 15, "<|im_middle|>": 17,
    "[UNK]": 254, "[PAD]": 255,
}

# Longest run of whitespace / non-whitespace characters handed to tiktoken in one piece (its regex engine
# can overflow on longer runs); the same bound as tokenization_kimi.py.
_MAX_RUN_CHARS = 25_000


def read_bpe_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Parse a tiktoken ranks file (`<base64 token> <rank>` per line) -> {token bytes: rank}.

    The ranks must be exactly 0..n-1 and include all 256 single bytes (so every text can be encoded);
    errors name the file and line."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ValueError(f"cannot read BPE ranks file {path}: {e}") from e
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError("expected 2 fields")
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (ValueError, binascii.Error) as e:
            raise ValueError(f"{path}:{lineno}: expected '<base64 token> <rank>', got {line[:80]!r} ({e})") from e
        if token in ranks:
            raise ValueError(f"{path}:{lineno}: token {token!r} appears twice")
        ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks must be exactly 0..{len(ranks) - 1} without gaps or repeats")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{path}: missing single-byte tokens for bytes {missing[:8]} ({len(missing)} in all)")
    return ranks


def _split_long_runs(text: str, limit: int = _MAX_RUN_CHARS) -> list[str]:
    """Cut `text` so that no piece has a run of more than `limit` whitespace or non-whitespace chars."""
    pieces, start, run, run_is_space = [], 0, 0, None
    for i, ch in enumerate(text):
        is_space = ch.isspace()
        run = run + 1 if is_space == run_is_space else 1
        run_is_space = is_space
        if run > limit:
            pieces.append(text[start:i])
            start, run = i, 1
    pieces.append(text[start:])
    return pieces


class KimiTokenizer:
    """Kimi K2 BPE: tiktoken over the ranks file with KIMI_PAT_STR and the 256 reserved special tokens."""

    def __init__(self, ranks: dict[bytes, int], name: str = "kimi_k2"):
        n = len(ranks)
        named = {offset: token for token, offset in KIMI_SPECIAL_OFFSETS.items()}
        self.special_tokens = {named.get(k, f"<|reserved_token_{n + k}|>"): n + k
                               for k in range(NUM_RESERVED_SPECIAL_TOKENS)}
        self.num_base_tokens = n
        self.vocab_size = n + NUM_RESERVED_SPECIAL_TOKENS
        self.bos_id = self.special_tokens["[BOS]"]
        self.eos_id = self.special_tokens["[EOS]"]
        self.pad_id = self.special_tokens["[PAD]"]
        self.unk_id = self.special_tokens["[UNK]"]
        self._encoding = tiktoken.Encoding(name=name, pat_str=KIMI_PAT_STR, mergeable_ranks=ranks,
                                           special_tokens=self.special_tokens)
        self._pattern = _special_pattern(self.special_tokens)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> KimiTokenizer:
        """Load a `tiktoken.model` ranks file (e.g. from a Kimi K2 checkpoint directory)."""
        return cls(read_bpe_ranks(path), name=os.path.basename(os.fspath(path)))

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Text -> ids. Special-token strings in `text` (e.g. "<|im_end|>") become their special ids only
        with allow_special=True (as in chat templates); by default they are encoded as ordinary text."""
        pieces = _split_specials(text, self._pattern) if allow_special else [(text, False)]
        ids: list[int] = []
        for piece, special in pieces:
            if special:
                ids.append(self.special_tokens[piece])
                continue
            for run in _split_long_runs(piece):
                ids.extend(self._encoding.encode_ordinary(run))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text; special ids render as their names, invalid UTF-8 as U+FFFD."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"KimiTokenizer.decode: ids {bad[:5]} are outside 0..{self.vocab_size - 1}")
        return self._encoding.decode(ids, errors="replace")

    def token_to_id(self, token: str) -> int:
        """Id of a special token by name, e.g. "<|im_end|>"."""
        return _token_to_id(self, token)


def load_tokenizer(spec: str) -> ByteTokenizer | KimiTokenizer:
    """"byte" -> ByteTokenizer(); a path to a tiktoken ranks file -> KimiTokenizer.from_file(path)."""
    if spec == "byte":
        return ByteTokenizer()
    if os.path.isdir(spec):
        spec = os.path.join(spec, "tiktoken.model")
    if not os.path.isfile(spec):
        raise ValueError(f"tokenizer must be 'byte' or a tiktoken.model file (or a directory holding one); "
                         f"{spec!r} is neither")
    return KimiTokenizer.from_file(spec)
