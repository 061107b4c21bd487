"""Tokenizers: the byte tokenizer and the Kimi tiktoken BPE loader on a small ranks file made here, and their
shared special-token interface."""

import base64
import itertools

import pytest
import tiktoken

from kimi_jax.data.tokenizers import (CHAT_SPECIAL_TOKENS, KIMI_PAT_STR, KIMI_SPECIAL_OFFSETS, ByteTokenizer,
                                      KimiTokenizer, _split_long_runs, load_tokenizer)

TEXTS = ["", "hello world", "It's 12345 o'clock.\n\n  indented\tx", "中文English混合", "naïve café 🙂 Ωμέγα",
         "def f(x):\n    return x ** 2  # comment\n"]


# --- ByteTokenizer ---------------------------------------------------------------------------------------

def test_byte_tokenizer_is_utf8_bytes_and_round_trips():
    tok = ByteTokenizer()
    assert tok.vocab_size == ByteTokenizer.vocab_size == 272
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text


def test_byte_tokenizer_specials_never_occur_in_utf8_text():
    tok = ByteTokenizer()
    specials = {tok.bos_id, tok.eos_id, tok.pad_id}
    assert specials == {0xFE, 0xFF, 0xFD}
    # one character of every UTF-8 length (1..4 bytes), including the largest code point
    ids = tok.encode("a\u00ff\u07ff\u0800\uffff\U00010000\U0010ffff")
    assert max(ids) < 0xF5 and not specials & set(ids)
    assert tok.decode([tok.bos_id] + tok.encode("hé") + [tok.eos_id, tok.pad_id]) == "hé"
    assert tok.decode([0xC3]) == "\ufffd"  # a truncated sample decodes with a replacement character
    with pytest.raises(ValueError, match="outside 0..271"):
        tok.decode([272])


def test_byte_tokenizer_chat_special_ids():
    tok = ByteTokenizer()
    table = {"<|im_end|>": 256, "<|im_user|>": 257, "<|im_assistant|>": 258, "<|im_system|>": 259,
             "<|im_middle|>": 260, "<|tool_calls_section_begin|>": 261, "<|tool_calls_section_end|>": 262,
             "<|tool_call_begin|>": 263, "<|tool_call_argument_begin|>": 264, "<|tool_call_end|>": 265}
    assert {name: tok.token_to_id(name) for name in CHAT_SPECIAL_TOKENS} == table
    assert (tok.token_to_id("[BOS]"), tok.token_to_id("[EOS]"), tok.token_to_id("[PAD]")) == (254, 255, 253)
    assert tok.token_to_id("<|reserved_token_266|>") == 266 and tok.token_to_id("<|reserved_token_271|>") == 271
    assert sorted(tok.special_tokens.values()) == [253, 254, 255] + list(range(256, 272))
    with pytest.raises(KeyError, match="not a special token of ByteTokenizer"):
        tok.token_to_id("<|im_start|>")


def test_byte_tokenizer_special_strings_are_text_unless_allowed():
    tok = ByteTokenizer()
    text = "a<|im_end|>b<|tool_call_begin|>é[EOS]"
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.encode(text, allow_special=True) == [97, 256, 98, 263, 0xC3, 0xA9, 255]
    # decode: chat specials and reserved ids by name, BOS/EOS/PAD dropped, bytes around them decoded apart
    ids = [254, 0xC3, 0xA9, 258, 97, 266, 0xC3, 255, 253]
    assert tok.decode(ids) == "é<|im_assistant|>a<|reserved_token_266|>\ufffd"
    assert tok.decode(tok.encode("<|im_user|>user<|im_middle|>hi<|im_end|>", allow_special=True)) == \
        "<|im_user|>user<|im_middle|>hi<|im_end|>"


# --- Kimi BPE ------------------------------------------------------------------------------------------------

# Merges written by hand on top of the 256 single bytes (all ranked in reverse byte order).
HAN = "文".encode()
MERGES = [b"th", b"the", b" the", HAN[:2], HAN, HAN + b"E", b"12", b"123", b"1234", b"45"]


def write_ranks(path, tokens):
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))
    return path


@pytest.fixture
def kimi(tmp_path):
    tokens = [bytes([b]) for b in reversed(range(256))] + MERGES
    return KimiTokenizer.from_file(write_ranks(tmp_path / "tiktoken.model", tokens)), len(tokens)


def merge_id(token: bytes) -> int:
    return 256 + MERGES.index(token)


def test_kimi_special_offsets_give_the_published_k2_ids():
    # REFERENCE.md / the K2 tokenizer_config: 163,584 ranks, then these ids.
    k2 = {"[BOS]": 163584, "[EOS]": 163585, "<|im_end|>": 163586, "<|im_user|>": 163587,
          "<|im_assistant|>": 163588, "<|im_system|>": 163594, "<|im_middle|>": 163601,
          "<|tool_calls_section_begin|>": 163595, "<|tool_calls_section_end|>": 163596,
          "<|tool_call_begin|>": 163597, "<|tool_call_argument_begin|>": 163598, "<|tool_call_end|>": 163599,
          "[UNK]": 163838, "[PAD]": 163839}
    for name, token_id in k2.items():
        assert 163584 + KIMI_SPECIAL_OFFSETS[name] == token_id, name


