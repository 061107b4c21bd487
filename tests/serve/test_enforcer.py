"""The tool-call enforcer: its automaton on hand-made sections, exact languages of small schemas, random walks
over the masks (every walk parses with no error and validates), the trie walk of a large vocabulary against
brute force, and the engine: enforced samples of a random model are well-formed, unenforced ones are not,
and an unconstrained neighbour's greedy tokens do not change."""

import json
import random

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest

import kimi_jax
from kimi_jax import chat
from kimi_jax.agentic.tools import load_tools, openai_form
from kimi_jax.data import ByteTokenizer
from kimi_jax.data.tokenizers import KimiTokenizer
from kimi_jax.serve import Engine, EngineConfig, Request, RequestError, trace_count
from kimi_jax.serve.enforcer import (ATOMS, EnforcerConfig, ToolCallEnforcer, ToolCallGrammar, UnsupportedSchema,
                                     allowed_tokens, vocab_index)
from kimi_jax.serve.enforcer.regex import _DFA
from kimi_jax.serve.protocol import APIError, chat_params

TOK = ByteTokenizer()
TOOLS = [openai_form(t) for t in load_tools()]
BY_NAME = {t["function"]["name"]: t for t in TOOLS}
SECTION_BEGIN, IM_END = TOK.token_to_id("<|tool_calls_section_begin|>"), TOK.token_to_id("<|im_end|>")
B, AB, E, SE = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>", "<|tool_calls_section_end|>"
SMALL = EnforcerConfig(max_string_len=12, max_array_items=3, max_calls=3)


def call(name, idx, args):
    return f"{B}functions.{name}:{idx}{AB}{args}{E}"


def tool(parameters, name="t"):
    return {"type": "function", "function": {"name": name, "description": "d", "parameters": parameters}}


def check_section(text, tools, first_call_index):
    """parse_assistant finds no error, and every call's arguments validate against its tool's schema."""
    parsed = chat.parse_assistant(text, tools, first_call_index=first_call_index)
    assert parsed.ok, (parsed.errors, text)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for k, c in enumerate(parsed.tool_calls):
        name = c["function"]["name"]
        assert c["id"] == f"functions.{name}:{first_call_index + k}"
        jsonschema.Draft202012Validator(schemas[name]).validate(json.loads(c["function"]["arguments"]))
    return parsed


