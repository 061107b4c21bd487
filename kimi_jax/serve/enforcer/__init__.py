"""Constrained decoding of Kimi K2 tool calls: once a sample emits <|tool_calls_section_begin|>, only
well-formed calls of the declared tools can follow.

    enforcer = ToolCallEnforcer(tools, tokenizer, first_call_index=0)     # per request (tools: OpenAI form)
    engine.add_request(Request(prompt, ..., enforcer=enforcer))           # the engine masks the logits
    state = enforcer.start(prompt); state.mask() -> bool [vocab] | None; state.advance(token)   # per sample

The language after the section begin (what `parse_assistant(text, tools, first_call_index=...)` accepts with
no error, and whose arguments the tool's `parameters` schema accepts):

    (<|tool_call_begin|> functions.NAME:IDX <|tool_call_argument_begin|> JSON <|tool_call_end|>){1..max_calls}
    <|tool_calls_section_end|> <|im_end|>

NAME is a declared tool; IDX is the next canonical index (first_call_index, then +1 per call of the section);
JSON is a value of the tool's parameter schema, written in the canonical `json.dumps` layout the chat template
renders and the model was trained on: separators ", " and ": ", no other whitespace. Before the section begin
the enforcer does nothing (free text); after the section's <|im_end|> nothing either (the engine stops there).

The automaton. Its input is a sequence of bytes (ordinary tokens: their UTF-8 bytes) and atoms (the chat
special tokens). Its state is an immutable stack of frames (tuples, so states hash and masks can be cached):
the section frame at the bottom, then one frame per open JSON value: object, array, string, number, literal
(enum / const / true / false / null / object keys / call ids: a finite set of byte strings) or a type union
(resolved by the value's first byte). `feed_byte` / `feed_atom` return the next state or None, and return a
state only if it is *alive*: some continuation reaches the end of the section. Liveness is exact for every
frame (strings: lengths reachable in the pattern's DFA within the length window; numbers: intervals of the
values still reachable against the bounds; literals: a candidate with the prefix), so a live state always
has a next byte or atom, and a token is allowed iff the state stays alive through all its bytes: the model can
never be left without an allowed token. Everything is bounded (max_string_len, max_array_items, digits,
max_calls), so every path ends; `max_section_tokens()` bounds its length.

JSON Schema subset (anything else raises UnsupportedSchema; annotations such as description, title, format,
default, examples and unknown keywords are ignored, as jsonschema ignores them): "type" (one or a list of
object, array, string, integer, number, boolean, null), enum, const; object: properties, required
(additionalProperties is honoured by never writing an undeclared key); array: items (one schema), minItems,
maxItems, uniqueItems (for string or enum items); string: minLength, maxLength, pattern (a regex subset:
literals, escapes, classes, ., groups, |, ?, *, +, {m,n}, ^ at the start and $ at the end; \\d \\w \\s are
their ASCII parts, so generated strings always match Python's re); integer / number: minimum, maximum,
exclusiveMinimum, exclusiveMaximum. Numbers are written without exponent, integers with at most
max_int_digits digits, numbers also with at most max_frac_digits decimals. Strings hold any character but
never the two characters "<|" in a row (they could spell a chat special token in the text the parser reads)
and use the escapes \\" \\\\ \\/ \\b \\f \\n \\r \\t only (no \\u: control characters other than those five
cannot be written); a string holds at most max_string_len characters (more if minLength or the pattern needs).

Masks. For a state, the allowed tokens are the chat special tokens whose atom keeps it alive plus the ordinary
tokens whose bytes do. `VocabIndex` keeps the ordinary tokens' byte strings sorted (a trie laid out in an
array); `allowed()` walks it depth first with the automaton, carrying one state per depth of the shared prefix
and skipping (bisect) every token under a dead prefix: cost O(live trie nodes + dead branches * log V) steps.
Inside a string without pattern (the bulk of generated text) a token is decided with numpy from its plain
prefix and what follows it (`_split_plain`), and only the distinct tails after a closing quote (from the state
after the string) and the tokens holding a backslash are walked. Masks are cached per state (a free string's
by its room left, clamped to one token's reach). For the byte tokenizer (272 ids) a mask costs ~0.2 ms.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from kimi_jax.chat.template import IM_END, TOOL_CALLS_SECTION_BEGIN

from .config import ATOMS, EnforcerConfig, UnsupportedSchema
from .grammar import Check, ToolCallGrammar, compile_grammar
from .masks import allowed_tokens
from .vocab import VocabIndex, vocab_index

__all__ = ["ATOMS", "Check", "EnforcerConfig", "EnforcerState", "ToolCallEnforcer", "ToolCallGrammar",
           "UnsupportedSchema", "VocabIndex", "allowed_tokens", "compile_grammar", "vocab_index"]


class ToolCallEnforcer:
    """What a Request carries: the compiled grammar of its tools, the tokenizer's VocabIndex and the index of
    the section's first call (the number of calls earlier in the dialogue). `start(prompt)` gives each sample
    its EnforcerState. Raises UnsupportedSchema / ValueError for tools it cannot enforce."""

    def __init__(self, tools: Sequence[dict], tokenizer, *, first_call_index: int = 0,
                 config: EnforcerConfig = EnforcerConfig()):
        if first_call_index < 0:
            raise ValueError(f"first_call_index must be >= 0, got {first_call_index}")
        self.tools = list(tools)
        self.grammar = compile_grammar(self.tools, config)
        self.vocab = vocab_index(tokenizer)
        self.first_call_index = int(first_call_index)

    @property
    def vocab_size(self) -> int:
        return self.vocab.vocab_size

    def start(self, prompt: Sequence[int] = ()) -> EnforcerState:
        """A sample's state after `prompt`: the prompt's current turn (the tokens after its last <|im_end|>,
        <|im_user|>, <|im_assistant|>, <|im_system|> or <|im_middle|>) is fed first, so a prompt that already
        opened a section (or wrote part of a call) continues it. ValueError if that part is already malformed."""
        state = EnforcerState(self)
        prompt = [int(t) for t in prompt]
        cut = max((k for k, t in enumerate(prompt) if t in self.vocab.turn_ids), default=-1)
        for t in prompt[cut + 1:]:
            if not state.advance(t):
                raise ValueError("the prompt's assistant turn already breaks the tool-call format "
                                 f"(token {t} after {TOOL_CALLS_SECTION_BEGIN})")
        return state

    def allowed(self, stack: tuple) -> np.ndarray:
        return allowed_tokens(self.grammar, self.vocab, stack)


class EnforcerState:
    """One sample's progress: phase "free" (before the section: anything goes), "section" (masked), "done"
    (after the section's <|im_end|>) or "broken" (a token outside the mask was fed; no longer enforced)."""

    def __init__(self, enforcer: ToolCallEnforcer):
        self.enforcer = enforcer
        self.phase = "free"
        self.stack: tuple | None = None

    @property
    def active(self) -> bool:
        """Whether the next token is constrained."""
        return self.phase == "section"

    def mask(self) -> np.ndarray | None:
        """bool [vocab_size] of the allowed next tokens (never all False), or None when unconstrained."""
        return self.enforcer.allowed(self.stack) if self.active else None

    def advance(self, token: int) -> bool:
        """Take the sample's next token -> False iff it was not allowed (the state is then "broken")."""
        vocab, grammar = self.enforcer.vocab, self.enforcer.grammar
        token = int(token)
        if self.phase == "free":
            if token == vocab.section_begin:
                self.phase, self.stack = "section", grammar.initial(self.enforcer.first_call_index)
            elif token == vocab.atoms[IM_END]:
                self.phase = "done"
            return True
        if self.phase != "section":
            return True
        name = vocab.atom_of.get(token)
        if name is not None:
            nxt = grammar.feed_atom(self.stack, name) if name in ATOMS else None
        else:
            data = vocab.bytes_of.get(token)
            nxt = None if not data else grammar.feed_bytes(self.stack, data)
        if nxt is None:
            self.phase = "broken"
            return False
        self.stack = nxt
        if grammar.finished(nxt):
            self.phase = "done"
        return True