def test_kimi_special_tokens_start_at_len_ranks(kimi):
    tok, n = kimi
    assert n == 266 and tok.num_base_tokens == n and tok.vocab_size == n + 256
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (n, n + 1, n + 255, n + 254)
    assert tok.token_to_id("<|im_end|>") == n + 2
    assert tok.token_to_id("<|im_middle|>") == n + 17
    assert [tok.token_to_id(t) for t in ("<|tool_calls_section_begin|>", "<|tool_call_end|>")] == [n + 11, n + 15]
    assert tok.token_to_id(f"<|reserved_token_{n + 5}|>") == n + 5
    assert sorted(tok.special_tokens.values()) == list(range(n, n + 256))
    assert tok.decode([n + 2]) == "<|im_end|>"


def test_kimi_encode_decode_round_trip(kimi):
    tok, _ = kimi
    for text in TEXTS + [" " * 30_000 + "x" * 30_001]:  # runs longer than the 25,000-char split
        ids = tok.encode(text)
        assert all(0 <= i < tok.num_base_tokens for i in ids)
        assert tok.decode(ids) == text
    assert tok.encode("the") == [merge_id(b"the")]
    assert tok.encode("in the") == [255 - ord("i"), 255 - ord("n"), merge_id(b" the")]


def test_kimi_pre_tokenisation_splits_han_and_digit_groups(kimi):
    tok, _ = kimi
    ids = tok.encode("中文English")
    assert merge_id(HAN) in ids and merge_id(HAN + b"E") not in ids  # Han run and Latin word are separate
    assert tok.encode("12345") == [merge_id(b"123"), merge_id(b"45")]  # digits in groups of at most 3
    # control: a pattern without those rules merges across both boundaries with the same ranks
    ranks = {t: r for r, t in enumerate([bytes([b]) for b in reversed(range(256))] + MERGES)}
    plain = tiktoken.Encoding("plain", pat_str=r"\p{L}+|\p{N}+|\s+|[^\s\p{L}\p{N}]+", mergeable_ranks=ranks,
                              special_tokens={})
    assert merge_id(HAN + b"E") in plain.encode("中文English")
    assert plain.encode("12345") == [merge_id(b"1234"), 255 - ord("5")]
    assert "\\p{Han}" in KIMI_PAT_STR


def test_kimi_special_strings_are_text_unless_allowed(kimi):
    tok, n = kimi
    text = "a<|im_end|>b"
    plain = tok.encode(text)
    assert max(plain) < n and tok.decode(plain) == text
    assert tok.encode(text, allow_special=True) == [255 - ord("a"), n + 2, 255 - ord("b")]
    assert tok.encode("the<|tool_call_begin|>[BOS]<|reserved_token_" + str(n + 5) + "|>", allow_special=True) == \
        [merge_id(b"the"), n + 13, n, n + 5]


def test_kimi_encode_with_specials_splits_at_them_first(kimi):
    # encode(a + b) == encode(a) + encode(b) when the boundary is at a special token, also for long runs
    tok, _ = kimi
    a, b = "x" * 30_000 + "<|im_end|>", "y" * 30_000 + " the"
    both = tok.encode(a + b, allow_special=True)
    assert both == tok.encode(a, allow_special=True) + tok.encode(b, allow_special=True)
    assert tok.decode(both) == a + b


@pytest.mark.parametrize("make", [lambda tmp: ByteTokenizer(),
                                  lambda tmp: KimiTokenizer.from_file(write_ranks(tmp / "t.model",
                                                                                  [bytes([b]) for b in range(256)]))])
def test_both_tokenizers_share_the_chat_interface(tmp_path, make):
    tok = make(tmp_path)
    for name in CHAT_SPECIAL_TOKENS:
        token_id = tok.token_to_id(name)
        assert tok.special_tokens[name] == token_id < tok.vocab_size
        assert tok.encode(name, allow_special=True) == [token_id] and tok.decode([token_id]) == name
        assert tok.encode(name) != [token_id]
    assert tok.token_to_id("[EOS]") == tok.eos_id and tok.token_to_id("[BOS]") == tok.bos_id


@pytest.mark.parametrize("lines, message", [
    (["YQ== 0", "bad_line_without_rank"], r"tiktoken.model:2: expected"),
    (["YQ== 0", "!!!! 1"], r"tiktoken.model:2: expected"),
    (["YQ== 0", "Yg== 2"], r"tiktoken.model: ranks must be exactly 0..1"),
    (["YQ== 0", "Yg== 1"], r"tiktoken.model: missing single-byte tokens"),
])
def test_malformed_ranks_file_error_names_the_file(tmp_path, lines, message):
    path = tmp_path / "tiktoken.model"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        KimiTokenizer.from_file(path)


def test_load_tokenizer(tmp_path):
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    write_ranks(tmp_path / "tiktoken.model", [bytes([b]) for b in range(256)])
    assert load_tokenizer(str(tmp_path)).vocab_size == 512
    assert load_tokenizer(str(tmp_path / "tiktoken.model")).eos_id == 257
    with pytest.raises(ValueError, match="neither"):
        load_tokenizer(str(tmp_path / "missing.model"))


def test_split_long_runs_bounds_every_run():
    text = "ab" + " " * 7 + "c" * 11 + "\n"
    pieces = _split_long_runs(text, limit=4)
    assert "".join(pieces) == text
    assert pieces == ["ab    ", "   cccc", "cccc", "ccc\n"]
    for piece in pieces:
        assert max(len(list(run)) for _, run in itertools.groupby(piece, str.isspace)) <= 4