# ------------------------------------------------------------------------------------------- the automaton
FORECAST = '{"city": "Paris", "days": 3}'
CASES = [   # (text after the section begin, first_call_index, ok, complete, where it dies: text before that point)
    (call("get_forecast", 0, FORECAST) + SE + "<|im_end|>", 0, True, True, None),
    (call("create_event", 4, '{"title": "x", "date": "2024-01-02", "start": "10:00", "end": "11:00", '
                             '"attendees": ["a", "b"]}') + call("get_order", 5, '{"order_id": 12}') + SE, 4, True, True,
     None),
    (call("write_file", 0, '{"path": "/a\\n", "content": "é\\"<x|\\/"}') + SE, 0, True, True, None),
    (call("search_flights", 0, '{"origin": "CDG", "destination": "JFK", "date": "2024-01-01", '
                               '"max_price": 0.5}') + SE, 0, True, True, None),
    (call("get_forecast", 0, FORECAST), 0, True, False, None),                          # unterminated section
    (f"{B}functions.get_forecast:0{AB}" + '{"city": "Par', 0, True, False, None),       # unterminated call
    (call("get_forecast", 1, FORECAST), 0, False, False, f"{B}functions.get_forecast:"),     # wrong index
    (call("get_forecastx", 0, FORECAST), 0, False, False, f"{B}functions.get_forecast"),    # unknown tool
    (call("get_forecast", 0, '{"city": "Paris"}'), 0, False, False,                       # missing "days"
     f'{B}functions.get_forecast:0{AB}{{"city": "Paris"'),
    (call("get_forecast", 0, '{"city": "Paris", "days": "3"}'), 0, False, False,            # wrong type
     f'{B}functions.get_forecast:0{AB}{{"city": "Paris", "days": '),
    (call("get_forecast", 0, '{"city": "Paris", "days": 8}'), 0, False, False,              # above maximum
     f'{B}functions.get_forecast:0{AB}{{"city": "Paris", "days": '),
    (call("get_forecast", 0, '{"city": "Paris" "days": 3}'), 0, False, False,               # bad JSON
     f'{B}functions.get_forecast:0{AB}{{"city": "Paris"'),
    (call("get_forecast", 0, '{"city": "Paris","days": 3}'), 0, False, False,               # not the canonical layout
     f'{B}functions.get_forecast:0{AB}{{"city": "Paris",'),
    (call("get_forecast", 0, '{"city": "", "days": 3}'), 0, False, False,                   # minLength 1
     f'{B}functions.get_forecast:0{AB}{{"city": "'),
    (call("list_events", 0, '{"date": "2024-1-02"}'), 0, False, False,                    # pattern
     f'{B}functions.list_events:0{AB}{{"date": "2024-1'),
    (call("write_file", 0, '{"path": "/a", "content": "a<|im_end"}'), 0, False, False,    # could spell a special token
     f'{B}functions.write_file:0{AB}{{"path": "/a", "content": "a<'),
    (call("create_note", 0, '{"title": "t", "body": "", "tags": ["a", "a"]}'), 0, False, False,   # uniqueItems
     f'{B}functions.create_note:0{AB}{{"title": "t", "body": "", "tags": ["a", "a'),
    (call("get_forecast", 0, '{"city": "Paris", "days": 3, "x": 1}'), 0, False, False,     # additionalProperties:
     f'{B}functions.get_forecast:0{AB}{{"city": "Paris", "days": 3'),                     # no "," once all keys are in
    (call("get_forecast", 0, '{"city": "Paris", "x": 1, "days": 3}'), 0, False, False,
     f'{B}functions.get_forecast:0{AB}{{"city": "Paris", "'),
    (call("search_flights", 0, '{"origin": "CDG", "destination": "JFK", "date": "2024-01-01", "max_price": 0}'), 0,
     False, False, f'{B}functions.search_flights:0{AB}{{"origin": "CDG", "destination": "JFK", "date": "2024-01-01", '
                   f'"max_price": 0'),                                                     # exclusiveMinimum 0
    (SE, 0, False, False, ""),                                                              # a section needs a call
    (call("get_forecast", 0, FORECAST) + "<|im_end|>", 0, False, False, call("get_forecast", 0, FORECAST)),
    (call("get_forecast", 0, FORECAST) + SE + "x", 0, False, False, call("get_forecast", 0, FORECAST) + SE),
]


@pytest.mark.parametrize("text, first, ok, complete, dies_after", CASES)
def test_automaton_accepts_valid_sections_and_rejects_malformed_ones(text, first, ok, complete, dies_after):
    grammar = ToolCallGrammar(TOOLS)
    result = grammar.check(text, first_call_index=first)
    assert (result.ok, result.complete) == (ok, complete)
    if dies_after is not None:
        assert text.startswith(dies_after) and result.offset == len(dies_after), (result, text[result.offset:])
    if ok and complete:
        check_section("<|tool_calls_section_begin|>" + text.removesuffix("<|im_end|>"), TOOLS, first)


def language(parameters, config=EnforcerConfig(), limit=5000):
    """Every argument text the automaton can write for one tool with these parameters (exhaustive search)."""
    grammar = ToolCallGrammar([tool(parameters)], config)
    start = grammar.feed_atom(grammar.feed_bytes(grammar.feed_atom(grammar.initial(), B), b"functions.t:0"), AB)
    out, todo = set(), [(start, b"")]
    while todo:
        stack, text = todo.pop()
        if grammar.feed_atom(stack, E) is not None:
            out.add(text.decode())
        for b in range(256):
            nxt = grammar.feed_byte(stack, b)
            if nxt is not None:
                todo.append((nxt, text + bytes([b])))
        assert len(out) < limit
    return out


def obj(props, required=None):
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False}


