"""kimi_jax.chat.encode: ids equal the tokenizer on the rendered text, the loss mask covers exactly the
assistant turns; with the byte tokenizer and with the Kimi BPE on a small ranks file made here."""

import base64
import json
import re
from pathlib import Path

import pytest

from kimi_jax.chat import encode, stop_token_ids
from kimi_jax.data import ByteTokenizer, KimiTokenizer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "chat"
CASES = json.loads((FIXTURES / "rendered.json").read_text(encoding="utf-8"))["cases"]
ASSISTANT_BODY = re.compile(r"<\|im_assistant\|>assistant<\|im_middle\|>(.*?<\|im_end\|>)", re.DOTALL)
# Merges on top of the 256 bytes, chosen to straddle the template's segment boundaries if they were not split
# at the special tokens first ("t<|", "|>" ...) and to merge inside them ("assistant", "functions").
MERGES = [b"as", b"ass", b"assi", b"assist", b"assistant", b"|>", b"t<", b"t<|", b">a", b"fu", b"func", b"functions",
          b"  ", b"\n ", b'{"', b'":', b"Be", b"Bei", b"Beijing"]


@pytest.fixture(scope="module")
def kimi(tmp_path_factory):
    tokens = [bytes([b]) for b in range(256)] + MERGES
    path = tmp_path_factory.mktemp("kimi") / "tiktoken.model"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))
    return KimiTokenizer.from_file(path)


def masked_runs(ids, mask):
    runs, run = [], []
    for token, m in zip(ids, mask):
        if m:
            run.append(token)
        elif run:
            runs, run = runs + [run], []
    return runs + ([run] if run else [])


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
@pytest.mark.parametrize("which", ["byte", "kimi"])
def test_ids_are_the_rendered_text_and_the_mask_is_the_assistant_turns(case, which, kimi):
    tok = ByteTokenizer() if which == "byte" else kimi
    ids, mask = encode(tok, case["messages"], case["tools"], case["add_generation_prompt"])
    assert len(ids) == len(mask) and set(mask) <= {0, 1}
    assert ids == tok.encode(case["expected"], allow_special=True)
    bodies = ASSISTANT_BODY.findall(case["expected"])
    assert [tok.decode(run) for run in masked_runs(ids, mask)] == bodies
    assert mask[-1] == (0 if case["add_generation_prompt"] or not bodies else 1)


def test_byte_encoding_of_a_small_dialogue_by_hand():
    tok = ByteTokenizer()
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "f", "arguments": {}}}]},
                {"role": "tool", "content": "R"}, {"role": "assistant", "content": "A"}]
    ids, mask = encode(tok, messages, add_generation_prompt=True)
    b = lambda s: list(s.encode())  # noqa: E731
    header = [258] + b("assistant") + [260]
    expected = [
        ([259] + b("system") + [260] + b("S") + [256] + [257] + b("user") + [260] + b("Q") + [256] + header, 0),
        ([261, 263] + b("functions.f:0") + [264] + b("{}") + [265, 262, 256], 1),
        ([259] + b("tool") + [260] + b("## Return of functions.f:0\n    R") + [256] + header, 0),
        (b("A") + [256], 1),
        (header, 0)]
    assert ids == [t for part, _ in expected for t in part]
    assert mask == [m for part, m in expected for _ in part]


def test_the_kimi_merges_are_used(kimi):
    ids, _ = encode(kimi, next(c for c in CASES if c["name"] == "single_call_dict_arguments")["messages"])
    assert kimi.token_to_id("<|tool_call_begin|>") in ids
    assert 256 + MERGES.index(b"assistant") in ids and 256 + MERGES.index(b"functions") in ids
    assert 256 + MERGES.index(b"t<|") not in ids  # the text never merges into a special token


def test_stop_token_ids(kimi):
    assert stop_token_ids(ByteTokenizer()) == [256, 255]
    n = kimi.num_base_tokens
    assert stop_token_ids(kimi) == [n + 2, n + 1]
