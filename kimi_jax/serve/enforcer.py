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

import bisect
import collections
import dataclasses
import functools
import json
import re
import threading
import weakref
from fractions import Fraction
from typing import Any, NamedTuple, Sequence

import jsonschema
import numpy as np

from kimi_jax.chat.template import (IM_ASSISTANT, IM_END, IM_MIDDLE, IM_SYSTEM, IM_USER, TOOL_CALL_ARGUMENT_BEGIN,
                                    TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_SECTION_BEGIN,
                                    TOOL_CALLS_SECTION_END, canonical_call_id)

ATOMS = (TOOL_CALL_BEGIN, TOOL_CALL_ARGUMENT_BEGIN, TOOL_CALL_END, TOOL_CALLS_SECTION_END, IM_END)
_TURN_TOKENS = (IM_END, IM_USER, IM_ASSISTANT, IM_SYSTEM, IM_MIDDLE)       # tokens that delimit a turn
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")                                     # what parse.CALL_ID accepts


class UnsupportedSchema(ValueError):
    """A tool whose parameters use JSON Schema outside the supported subset (module docstring), or that no
    bounded value satisfies."""


@dataclasses.dataclass(frozen=True)
class EnforcerConfig:
    """Bounds that make every enforced section finite: characters per string (raised where minLength or a
    pattern needs more), items per array, integer digits, decimals of a number, calls per section."""

    max_string_len: int = 64
    max_array_items: int = 8
    max_int_digits: int = 9
    max_frac_digits: int = 6
    max_calls: int = 8

    def __post_init__(self):
        for name in ("max_string_len", "max_array_items", "max_int_digits", "max_calls"):
            if getattr(self, name) < 1:
                raise ValueError(f"EnforcerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_frac_digits < 0 or self.max_int_digits + self.max_frac_digits > 15:
            raise ValueError("EnforcerConfig needs max_frac_digits >= 0 and max_int_digits + max_frac_digits <= 15 "
                             "(so distinct decimals stay distinct floats)")


# ============================================================================ code point sets and the regex DFA
_MAX_CP = 0x10FFFF
# The characters a generated string can hold: \b \t \n, \f \r (escaped) and every non-surrogate from space up.
_UNIVERSE = ((8, 10), (12, 13), (0x20, 0xD7FF), (0xE000, _MAX_CP))
_LT, _PIPE = ord("<"), ord("|")
_ESCAPES = {ord('"'): ord('"'), ord("\\"): ord("\\"), ord("/"): ord("/"), ord("b"): 8, ord("f"): 12,
            ord("n"): 10, ord("r"): 13, ord("t"): 9}
_NUMBER_ENDS = frozenset(b",]}")
_BYTE = [bytes((b,)) for b in range(256)]
_ESCAPED_CHARS = tuple(sorted((c, c) for c in set(_ESCAPES.values())))


def _union(intervals) -> tuple:
    """Sorted, merged closed intervals."""
    out = []
    for lo, hi in sorted(intervals):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return tuple(out)


def _complement(intervals) -> tuple:
    out, start = [], 0
    for lo, hi in _union(intervals):
        if lo > start:
            out.append((start, lo - 1))
        start = hi + 1
    if start <= _MAX_CP:
        out.append((start, _MAX_CP))
    return tuple(out)


def _contains(intervals, c: int) -> bool:
    k = bisect.bisect_right(intervals, (c, _MAX_CP + 1)) - 1
    return k >= 0 and intervals[k][0] <= c <= intervals[k][1]


_DIGIT, _WORD = ((48, 57),), _union([(48, 57), (65, 90), (95, 95), (97, 122)])
_SPACE = _union([(9, 13), (32, 32)])
_ANY = ((0, _MAX_CP),)


class _RegexParser:
    """A Python-`re` subset -> AST: ("set", intervals) | ("cat", [..]) | ("alt", [..]) | ("rep", ast, lo, hi)."""

    def __init__(self, pattern: str):
        self.p, self.i = pattern, 0

    def fail(self, what: str):
        raise UnsupportedSchema(f"pattern {self.p!r}: {what} is not supported")

    def parse(self):
        p = self.p
        start = p.startswith("^")
        self.i = int(start)
        self.end = len(p)
        end = len(p) > self.i and p.endswith("$") and not _escaped(p, len(p) - 1)
        if end:
            self.end -= 1
        ast = self.alt()
        if self.i != self.end:
            self.fail(f"{p[self.i]!r} at {self.i}")
        return start, end, ast

    def peek(self):
        return self.p[self.i] if self.i < self.end else None

    def alt(self):
        branches = [self.cat()]
        while self.peek() == "|":
            self.i += 1
            branches.append(self.cat())
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def cat(self):
        items = []
        while self.peek() is not None and self.peek() not in "|)":
            items.append(self.repeat())
        return ("cat", items)

    def repeat(self):
        ast = self.atom()
        quantified = False
        while True:
            c = self.peek()
            if c in ("*", "+", "?"):
                lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
                self.i += 1
            elif c == "{" and (m := re.match(r"\{(\d*)(,(\d*))?\}", self.p[self.i:self.end])) \
                    and (m.group(1) or m.group(2)):
                lo = int(m.group(1) or 0)
                hi = lo if m.group(2) is None else (int(m.group(3)) if m.group(3) else None)
                if hi is not None and hi < lo:
                    self.fail(f"quantifier {m.group()}")
                self.i += m.end()
            else:
                return ast
            if quantified:
                self.fail("a repeated quantifier")
            quantified = True
            ast = ("rep", ast, lo, hi)
            if self.peek() == "?":                                  # lazy: the same language
                self.i += 1

    def atom(self):
        c = self.p[self.i]
        self.i += 1
        if c == "(":
            if self.peek() == "?":
                if self.p[self.i:self.i + 2] != "?:":
                    self.fail("a group extension (?...)")
                self.i += 2
            ast = self.alt()
            if self.peek() != ")":
                self.fail("an unclosed group")
            self.i += 1
            return ast
        if c == "[":
            return ("set", self.char_class())
        if c == ".":
            return ("set", _complement([(10, 10)]))
        if c == "\\":
            return ("set", self.escape(in_class=False))
        if c in "^$":
            self.fail(f"the anchor {c!r} inside the pattern")
        if c in "*+?)":
            self.fail(f"{c!r} at {self.i - 1}")
        return ("set", ((ord(c), ord(c)),))

    def escape(self, in_class: bool):
        if self.i >= len(self.p):
            self.fail("a trailing backslash")
        c = self.p[self.i]
        self.i += 1
        sets = {"d": _DIGIT, "w": _WORD, "s": _SPACE}
        if in_class and c == "b":
            return ((8, 8),)
        if c in sets:
            return sets[c]
        simple = {"n": 10, "t": 9, "r": 13, "f": 12, "v": 11, "a": 7}
        if c in simple:
            return ((simple[c], simple[c]),)
        if c in "xu":
            width = 2 if c == "x" else 4
            digits = self.p[self.i:self.i + width]
            if not re.fullmatch(f"[0-9A-Fa-f]{{{width}}}", digits):
                self.fail(f"\\{c}{digits}")
            self.i += width
            v = int(digits, 16)
            return ((v, v),)
        if c.isalnum():
            self.fail(f"the escape \\{c}")
        return ((ord(c), ord(c)),)

    def char_class(self):
        negate = self.peek() == "^"
        if negate:
            self.i += 1
        items, first = [], True
        while True:
            if self.i >= self.end:
                self.fail("an unclosed character class")
            c = self.p[self.i]
            if c == "]" and not first:
                self.i += 1
                break
            first = False
            self.i += 1
            if c == "\\":
                if negate and self.peek() in ("d", "w", "s"):
                    self.fail("\\d, \\w or \\s in a negated class")
                lo_set = self.escape(in_class=True)
            elif c == "[" and self.peek() in (":", "=", "."):
                self.fail("a POSIX class")
            else:
                lo_set = ((ord(c), ord(c)),)
            if self.peek() == "-" and self.i + 1 < self.end and self.p[self.i + 1] != "]" and len(lo_set) == 1 \
                    and lo_set[0][0] == lo_set[0][1]:
                self.i += 1
                d = self.p[self.i]
                self.i += 1
                hi_set = self.escape(in_class=True) if d == "\\" else ((ord(d), ord(d)),)
                if len(hi_set) != 1 or hi_set[0][0] != hi_set[0][1] or hi_set[0][0] < lo_set[0][0]:
                    self.fail("a bad range in a character class")
                items.append((lo_set[0][0], hi_set[0][0]))
            else:
                items.extend(lo_set)
        return _complement(items) if negate else _union(items)


def _escaped(p: str, k: int) -> bool:
    n = 0
    while k - 1 - n >= 0 and p[k - 1 - n] == "\\":
        n += 1
    return n % 2 == 1


class _NFA:
    """Thompson NFA: eps[s] = [t, ...]; edges[s] = [(intervals, t), ...]; one start, one accept."""

    MAX_STATES = 20000

    def __init__(self, ast):
        self.eps: list[list[int]] = []
        self.edges: list[list[tuple[tuple, int]]] = []
        self.start, self.accept = self.build(ast)

    def new(self) -> int:
        if len(self.eps) >= self.MAX_STATES:
            raise UnsupportedSchema(f"a pattern with more than {self.MAX_STATES} NFA states")
        self.eps.append([])
        self.edges.append([])
        return len(self.eps) - 1

    def build(self, ast) -> tuple[int, int]:
        kind = ast[0]
        if kind == "set":
            s, e = self.new(), self.new()
            self.edges[s].append((ast[1], e))
            return s, e
        if kind == "cat":
            s = e = self.new()
            for item in ast[1]:
                a, b = self.build(item)
                self.eps[e].append(a)
                e = b
            return s, e
        if kind == "alt":
            s, e = self.new(), self.new()
            for item in ast[1]:
                a, b = self.build(item)
                self.eps[s].append(a)
                self.eps[b].append(e)
            return s, e
        _, sub, lo, hi = ast                                           # "rep"
        s = e = self.new()
        for _ in range(lo):
            a, b = self.build(sub)
            self.eps[e].append(a)
            e = b
        if hi is None:
            a, b = self.build(sub)
            end = self.new()
            self.eps[e] += [a, end]
            self.eps[b] += [a, end]
            return s, end
        end = self.new()
        for _ in range(hi - lo):
            a, b = self.build(sub)
            self.eps[e] += [a, end]
            e = b
        self.eps[e].append(end)
        return s, end

    def closure(self, states) -> frozenset:
        seen, todo = set(states), list(states)
        while todo:
            for t in self.eps[todo.pop()]:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        return frozenset(seen)

    def intervals(self):
        return [iv for edges in self.edges for ivs, _ in edges for iv in ivs]


class _DFA:
    """The DFA of a string's characters: the pattern (search semantics; None = any string) intersected with
    "no '<' directly followed by '|'". Characters are grouped in classes (intervals of code points inside
    _UNIVERSE that every transition treats alike). trans[d][k]: next state or -1; accept[d]; lt[d]: the last
    character was '<'. Fully built at compile time (at most MAX_STATES states)."""

    MAX_STATES = 4096

    def __init__(self, pattern: str | None):
        if pattern is None:
            anchored, ast = (True, True), ("rep", ("set", _UNIVERSE), 0, None)
        else:
            start, end, ast = _RegexParser(pattern).parse()
            anchored = (start, end)
        items = [ast]
        if not anchored[0]:
            items.insert(0, ("rep", ("set", _ANY), 0, None))
        if not anchored[1]:
            items.append(("rep", ("set", _ANY), 0, None))
        nfa = _NFA(("cat", items))
        cuts = {_LT, _LT + 1, _PIPE, _PIPE + 1}
        for lo, hi in list(_UNIVERSE) + nfa.intervals():
            cuts.update((lo, hi + 1))
        cuts = sorted(c for c in cuts if c <= _MAX_CP + 1)
        self.classes = [(a, b - 1) for a, b in zip(cuts, cuts[1:]) if _contains(_UNIVERSE, a)]
        self.class_lo = [lo for lo, _ in self.classes]
        self.sizes = [hi - lo + 1 for lo, hi in self.classes]
        self.free = pattern is None
        start = (nfa.closure([nfa.start]), False)
        index, order = {start: 0}, [start]
        self.trans, self.accept, self.lt = [], [], []
        i = 0
        while i < len(order):
            states, lt = order[i]
            row = []
            for lo, _ in self.classes:
                if lt and lo == _PIPE:
                    row.append(-1)
                    continue
                nxt = nfa.closure([t for s in states for ivs, t in nfa.edges[s] if _contains(ivs, lo)])
                if not nxt:
                    row.append(-1)
                    continue
                key = (nxt, lo == _LT)
                if key not in index:
                    if len(order) >= self.MAX_STATES:
                        raise UnsupportedSchema(f"pattern {pattern!r}: more than {self.MAX_STATES} DFA states")
                    index[key] = len(order)
                    order.append(key)
                row.append(index[key])
            self.trans.append(row)
            self.accept.append(nfa.accept in states)
            self.lt.append(lt)
            i += 1
        self.start = 0

    def class_of(self, c: int) -> int:
        k = bisect.bisect_right(self.class_lo, c) - 1
        return k if k >= 0 and c <= self.classes[k][1] else -1

    def classes_in(self, intervals):
        """(class, number of its code points inside `intervals`) for every class meeting them."""
        for a, b in intervals:
            k = max(0, bisect.bisect_right(self.class_lo, a) - 1)
            while k < len(self.classes) and self.classes[k][0] <= b:
                lo, hi = self.classes[k]
                n = min(hi, b) - max(lo, a) + 1
                if n > 0:
                    yield k, n
                k += 1

    def shortest(self) -> int | None:
        """Length of the shortest accepted string, None if none."""
        dist, frontier, seen = 0, [self.start], {self.start}
        while frontier:
            if any(self.accept[d] for d in frontier):
                return dist
            nxt = {t for d in frontier for t in self.trans[d] if t >= 0 and t not in seen}
            seen |= nxt
            frontier, dist = list(nxt), dist + 1
        return None

    def reach(self, max_len: int) -> list[int]:
        """Per state, a bitset of the lengths L <= max_len of accepted completions."""
        succ = [{t for t in row if t >= 0} for row in self.trans]
        live = {d for d in range(len(self.trans)) if self.accept[d]}
        bits = [int(self.accept[d]) for d in range(len(self.trans))]
        for length in range(1, max_len + 1):
            live = {d for d in range(len(self.trans)) if succ[d] & live}
            for d in live:
                bits[d] |= 1 << length
        return bits


# ============================================================================ compiled schema nodes
@dataclasses.dataclass(eq=False)
class _Str:
    dfa: _DFA
    min_len: int
    max_len: int
    reach: list[int]
    _counts: dict = dataclasses.field(default_factory=dict)

    def count(self, d: int, length: int, cap: int) -> int:
        """Completions of exactly `length` characters from DFA state d, capped at `cap`."""
        key = (d, length, cap)
        if key not in self._counts:
            if length == 0:
                n = int(self.dfa.accept[d])
            else:
                n = 0
                for k, t in enumerate(self.dfa.trans[d]):
                    if t >= 0 and self.reach[t] >> (length - 1) & 1:
                        n = min(cap, n + self.dfa.sizes[k] * self.count(t, length - 1, cap))
                        if n >= cap:
                            break
            self._counts[key] = n
        return self._counts[key]


@dataclasses.dataclass(eq=False)
class _Num:
    integer: bool
    lo: Fraction          # inclusive bounds on the grid of 10**-frac
    hi: Fraction
    int_digits: int
    frac_digits: int


@dataclasses.dataclass(eq=False)
class _Lit:
    texts: tuple[bytes, ...]          # the candidates' JSON texts (or call ids)
    values: tuple                     # what the frame reports when a candidate is complete

    def __post_init__(self):
        self.under: dict[bytes, frozenset] = {}                  # prefix -> candidates that start with it
        for i, t in enumerate(self.texts):
            for k in range(len(t) + 1):
                self.under[t[:k]] = self.under.get(t[:k], frozenset()) | {i}
        self.index = {t: i for i, t in enumerate(self.texts)}

    def viable(self, prefix: bytes, excluded: frozenset) -> bool:
        """Some candidate outside `excluded` starts with `prefix`."""
        under = self.under.get(prefix)
        return under is not None and (not excluded or not under <= excluded)

    def complete(self, prefix: bytes, excluded: frozenset) -> int:
        """The candidate equal to `prefix` (-1: none, or excluded)."""
        i = self.index.get(prefix, -1)
        return -1 if i in excluded else i


@dataclasses.dataclass(eq=False)
class _Obj:
    names: tuple[str, ...]
    children: tuple[int, ...]
    required: int                     # bitset over names
    key_lit: int                      # node id of the literal of the keys' JSON texts


@dataclasses.dataclass(eq=False)
class _Arr:
    item: int
    min_items: int
    max_items: int
    unique: bool


@dataclasses.dataclass(eq=False)
class _Union:
    first: dict                       # first byte -> alternative node id


_IGNORED = {"description", "title", "default", "examples", "$comment", "format", "deprecated", "readOnly",
            "writeOnly", "$schema", "$id", "$defs", "definitions", "contentMediaType", "contentEncoding",
            "additionalProperties", "nullable", "x-domain", "x-category", "$anchor"}
_UNSUPPORTED = {"allOf", "anyOf", "oneOf", "not", "if", "then", "else", "$ref", "$dynamicRef", "$recursiveRef",
                "dependentSchemas", "dependentRequired", "dependencies", "prefixItems", "contains", "minContains",
                "maxContains", "unevaluatedItems", "unevaluatedProperties", "patternProperties", "propertyNames",
                "minProperties", "maxProperties", "multipleOf", "additionalItems"}
_TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")


def _json_text(value) -> bytes:
    """Canonical JSON text as the template writes it, '<|' escaped so that no special token can be spelled."""
    return json.dumps(value, ensure_ascii=False).replace("<|", "\\u003c|").encode("utf-8")


def _bound(x) -> Fraction:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise UnsupportedSchema(f"a numeric bound must be a number, got {x!r}")
    return Fraction(x) if isinstance(x, int) else Fraction(repr(x))


class ToolCallGrammar:
    """The automaton of a tool-call section for a list of tools (module docstring). Immutable after
    construction apart from lazily made call-id literals; share it between requests (`compile_grammar`)."""

    def __init__(self, tools: Sequence[dict], config: EnforcerConfig = EnforcerConfig()):
        self.config = config
        self.nodes: list = []
        self.names: list[str] = []
        self.args: list[int] = []                        # tool index -> node id of its arguments object
        for k, tool in enumerate(tools):
            function = tool.get("function") if isinstance(tool, dict) else None
            name = function.get("name") if isinstance(function, dict) else None
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                raise ValueError(f"tool {k}: function.name must match {_NAME.pattern} (a call id carries it), "
                                 f"got {name!r}")
            if name in self.names:
                raise ValueError(f"tool {k}: the name {name!r} is declared twice")
            schema = function.get("parameters")
            schema = {"type": "object", "properties": {}} if schema is None else schema
            if not isinstance(schema, dict) or "object" not in ([schema.get("type")] if isinstance(
                    schema.get("type"), str) else schema.get("type") or []):
                raise UnsupportedSchema(f"tool {name!r}: parameters must be a schema of type object")
            try:
                root = self._compile({**schema, "type": "object"}, f"{name}.parameters")
            except UnsupportedSchema as e:
                raise UnsupportedSchema(f"tool {name!r}: {e}") from None
            self.names.append(name)
            self.args.append(root)
        if not self.names:
            raise ValueError("a tool-call grammar needs at least one tool")
        self._ids: dict[int, int] = {}                   # call index -> node id of its id literal
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------- compiling
    def _add(self, node) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    def _compile(self, schema: Any, where: str) -> int:
        if schema is True or schema == {}:
            raise UnsupportedSchema(f"{where}: a schema without a type (any value)")
        if not isinstance(schema, dict):
            raise UnsupportedSchema(f"{where}: a schema must be an object, got {schema!r}")
        bad = sorted(set(schema) & _UNSUPPORTED)
        if bad:
            raise UnsupportedSchema(f"{where}: the keywords {bad}")
        if "enum" in schema or "const" in schema:
            values = list(schema["enum"]) if "enum" in schema else []
            if "const" in schema:
                values = [schema["const"]] if "enum" not in schema else [v for v in values if v == schema["const"]]
            validator = jsonschema.validators.validator_for(schema)(schema)
            keep, texts = [], []
            for v in values:
                try:
                    text = _json_text(v)
                except (UnicodeEncodeError, ValueError):
                    continue
                if validator.is_valid(v) and text not in texts and not re.search(rb"[\x00-\x07\x0b\x0e-\x1f]", text):
                    keep.append(v)
                    texts.append(text)
            if not keep:
                raise UnsupportedSchema(f"{where}: no enum / const value satisfies the schema")
            return self._add(_Lit(tuple(texts), tuple(keep)))
        types = schema.get("type")
        if types is None:
            raise UnsupportedSchema(f"{where}: a schema without a type (any value)")
        types = [types] if isinstance(types, str) else list(types)
        if not types or any(t not in _TYPES for t in types):
            raise UnsupportedSchema(f"{where}: type {schema.get('type')!r}")
        if "integer" in types and "number" in types:
            types.remove("integer")
        alternatives = [self._compile_type(t, schema, where) for t in dict.fromkeys(types)]
        if len(alternatives) == 1:
            return alternatives[0]
        first = {}
        for node_id in alternatives:
            for b in self._first_bytes(node_id):
                first[b] = node_id
        return self._add(_Union(first))

    def _first_bytes(self, node_id: int) -> set[int]:
        node = self.nodes[node_id]
        if isinstance(node, _Str):
            return {ord('"')}
        if isinstance(node, _Num):
            return set(b"-0123456789")
        if isinstance(node, _Obj):
            return {ord("{")}
        if isinstance(node, _Arr):
            return {ord("[")}
        return {t[0] for t in node.texts}

    def _compile_type(self, kind: str, schema: dict, where: str) -> int:
        cfg = self.config
        if kind == "boolean":
            return self._add(_Lit((b"true", b"false"), (True, False)))
        if kind == "null":
            return self._add(_Lit((b"null",), (None,)))
        if kind == "string":
            pattern = schema.get("pattern")
            if pattern is not None and not isinstance(pattern, str):
                raise UnsupportedSchema(f"{where}: pattern must be a string")
            dfa = _DFA(pattern)
            min_len = int(schema.get("minLength", 0))
            schema_max = schema.get("maxLength")
            shortest = dfa.shortest()
            if shortest is None:
                raise UnsupportedSchema(f"{where}: the pattern {pattern!r} matches no writable string")
            max_len = max(cfg.max_string_len, min_len, shortest)
            if schema_max is not None:
                max_len = min(max_len, int(schema_max))
            reach = dfa.reach(max_len)
            if not reach[dfa.start] >> min_len:
                raise UnsupportedSchema(f"{where}: no string of {min_len}..{max_len} characters matches "
                                        f"{pattern!r}")
            return self._add(_Str(dfa, min_len, max_len, reach))
        if kind in ("integer", "number"):
            frac = 0 if kind == "integer" else cfg.max_frac_digits
            digits = cfg.max_int_digits
            grid = Fraction(1, 10 ** frac)
            lo, hi = -(10 ** digits - grid), 10 ** digits - grid
            for key, exclusive, is_lo in (("minimum", False, True), ("exclusiveMinimum", True, True),
                                          ("maximum", False, False), ("exclusiveMaximum", True, False)):
                if key not in schema:
                    continue
                b = _bound(schema[key]) / grid
                if is_lo:
                    v = (b.__floor__() + 1 if exclusive else b.__ceil__()) * grid
                    lo = max(lo, v)
                else:
                    v = (b.__ceil__() - 1 if exclusive else b.__floor__()) * grid
                    hi = min(hi, v)
            if lo > hi:
                raise UnsupportedSchema(f"{where}: no {kind} of at most {digits} digits satisfies the bounds")
            return self._add(_Num(kind == "integer", lo, hi, digits, frac))
        if kind == "array":
            items = schema.get("items")
            if isinstance(items, list):
                raise UnsupportedSchema(f"{where}: items as a list (tuple validation)")
            if items is None:
                raise UnsupportedSchema(f"{where}: an array without items (any values)")
            item = self._compile(items, f"{where}[]")
            min_items = int(schema.get("minItems", 0))
            max_items = max(min(cfg.max_array_items, int(schema.get("maxItems", cfg.max_array_items))), min_items)
            if "maxItems" in schema and int(schema["maxItems"]) < min_items:
                raise UnsupportedSchema(f"{where}: maxItems < minItems")
            unique = bool(schema.get("uniqueItems", False))
            if unique:
                node = self.nodes[item]
                if isinstance(node, _Lit):
                    distinct = len(node.texts)
                elif isinstance(node, _Str):
                    distinct = sum(node.count(node.dfa.start, n, min_items + 1)
                                   for n in range(node.min_len, node.max_len + 1))
                else:
                    raise UnsupportedSchema(f"{where}: uniqueItems for items other than strings and enums")
                if distinct < min_items:
                    raise UnsupportedSchema(f"{where}: fewer distinct items than minItems")
            return self._add(_Arr(item, min_items, max_items, unique))
        # object
        props = schema.get("properties", {})
        if not isinstance(props, dict):
            raise UnsupportedSchema(f"{where}: properties must be an object")
        names = tuple(props)
        children = tuple(self._compile(props[n], f"{where}.{n}") for n in names)
        required = schema.get("required", [])
        missing = [r for r in required if r not in props]
        if missing:
            raise UnsupportedSchema(f"{where}: required {missing} are not among the properties")
        bits = sum(1 << names.index(r) for r in set(required))
        key_lit = self._add(_Lit(tuple(_json_text(n) for n in names), tuple(range(len(names)))))
        return self._add(_Obj(names, children, bits, key_lit))

    def _id_literal(self, index: int) -> int:
        with self._lock:
            if index not in self._ids:
                texts = tuple(canonical_call_id(n, index).encode() for n in self.names)
                self._ids[index] = self._add(_Lit(texts, tuple(range(len(self.names)))))
            return self._ids[index]

    # ------------------------------------------------------------------------------------------- states
    def initial(self, first_call_index: int = 0) -> tuple:
        """The state right after <|tool_calls_section_begin|>."""
        return (("S", 0, 0, -1, int(first_call_index)),)

    @staticmethod
    def finished(stack: tuple) -> bool:
        """The section and its <|im_end|> are complete."""
        return stack[-1][0] == "S" and stack[-1][1] == 6

    @staticmethod
    def section_closed(stack: tuple) -> bool:
        """<|tool_calls_section_end|> has been written (only <|im_end|> may follow, or nothing)."""
        return stack[-1][0] == "S" and stack[-1][1] >= 5

    def _start(self, node_id: int, seen: frozenset = frozenset(), track: bool = False) -> tuple:
        """The frame of a value of node `node_id` before its first byte. seen: values it must differ from;
        track: a string frame keeps its text (an item of a uniqueItems array)."""
        node = self.nodes[node_id]
        if isinstance(node, _Str):
            return ("T", node_id, 0, 0, node.dfa.start, None, "" if track or seen else None, seen)
        if isinstance(node, _Num):
            return ("N", node_id, None, "", False, "")
        if isinstance(node, _Lit):
            return ("L", node_id, b"", frozenset(i for i, v in enumerate(node.values) if v in seen))
        if isinstance(node, _Obj):
            return ("O", node_id, 0, 0, -1)
        if isinstance(node, _Arr):
            return ("A", node_id, 0, 0, frozenset())
        return ("U", node_id)

    # ------------------------------------------------------------------------------------------- liveness
    def _alive(self, frame: tuple) -> bool:
        kind = frame[0]
        if kind == "T":
            return self._str_alive(frame)
        if kind == "L":
            return self.nodes[frame[1]].viable(frame[2], frame[3])
        if kind == "N":
            return self._num_alive(frame)
        return True

    def _str_alive(self, frame: tuple) -> bool:
        _, nid, phase, n, d, pend, value, seen = frame
        node: _Str = self.nodes[nid]
        pending = None if phase <= 1 else (_ESCAPED_CHARS if phase == 2 else (_utf8_interval(pend),))
        extra = 0 if pending is None else 1
        if n + extra > node.max_len:
            return False
        lo, hi = max(0, node.min_len - n - extra), node.max_len - n - extra
        window = ((1 << (hi - lo + 1)) - 1) << lo
        if not seen:
            if pending is None:
                return bool(node.reach[d] & window)
            return any(t >= 0 and node.reach[t] & window
                       for k, _ in node.dfa.classes_in(pending) for t in (node.dfa.trans[d][k],))
        # uniqueItems: more completions than the earlier items that share this prefix
        forbidden = [f for f in seen if f.startswith(value) and lo <= len(f) - n - extra <= hi
                     and (pending is None or _contains(pending, ord(f[n])))]
        cap = len(forbidden) + 1
        total = 0
        if pending is None:
            for length in range(lo, hi + 1):
                total += node.count(d, length, cap)
                if total >= cap:
                    return True
            return False
        for k, size in node.dfa.classes_in(pending):
            t = node.dfa.trans[d][k]
            if t >= 0:
                for length in range(lo, hi + 1):
                    total += size * node.count(t, length, cap)
                    if total >= cap:
                        return True
        return False

    def _num_alive(self, frame: tuple) -> bool:
        _, nid, sign, ip, dot, fp = frame
        node: _Num = self.nodes[nid]
        grid = Fraction(1, 10 ** node.frac_digits)
        if sign is None:
            return node.lo <= node.hi
        if not ip:
            spans = [(Fraction(0), 10 ** node.int_digits - grid)]
        elif dot:
            m = int(ip) + (Fraction(int(fp), 10 ** len(fp)) if fp else 0)
            spans = [(m, m + Fraction(1, 10 ** len(fp)) - grid)]
        elif ip == "0":
            spans = [(Fraction(0), 1 - grid)]
        else:
            m = int(ip)
            spans = [(m * 10 ** k, (m + 1) * 10 ** k - grid) for k in range(node.int_digits - len(ip) + 1)]
        if sign == "-":
            spans = [(-b, -a) for a, b in spans]
        return any(max(a, node.lo) <= min(b, node.hi) for a, b in spans)

    def _num_complete(self, frame: tuple) -> bool:
        _, nid, sign, ip, dot, fp = frame
        if not ip or (dot and not fp):
            return False
        node: _Num = self.nodes[nid]
        value = int(ip) + (Fraction(int(fp), 10 ** len(fp)) if fp else 0)
        value = -value if sign == "-" else value
        return node.lo <= value <= node.hi

    # ------------------------------------------------------------------------------------------- stepping
    def feed_byte(self, stack: tuple, b: int) -> tuple | None:
        """The state after one byte, or None if the byte leaves no way to finish the section."""
        while True:
            res = getattr(self, "_byte_" + stack[-1][0])(stack, stack[-1], b)
            if res is None or isinstance(res, tuple):
                return res
            if isinstance(res, _Retry):
                stack = res.stack
            else:                                                    # _Pop: complete without consuming b
                stack = self._pop(stack, res.value)
                if stack is None:
                    return None

    def feed_bytes(self, stack: tuple, data: bytes) -> tuple | None:
        for b in data:
            stack = self.feed_byte(stack, b)
            if stack is None:
                return None
        return stack

    def feed_atom(self, stack: tuple, atom: str) -> tuple | None:
        """The state after a chat special token (its name), or None."""
        while True:
            top = stack[-1]
            if top[0] == "L":
                node = self.nodes[top[1]]
                i = node.complete(top[2], top[3])
                if i < 0:
                    return None
                stack = self._pop(stack, node.values[i])
            elif top[0] == "N":
                if not self._num_complete(top):
                    return None
                stack = self._pop(stack, None)
            elif top[0] == "S":
                return self._atom_S(stack, top, atom)
            else:
                return None
            if stack is None:
                return None

    def _atom_S(self, stack, top, atom):
        _, phase, calls, tool, first = top
        if phase == 0 and atom == TOOL_CALL_BEGIN and calls < self.config.max_calls:
            lit = self._id_literal(first + calls)
            return stack[:-1] + (("S", 1, calls, -1, first), ("L", lit, b"", frozenset()))
        if phase == 0 and atom == TOOL_CALLS_SECTION_END and calls >= 1:
            return stack[:-1] + (("S", 5, calls, -1, first),)
        if phase == 2 and atom == TOOL_CALL_ARGUMENT_BEGIN:
            return stack[:-1] + (("S", 3, calls, tool, first), self._start(self.args[tool]))
        if phase == 4 and atom == TOOL_CALL_END:
            return stack[:-1] + (("S", 0, calls + 1, -1, first),)
        if phase == 5 and atom == IM_END:
            return stack[:-1] + (("S", 6, calls, -1, first),)
        return None

    def _pop(self, stack: tuple, value) -> tuple | None:
        """Remove the completed top frame and hand its value to the frame below."""
        stack = stack[:-1]
        parent = stack[-1]
        kind = parent[0]
        if kind == "S":
            _, phase, calls, tool, first = parent
            if phase == 1:
                return stack[:-1] + (("S", 2, calls, value, first),)
            if phase == 3:
                return stack[:-1] + (("S", 4, calls, tool, first),)
        elif kind == "O":
            _, nid, phase, used, cur = parent
            if phase == 2:
                return stack[:-1] + (("O", nid, 3, used, value),)
            if phase == 5:
                return stack[:-1] + (("O", nid, 6, used | (1 << cur), -1),)
        elif kind == "A":
            _, nid, phase, count, seen = parent
            if phase == 2:
                if self.nodes[nid].unique:
                    seen = seen | {value}
                return stack[:-1] + (("A", nid, 3, count + 1, seen),)
        raise AssertionError(f"unexpected completion under {parent}")

    # Byte handlers: -> new stack (byte consumed), None (dead), _Retry(stack) (re-feed the byte to the new
    # top), or _Pop(value) (the top is complete and does not take the byte; its parent gets it).
    def _byte_S(self, stack, top, b):
        return None

    def _byte_U(self, stack, top, b):
        alt = self.nodes[top[1]].first.get(b)
        return None if alt is None else _Retry(stack[:-1] + (self._start(alt),))

    def _byte_L(self, stack, top, b):
        _, nid, prefix, excluded = top
        node: _Lit = self.nodes[nid]
        longer = prefix + _BYTE[b]
        if node.viable(longer, excluded):
            return stack[:-1] + (("L", nid, longer, excluded),)
        i = node.complete(prefix, excluded)
        return None if i < 0 else _Pop(node.values[i])

    def _byte_N(self, stack, top, b):
        _, nid, sign, ip, dot, fp = top
        node: _Num = self.nodes[nid]
        new = None
        if sign is None:
            if b == 0x2D:
                new = ("N", nid, "-", "", False, "")
            elif 0x30 <= b <= 0x39:
                new = ("N", nid, "", chr(b), False, "")
        elif 0x30 <= b <= 0x39:
            if dot and len(fp) < node.frac_digits:
                new = ("N", nid, sign, ip, True, fp + chr(b))
            elif not dot and ip != "0" and len(ip) < node.int_digits:
                new = ("N", nid, sign, ip + chr(b), False, "")
        elif b == 0x2E and ip and not dot and node.frac_digits > 0:
            new = ("N", nid, sign, ip, True, "")
        if new is not None:
            return stack[:-1] + (new,) if self._num_alive(new) else None
        if b not in _NUMBER_ENDS:                                 # only , ] } can follow a number here
            return None
        return _Pop(None) if sign is not None and self._num_complete(top) else None

    def _byte_T(self, stack, top, b):
        _, nid, phase, n, d, pend, value, seen = top
        node: _Str = self.nodes[nid]
        if phase == 0:
            if b != 0x22:
                return None
            new = ("T", nid, 1, 0, d, None, value, seen)
        elif phase == 1:
            if b == 0x22:                                           # closing quote
                if n >= node.min_len and node.dfa.accept[d] and (not seen or value not in seen):
                    return self._pop(stack, value)
                return None
            if b == 0x5C:
                new = ("T", nid, 2, n, d, None, value, seen)
            elif 0x20 <= b <= 0x7F:
                return self._char(stack, top, node, b)
            elif b in _UTF8_LEAD:
                new = ("T", nid, 3, n, d, _UTF8_LEAD[b], value, seen)
            else:
                return None
        elif phase == 2:
            c = _ESCAPES.get(b)
            return None if c is None else self._char(stack, top, node, c)
        else:
            cp, rem, lo, hi = pend
            if not lo <= b <= hi:
                return None
            cp = cp << 6 | (b & 0x3F)
            if rem == 1:
                return self._char(stack, top, node, cp)
            new = ("T", nid, 3, n, d, (cp, rem - 1, 0x80, 0xBF), value, seen)
        return stack[:-1] + (new,) if self._str_alive(new) else None

    def _char(self, stack, top, node: _Str, c: int):
        _, nid, _, n, d, _, value, seen = top
        k = node.dfa.class_of(c)
        t = node.dfa.trans[d][k] if k >= 0 and n < node.max_len else -1
        if t < 0:
            return None
        new = ("T", nid, 1, n + 1, t, None, None if value is None else value + chr(c), seen)
        return stack[:-1] + (new,) if self._str_alive(new) else None

    def _byte_O(self, stack, top, b):
        _, nid, phase, used, cur = top
        node: _Obj = self.nodes[nid]
        everything = (1 << len(node.names)) - 1
        if phase == 0:
            return stack[:-1] + (("O", nid, 1, 0, -1),) if b == 0x7B else None
        if phase in (1, 8):
            if b == 0x7D and phase == 1 and node.required == 0:
                return self._pop(stack, None)
            if used == everything:
                return None
            excluded = frozenset(i for i in range(len(node.names)) if used >> i & 1)
            return _Retry(stack[:-1] + (("O", nid, 2, used, -1), ("L", node.key_lit, b"", excluded)))
        if phase == 3:
            return stack[:-1] + (("O", nid, 4, used, cur),) if b == 0x3A else None
        if phase == 4:
            if b != 0x20:
                return None
            return stack[:-1] + (("O", nid, 5, used, cur), self._start(node.children[cur]))
        if phase == 6:
            if b == 0x2C and used != everything:
                return stack[:-1] + (("O", nid, 7, used, -1),)
            if b == 0x7D and node.required & ~used == 0:
                return self._pop(stack, None)
            return None
        if phase == 7:
            return stack[:-1] + (("O", nid, 8, used, -1),) if b == 0x20 else None
        return None

    def _byte_A(self, stack, top, b):
        _, nid, phase, count, seen = top
        node: _Arr = self.nodes[nid]
        if phase == 0:
            return stack[:-1] + (("A", nid, 1, 0, seen),) if b == 0x5B else None
        if phase in (1, 5):
            if b == 0x5D and phase == 1 and node.min_items == 0:
                return self._pop(stack, None)
            if count >= node.max_items:
                return None
            return _Retry(stack[:-1] + (("A", nid, 2, count, seen), self._start(node.item, seen, node.unique)))
        if phase == 3:
            if b == 0x2C and count < node.max_items and self._alive(self._start(node.item, seen, node.unique)):
                return stack[:-1] + (("A", nid, 4, count, seen),)
            if b == 0x5D and count >= node.min_items:
                return self._pop(stack, None)
            return None
        if phase == 4:
            return stack[:-1] + (("A", nid, 5, count, seen),) if b == 0x20 else None
        return None

    # ------------------------------------------------------------------------------------------- utilities
    def check(self, text: str, first_call_index: int = 0) -> Check:
        """Run a section's text (after <|tool_calls_section_begin|>, which may lead it; special tokens as their
        names) through the automaton -> Check(ok, complete, offset): ok = no dead end (a valid prefix),
        complete = the section is closed, offset = characters consumed before the dead end."""
        if text.startswith(TOOL_CALLS_SECTION_BEGIN):
            text = text[len(TOOL_CALLS_SECTION_BEGIN):]
        stack, pos = self.initial(first_call_index), 0
        for piece in re.split("(" + "|".join(re.escape(a) for a in _ALL_CHAT_NAMES) + ")", text):
            if not piece:
                continue
            if piece in _ALL_CHAT_NAMES:
                nxt = self.feed_atom(stack, piece) if piece in ATOMS else None
                if nxt is None:
                    return Check(False, False, pos)
                stack, pos = nxt, pos + len(piece)
                continue
            for ch in piece:
                for b in ch.encode("utf-8", errors="surrogatepass"):
                    stack = self.feed_byte(stack, b)
                    if stack is None:
                        return Check(False, False, pos)
                pos += 1
        return Check(True, self.section_closed(stack), pos)

    def max_section_tokens(self) -> int:
        """An upper bound on the tokens after <|tool_calls_section_begin|> up to and with <|im_end|> (every
        token is an atom or at least one byte)."""
        per_call = max(len(canonical_call_id(n, 10 ** 9)) + self._max_bytes(a) for n, a in zip(self.names, self.args))
        return self.config.max_calls * (per_call + 3) + 2

    def _max_bytes(self, node_id: int) -> int:
        node = self.nodes[node_id]
        if isinstance(node, _Str):
            return 2 + 4 * node.max_len                  # 4 bytes per character at most (UTF-8; escapes: 2)
        if isinstance(node, _Num):
            return 2 + node.int_digits + node.frac_digits
        if isinstance(node, _Lit):
            return max(len(t) for t in node.texts)
        if isinstance(node, _Union):
            return max(self._max_bytes(a) for a in set(node.first.values()))
        if isinstance(node, _Arr):
            return 2 + node.max_items * (self._max_bytes(node.item) + 2)
        keys = self.nodes[node.key_lit].texts
        return 2 + sum(len(k) + 4 + self._max_bytes(c) for k, c in zip(keys, node.children))


class Check(NamedTuple):
    ok: bool
    complete: bool
    offset: int


class _Retry:
    __slots__ = ("stack",)

    def __init__(self, stack):
        self.stack = stack


class _Pop:
    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


def _utf8_lead_table() -> dict[int, tuple[int, int, int, int]]:
    """Lead byte -> (code point bits so far, continuation bytes to come, range of the next byte) (RFC 3629:
    no overlong forms, no surrogates, nothing above U+10FFFF)."""
    table = {}
    for b in range(0xC2, 0xE0):
        table[b] = (b & 0x1F, 1, 0x80, 0xBF)
    for b in range(0xE0, 0xF0):
        table[b] = (b & 0x0F, 2, 0xA0 if b == 0xE0 else 0x80, 0x9F if b == 0xED else 0xBF)
    for b in range(0xF0, 0xF5):
        table[b] = (b & 0x07, 3, 0x90 if b == 0xF0 else 0x80, 0x8F if b == 0xF4 else 0xBF)
    return table


_UTF8_LEAD = _utf8_lead_table()


def _utf8_interval(pend) -> tuple[int, int]:
    """The code points a partly written UTF-8 character can still become."""
    cp, rem, lo, hi = pend
    shift = 6 * (rem - 1)
    base = cp << (6 * rem)
    return base + ((lo & 0x3F) << shift), base + ((hi & 0x3F) << shift) + (1 << shift) - 1


# ============================================================================ vocabulary and masks
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


_ALL_CHAT_NAMES = (TOOL_CALLS_SECTION_BEGIN,) + ATOMS + (IM_USER, IM_ASSISTANT, IM_SYSTEM, IM_MIDDLE)


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


@functools.lru_cache(maxsize=64)
def _grammar_cached(key: str, config: EnforcerConfig) -> ToolCallGrammar:
    return ToolCallGrammar(json.loads(key), config)


def compile_grammar(tools: Sequence[dict], config: EnforcerConfig = EnforcerConfig()) -> ToolCallGrammar:
    """ToolCallGrammar(tools, config), cached on the tools' JSON (requests that offer the same tools share it)."""
    return _grammar_cached(json.dumps(list(tools), sort_keys=True), config)


def _walk(grammar: ToolCallGrammar, stack: tuple, toks: list[bytes], ids: np.ndarray, group_end: list[int],
          out: np.ndarray) -> None:
    """Set out[id] for each token of the sorted `toks` whose bytes keep `stack` alive: a depth-first walk of
    the implicit trie (one state per depth of the current prefix). A dead first byte skips its group
    (group_end[b]: index of the first token after those starting with byte b); a deeper dead prefix skips its
    subtree by bisection."""
    feed, n, i = grammar.feed_byte, len(toks), 0
    while i < n:
        b0 = toks[i][0]
        first = feed(stack, b0)
        end = group_end[b0]
        if first is None:
            i = end
            continue
        states, prev = [stack, first], toks[i][:1]
        while i < end:
            tok = toks[i]
            common, limit = 1, min(len(prev), len(tok), len(states) - 1)
            while common < limit and prev[common] == tok[common]:
                common += 1
            del states[common + 1:]
            dead_at = -1
            for depth in range(common, len(tok)):
                nxt = feed(states[depth], tok[depth])
                if nxt is None:
                    dead_at = depth
                    break
                states.append(nxt)
            if dead_at < 0:
                out[ids[i]] = True
                prev = tok
                i += 1
            else:
                after = _successor(tok[:dead_at + 1])
                i = end if after is None else bisect.bisect_left(toks, after, i + 1, end)
                prev = tok[:dead_at]
        i = end


def _successor(prefix: bytes) -> bytes | None:
    """The least byte string above every string that starts with `prefix` (None: there is none)."""
    prefix = prefix.rstrip(b"\xff")
    return prefix[:-1] + bytes((prefix[-1] + 1,)) if prefix else None


class _LRU:
    def __init__(self, size: int):
        self.size, self.data, self.lock = size, collections.OrderedDict(), threading.Lock()

    def get(self, key):
        with self.lock:
            value = self.data.get(key)
            if value is not None:
                self.data.move_to_end(key)
            return value

    def put(self, key, value):
        with self.lock:
            self.data[key] = value
            if len(self.data) > self.size:
                self.data.popitem(last=False)


_MASK_CACHES: "weakref.WeakKeyDictionary[ToolCallGrammar, weakref.WeakKeyDictionary]" = weakref.WeakKeyDictionary()


def _mask_cache(grammar: ToolCallGrammar, vocab: VocabIndex) -> _LRU:
    with _VOCABS_LOCK:
        per_vocab = _MASK_CACHES.setdefault(grammar, weakref.WeakKeyDictionary())
        cache = per_vocab.get(vocab)
        if cache is None:
            cache = per_vocab[vocab] = _LRU(max(64, min(4096, (1 << 26) // vocab.vocab_size)))
        return cache


def _free_string(grammar: ToolCallGrammar, vocab: VocabIndex, stack: tuple, out: np.ndarray) -> None:
    """Mask of the ordinary tokens inside a string without pattern, no character pending: decided with numpy
    from each token's plain prefix and kind (`_split_plain`) against the room left, the characters still
    required and the '<' just written; only the distinct tails after a closing quote (walked from the state
    after the string) and the tokens holding a backslash go through the automaton. A string that keeps its text
    (an item of a uniqueItems array) takes the tokens that leave room for one more character at once (over a
    million completions, a handful of earlier items to avoid) and runs the others through the automaton (those
    that fill the string one by one, those that close or escape it by a trie walk)."""
    _, nid, _, n, d, _, value, seen = stack[-1]
    node: _Str = grammar.nodes[nid]
    room, chars, kind = node.max_len - n, vocab.prefix_chars, vocab.kind
    ok = chars <= room
    if node.dfa.lt[d]:
        ok &= ~vocab.pipe_first
    if value is not None:
        out |= ok & ((kind == PLAIN) & (chars >= 1) & (chars < room) | (kind == OPENS_CHAR) & (chars + 1 < room))
        # a plain token that fills the string must be followed by its closing quote: allowed iff the string is
        # long enough and not an earlier item
        if n + room >= node.min_len:
            out |= ok & (kind == PLAIN) & (chars >= 1) & (chars == room)
            for f in seen:
                if len(f) == node.max_len and f.startswith(value):
                    i = vocab.id_of.get(f[n:].encode("utf-8"))
                    if i is not None and kind[i] == PLAIN:
                        out[i] = False
        for i in np.flatnonzero(ok & (kind == OPENS_CHAR) & (chars + 1 == room)):
            out[i] = grammar.feed_bytes(stack, vocab.bytes_of[int(i)]) is not None
        _walk(grammar, stack, vocab.quote_toks, vocab.quote_ids, vocab.quote_group_end, out)
        return
    tail_ok = np.zeros(len(vocab.tails) + 1, bool)                  # last entry: nothing after the quote
    tail_ok[-1] = True
    _walk(grammar, grammar._pop(stack, None), vocab.tails, vocab.tail_ids, vocab.tail_group_end, tail_ok)
    out |= ok & ((kind == PLAIN) & (chars >= 1)
                 | (kind == OPENS_CHAR) & (chars + 1 <= room)
                 | (kind == CLOSES) & (n + chars >= node.min_len) & tail_ok[vocab.tail_of])
    _walk(grammar, stack, vocab.escape_toks, vocab.escape_ids, vocab.escape_group_end, out)


def _mask_key(grammar: ToolCallGrammar, vocab: VocabIndex, stack: tuple) -> tuple:
    """The cache key of a state's mask: the state itself, except inside a string without pattern that keeps no
    text, whose mask depends on its length n only through the room left and the characters still
    required, each as far as one token reaches (clamped to vocab.max_len + 1), and on a pending UTF-8
    character only through the bytes it still needs (any character is allowed there)."""
    top = stack[-1]
    if top[0] != "T" or top[2] == 0 or top[6] is not None:
        return stack
    _, nid, phase, n, d, pend, _, _ = top
    node = grammar.nodes[nid]
    if not node.dfa.free:
        return stack
    reach = vocab.max_len + 1
    norm = ("T*", nid, phase, min(node.max_len - n, reach), max(0, min(node.min_len - n, reach)), node.dfa.lt[d],
            None if pend is None else pend[1:])
    return stack[:-1] + (norm,)


def allowed_tokens(grammar: ToolCallGrammar, vocab: VocabIndex, stack: tuple, *, use_cache: bool = True,
                   fast: bool = True) -> np.ndarray:
    """bool [vocab_size]: the tokens that keep `stack` alive (read-only when cached). fast=False walks every
    token (no plain-string shortcut), for tests."""
    cache = _mask_cache(grammar, vocab) if use_cache else None
    key = _mask_key(grammar, vocab, stack)
    if cache is not None:
        hit = cache.get(key)
        if hit is not None:
            return hit
    out = np.zeros(vocab.vocab_size, bool)
    for name, i in vocab.atoms.items():
        if name in ATOMS and grammar.feed_atom(stack, name) is not None:
            out[i] = True
    top = stack[-1]
    if fast and top[0] == "T" and top[2] == 1 and grammar.nodes[top[1]].dfa.free:
        _free_string(grammar, vocab, stack, out)
    else:
        _walk(grammar, stack, vocab.toks, vocab.ids, vocab.group_end, out)
    if cache is not None:
        out.setflags(write=False)
        cache.put(key, out)
    return out


# ============================================================================ the per-request / per-sample API
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