def test_exact_languages_of_small_schemas():
    assert language(obj({"d": {"type": "integer", "minimum": 1, "maximum": 7}})) == {
        f'{{"d": {i}}}' for i in range(1, 8)}
    assert language(obj({"d": {"type": "integer", "minimum": -2, "exclusiveMaximum": 1}})) == {
        '{"d": -2}', '{"d": -1}', '{"d": 0}', '{"d": -0}'}
    small = EnforcerConfig(max_int_digits=1, max_frac_digits=1)
    assert language(obj({"x": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}}), small) == {
        '{"x": 1}', '{"x": 1.0}', *(f'{{"x": 0.{k}}}' for k in range(1, 10))}
    assert language(obj({"u": {"type": "string", "enum": ["metric", "imperial"]}, "f": {"type": "boolean"}},
                        required=["u"])) == {
        '{"u": "metric"}', '{"u": "imperial"}', '{"f": true, "u": "metric"}', '{"f": false, "u": "metric"}',
        '{"f": true, "u": "imperial"}', '{"f": false, "u": "imperial"}', '{"u": "metric", "f": true}',
        '{"u": "metric", "f": false}', '{"u": "imperial", "f": true}', '{"u": "imperial", "f": false}'}
    assert language(obj({"c": {"type": "string", "pattern": "^[A-C]{2}$"}})) == {
        f'{{"c": "{a}{b}"}}' for a in "ABC" for b in "ABC"}
    assert language(obj({"t": {"type": "array", "items": {"enum": ["a", "b"]}, "uniqueItems": True}})) == {
        '{"t": []}', '{"t": ["a"]}', '{"t": ["b"]}', '{"t": ["a", "b"]}', '{"t": ["b", "a"]}'}
    # unique strings of one character from a 2-letter pattern: a third item is never offered
    assert language(obj({"t": {"type": "array", "items": {"type": "string", "pattern": "^[xy]$"},
                               "uniqueItems": True, "minItems": 2}})) == {'{"t": ["x", "y"]}', '{"t": ["y", "x"]}'}
    assert language(obj({"n": {"type": ["integer", "null"], "minimum": 5, "maximum": 6}})) == {
        '{"n": 5}', '{"n": 6}', '{"n": null}'}
    assert language(obj({"s": {"type": "string", "maxLength": 1, "pattern": "^[a-b\\u00e9]"}})) == {
        '{"s": "a"}', '{"s": "b"}', '{"s": "é"}'}


@pytest.mark.parametrize("pattern", ["^[0-9]{4}-[0-9]{2}-[0-9]{2}$", "^[0-2][0-9]:[0-5][0-9]$", "^ev[0-9]+$", "^/",
                                     "^[A-Z0-9]{6}$", "ab|c?d", "(?:x[^a-c]\\.)+$", "^\\w\\s\\d{1,2}", "a.c"])
def test_pattern_dfa_agrees_with_python_re(pattern):
    """On random strings (without '<|', which strings never hold), the DFA accepts exactly what re.search does,
    with \\d \\w \\s ASCII-only and a final $ meaning the end of the string (Python's also matches before a final
    newline); under Python's own flags the DFA's language is a subset."""
    import re
    dfa, rng = _DFA(pattern), random.Random(0)
    strict = pattern[:-1] + "\\Z" if pattern.endswith("$") else pattern
    alphabet = "09-:/evxabcdABZ.\n é\t|<_"
    for _ in range(3000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 11)))
        if rng.random() < 0.3:                                   # near-misses of the pattern's own strings
            s = {"^[0-9]{4}-[0-9]{2}-[0-9]{2}$": "2024-01-0", "^[0-2][0-9]:[0-5][0-9]$": "12:3",
                 "^ev[0-9]+$": "ev1", "^[A-Z0-9]{6}$": "AB12C"}.get(pattern, "") + s[:2]
        if "<|" in s:
            continue
        d = dfa.start
        for c in s:
            k = dfa.class_of(ord(c))
            d = dfa.trans[d][k] if d >= 0 and k >= 0 else -1
        assert (d >= 0 and dfa.accept[d]) == bool(re.search(strict, s, re.ASCII)), (pattern, s)
        assert not (d >= 0 and dfa.accept[d]) or re.search(pattern, s)


@pytest.mark.parametrize("parameters, match", [
    ({"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}, {"type": "integer"}]}}}, "anyOf"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/x"}}}, "\\$ref"),
    ({"type": "object", "properties": {"a": {}}}, "without a type"),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "(?=x)"}}}, "group extension"),
    ({"type": "object", "properties": {"a": {"type": "integer", "minimum": 3, "maximum": 2}}}, "satisfies"),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "^x{5}$", "maxLength": 3}}}, "matches"),
])
def test_unsupported_or_unsatisfiable_schemas_raise(parameters, match):
    with pytest.raises(UnsupportedSchema, match=match):
        ToolCallGrammar([tool(parameters)])


def random_walk(enforcer, rng, prompt=(SECTION_BEGIN,), check_cache=False):
    """Sample uniformly among the allowed tokens until the enforcer is done -> the generated tokens."""
    state, out = enforcer.start(list(prompt)), []
    while state.active:
        mask = state.mask()
        if check_cache:
            fresh = allowed_tokens(enforcer.grammar, enforcer.vocab, state.stack, use_cache=False, fast=False)
            np.testing.assert_array_equal(mask, fresh)
        ids = np.flatnonzero(mask)
        assert len(ids) > 0, state.stack                        # never stuck
        token = int(ids[rng.integers(len(ids))])
        assert state.advance(token)
        out.append(token)
    return out


def test_random_walks_over_the_masks_always_parse_and_validate():
    """300 walks over all shipped tools (byte tokenizer): every one ends with <|im_end|> in a section that
    parse_assistant parses with no error, with canonical ids counting on from 3, arguments valid for the schema."""
    enforcer = ToolCallEnforcer(TOOLS, TOK, first_call_index=3, config=SMALL)
    rng, names, bound = np.random.default_rng(0), set(), enforcer.grammar.max_section_tokens()
    for walk in range(300):
        tokens = random_walk(enforcer, rng, check_cache=walk < 5)
        assert tokens[-1] == IM_END and len(tokens) <= bound
        parsed = check_section(TOK.decode([SECTION_BEGIN] + tokens[:-1]), TOOLS, 3)
        assert 1 <= len(parsed.tool_calls) <= SMALL.max_calls
        names |= {c["function"]["name"] for c in parsed.tool_calls}
    assert len(names) >= 15                                      # the walks reached most of the 20 tools


def synthetic_kimi_tokenizer():
    """A KimiTokenizer over 256 bytes + ~3000 multi-byte tokens (JSON pieces, partial UTF-8, '<|', escapes)."""
    rng = random.Random(0)
    pieces = ['{"', '": "', '", "', '"}', '"]', '", ', '": ', 'functions', '.get', '_forecast', 'city', 'days', ':0',
              ':3', '12', '0.', '-1', ' "', '"', 'Paris', '<|', '|>', 'a<', '|a', '\\"', '\\n', '\\u', 'é', '中文',
              '": [', '], "', 'true', 'false', 'null}', '2024-', '-01', '10:00', '/a', 'ev12', 'AB', 'b"']
    tokens = {p.encode() for p in pieces} | {"é".encode()[:1] + b"a", "中".encode()[:2], b"a" + "中".encode()[:1]}
    alphabet = b'{}[]":, 0123456789.-abcdefgijklmnoprstuvyAZ_/\\<|' + "é中".encode()
    while len(tokens) < 3000:
        tokens.add(bytes(rng.choice(alphabet) for _ in range(rng.randint(2, 7))))
    ranks = {bytes([b]): b for b in range(256)}
    for t in sorted(tokens - set(ranks)):
        ranks[t] = len(ranks)
    return KimiTokenizer(ranks)


def test_large_vocab_trie_walk_equals_brute_force():
    """With a multi-byte vocabulary the trie walk (and its plain-string shortcut, and the cache) allow exactly the
    tokens whose bytes keep the automaton alive; walks over it parse and validate too."""
    tok = synthetic_kimi_tokenizer()
    tools = [BY_NAME[n] for n in ("get_forecast", "create_event", "search_flights", "create_note", "write_file")]
    enforcer = ToolCallEnforcer(tools, tok, config=SMALL)
    grammar, vocab = enforcer.grammar, enforcer.vocab
    begin = tok.token_to_id("<|tool_calls_section_begin|>")
    rng = np.random.default_rng(1)
    atoms = {tok.token_to_id(a): a for a in ATOMS}
    for walk in range(12):
        state, out = enforcer.start([begin]), []
        while state.active:
            mask = state.mask()
            if walk < 3:
                brute = np.zeros(tok.vocab_size, bool)
                for i in range(tok.vocab_size):
                    if i in atoms:
                        brute[i] = grammar.feed_atom(state.stack, atoms[i]) is not None
                    elif i < tok.num_base_tokens:
                        brute[i] = grammar.feed_bytes(state.stack, vocab.bytes_of[i]) is not None
                np.testing.assert_array_equal(mask, brute)
                np.testing.assert_array_equal(allowed_tokens(grammar, vocab, state.stack, use_cache=False), brute)
            ids = np.flatnonzero(mask)
            multi = [i for i in ids if i < tok.num_base_tokens and len(vocab.bytes_of[i]) > 1]
            pick = multi if multi and rng.random() < 0.7 else ids          # prefer multi-byte tokens
            token = int(pick[rng.integers(len(pick))])
            assert state.advance(token)
            out.append(token)
        assert out[-1] == tok.token_to_id("<|im_end|>")
        check_section(tok.decode([begin] + out[:-1]), tools, 0)


def brute_force_mask(grammar, tok, stack):
    vocab, atoms = vocab_index(tok), {tok.token_to_id(a): a for a in ATOMS}
    mask = np.zeros(tok.vocab_size, bool)
    for i in range(tok.vocab_size):
        if i in atoms:
            mask[i] = grammar.feed_atom(stack, atoms[i]) is not None
        elif i in vocab.bytes_of:
            mask[i] = grammar.feed_bytes(stack, vocab.bytes_of[i]) is not None
    return mask


def test_unique_string_items_with_a_multibyte_vocab():
    """Items of a uniqueItems array keep their text: the shortcut for tokens that fill such a string (and the walk of
    those that close it) still never repeats an item, as brute force says."""
    tok = synthetic_kimi_tokenizer()
    tags = tool(obj({"t": {"type": "array", "items": {"type": "string", "maxLength": 2}, "uniqueItems": True,
                           "minItems": 1, "maxItems": 4}}))
    enforcer = ToolCallEnforcer([tags], tok, config=SMALL)
    grammar, vocab = enforcer.grammar, enforcer.vocab
    begin = tok.token_to_id("<|tool_calls_section_begin|>")
    state = enforcer.start([begin, tok.token_to_id(B)] + tok.encode("functions.t:0") + [tok.token_to_id(AB)]
                           + tok.encode('{"t": ["ab", "a'))
    mask = state.mask()
    assert not mask[vocab.id_of[b"b"]] and not mask[vocab.id_of[b'b"']] and mask[vocab.id_of[b"c"]]
    np.testing.assert_array_equal(mask, brute_force_mask(grammar, tok, state.stack))
    rng = np.random.default_rng(2)
    for _ in range(6):
        state, out = enforcer.start([begin]), []
        while state.active:
            mask = state.mask()
            np.testing.assert_array_equal(mask, brute_force_mask(grammar, tok, state.stack))
            ids = np.flatnonzero(mask)
            short = [i for i in ids if i in vocab.bytes_of and len(vocab.bytes_of[i]) <= 2]
            pick = short if short and rng.random() < 0.8 else ids          # short tokens: items often collide
            out.append(int(pick[rng.integers(len(pick))]))
            assert state.advance(out[-1])
        check_section(tok.decode([begin] + out[:-1]), [tags], 0)


# ------------------------------------------------------------------------------------------------- the engine
ENGINE_TOOLS = [BY_NAME[n] for n in ("get_forecast", "create_event", "list_orders")]
ENGINE_CFG = EnforcerConfig(max_string_len=6, max_array_items=2, max_calls=2)


@pytest.fixture(scope="module")
def model():
    return kimi_jax.create_model(kimi_jax.tiny(), seed=0)            # random weights


def make_engine(model, **kw):
    return Engine(model, EngineConfig(**{**dict(max_slots=8, page_size=64, num_pages=100, max_seq_len=1024,
                                                prefill_chunk=64), **kw}), stop_token_ids=chat.stop_token_ids(TOK))


def tool_prompt():
    """A chat prompt (no tool declaration: a random model ignores it) whose assistant turn opens a section."""
    ids, _ = chat.encode(TOK, [{"role": "user", "content": "What is the weather in Paris?"}],
                         add_generation_prompt=True)
    return ids + [SECTION_BEGIN]


def test_engine_enforced_samples_are_well_formed_and_unenforced_are_not(model):
    enforcer = ToolCallEnforcer(ENGINE_TOOLS, TOK, config=ENGINE_CFG)
    prompt, bound = tool_prompt(), enforcer.grammar.max_section_tokens()
    engine = make_engine(model)
    on = engine.add_request(Request(prompt, max_tokens=bound, temperature=1.0, n=4, seed=5, enforcer=enforcer))
    off = engine.add_request(Request(prompt, max_tokens=96, temperature=1.0, n=4, seed=5))
    engine.run()
    assert engine.stats["enforcer_violations"] == 0 and engine.stats["masked_steps"] > 0
    for sample in engine.result(on).samples:
        assert sample.finish_reason == "stop" and sample.tokens[-1] == IM_END
        check_section(TOK.decode([SECTION_BEGIN] + sample.tokens[:-1]), ENGINE_TOOLS, 0)
    malformed = 0
    for sample in engine.result(off).samples:
        text = TOK.decode([SECTION_BEGIN] + [t for t in sample.tokens if t not in chat.stop_token_ids(TOK)])
        malformed += not chat.parse_assistant(text, ENGINE_TOOLS, first_call_index=0).ok
    assert malformed == 4
    # the reported logprobs are the model's own distribution, not the masked one
    sample = engine.result(on).samples[0]
    logp = jax.nn.log_softmax(model(jnp.asarray([prompt + sample.tokens]))[0].astype(jnp.float32), axis=-1)
    want = [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(sample.tokens)]
    np.testing.assert_allclose(sample.logprobs, want, atol=2e-4)


def test_unconstrained_greedy_tokens_do_not_change_beside_a_constrained_request(model):
    rng = np.random.default_rng(3)
    prompts = [[int(t) for t in rng.integers(0, 256, size=n)] for n in (9, 30)]
    alone = make_engine(model)
    ids = [alone.add_request(Request(p, max_tokens=24)) for p in prompts]
    alone.run()
    enforcer = ToolCallEnforcer(ENGINE_TOOLS, TOK, config=ENGINE_CFG)
    mixed = make_engine(model)
    traces = trace_count("decode_masked")
    ids2 = [mixed.add_request(Request(p, max_tokens=24)) for p in prompts]
    constrained = mixed.add_request(Request(tool_prompt(), max_tokens=enforcer.grammar.max_section_tokens(),
                                            temperature=1.0, n=2, seed=1, enforcer=enforcer))
    mixed.run()
    assert mixed.stats["masked_steps"] >= 24                     # the greedy rows ran through masked steps
    for a, b in zip(ids, ids2):
        assert mixed.result(b).samples[0].tokens == alone.result(a).samples[0].tokens
    assert all(s.finish_reason == "stop" for s in mixed.result(constrained).samples)
    masked_shapes = [s for s in mixed.shapes_seen if s[0] == "decode_masked"]
    assert trace_count("decode_masked") - traces <= len(masked_shapes)


class SwappedTokenizer(ByteTokenizer):
    """A ByteTokenizer whose <|tool_calls_section_begin|> is the byte `begin` (to make a model open a section in
    the middle of a multi-step decode call)."""

    def __init__(self, begin: int):
        super().__init__()
        self.special_tokens = {**self.special_tokens, "<|tool_calls_section_begin|>": begin,
                               "<|reserved_token_261|>": SECTION_BEGIN}

    def token_bytes(self, i):
        return bytes([i])


def test_a_section_opened_mid_call_is_constrained_from_the_next_token(model):
    """decode_steps=8: a sample that opens the section at its 3rd token keeps tokens 1..3, drops the rest of the
    call (sampled unconstrained) and continues masked: its 4th token is <|tool_call_begin|>, the only one allowed."""
    rng = np.random.default_rng(7)
    for _ in range(20):
        prompt = [int(t) for t in rng.integers(0, 250, size=12)]
        engine = make_engine(model, decode_steps=8)
        rid = engine.add_request(Request(prompt, max_tokens=8))
        greedy = engine.run()[rid].samples[0].tokens
        begin = greedy[2]
        if begin < 253 and begin not in greedy[:2] + prompt and greedy[3] != TOK.token_to_id(B):
            break
    else:
        pytest.fail("no prompt among 20 whose greedy continuation opens a section at its 3rd token (the model or seeds changed)")
    tok = SwappedTokenizer(begin)
    enforcer = ToolCallEnforcer(ENGINE_TOOLS, tok, config=ENGINE_CFG)
    engine = make_engine(model, decode_steps=8)
    rid = engine.add_request(Request(prompt, max_tokens=3 + enforcer.grammar.max_section_tokens(),
                                     enforcer=enforcer))
    tokens = engine.run()[rid].samples[0].tokens
    assert tokens[:3] == greedy[:3] and tokens[3] == TOK.token_to_id(B)
    assert engine.stats["enforcer_violations"] == 0 and tokens[-1] == IM_END


def test_engine_refuses_a_prompt_that_already_broke_the_format(model):
    enforcer = ToolCallEnforcer(ENGINE_TOOLS, TOK, config=ENGINE_CFG)
    engine = make_engine(model)
    with pytest.raises(RequestError, match="enforcer"):
        engine.add_request(Request(tool_prompt() + TOK.encode("x"), max_tokens=4, enforcer=enforcer))
    # a prompt that already wrote part of a call continues it
    state = enforcer.start(tool_prompt() + [TOK.token_to_id(B)] + TOK.encode("functions.get_f"))
    assert state.active and np.flatnonzero(state.mask()).tolist() == [ord("o")]


# ----------------------------------------------------------------------------------------- server and backend
def test_chat_requests_with_tools_carry_an_enforcer():
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "x", "type": "function", "function": {"name": "get_forecast", "arguments": "{}"}}] * 2},
                {"role": "tool", "tool_call_id": "x", "content": "ok"}, {"role": "tool", "content": "ok"}]
    body = {"messages": messages, "tools": ENGINE_TOOLS}
    params, _ = chat_params(body, "m", TOK, (IM_END,))
    assert params.request.enforcer.first_call_index == 2 and params.request.enforcer.vocab is vocab_index(TOK)
    assert chat_params({**body, "enforce_tool_calls": False}, "m", TOK, (IM_END,))[0].request.enforcer is None
    assert chat_params({"messages": messages}, "m", TOK, (IM_END,))[0].request.enforcer is None
    odd = [tool({"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}]}}})]
    assert chat_params({**body, "tools": odd}, "m", TOK, (IM_END,))[0].request.enforcer is None
    with pytest.raises(APIError, match="cannot be enforced") as e:
        chat_params({**body, "tools": odd, "enforce_tool_calls": True}, "m", TOK, (IM_END,))
    assert e.value.status == 400 and e.value.param == "tools"
    with pytest.raises(APIError, match="enforce_tool_calls"):
        chat_params({**body, "enforce_tool_calls": "yes"}, "m", TOK, (IM_END,))


def test_engine_backend_enforce_option():
    from kimi_jax.agentic.backends import EngineBackend
    backend = EngineBackend(None, TOK, enforce=True)
    messages = [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "x", "type": "function", "function": {"name": "get_forecast", "arguments": "{}"}}]}]
    assert backend._enforcer(messages, ENGINE_TOOLS).first_call_index == 1
    assert EngineBackend(None, TOK)._enforcer(messages, ENGINE_TOOLS) is None
