"""ToolCallGrammar: the pushdown automaton over a tool-call section (a stack of immutable frames; feed_byte /
feed_atom return the next live state or None), its UTF-8 decoding tables, and compile_grammar (cached)."""

from __future__ import annotations

import functools
import json
import re
import threading
from fractions import Fraction
from typing import NamedTuple, Sequence

from kimi_jax.chat.template import (IM_END, TOOL_CALL_ARGUMENT_BEGIN, TOOL_CALL_BEGIN, TOOL_CALL_END,
                                    TOOL_CALLS_SECTION_BEGIN, TOOL_CALLS_SECTION_END, canonical_call_id)

from .config import _ALL_CHAT_NAMES, ATOMS, EnforcerConfig, UnsupportedSchema
from .regex import _contains
from .schema import _Arr, _Lit, _Num, _Obj, _SchemaCompiler, _Str

_NAME = re.compile(r"[A-Za-z0-9_.\-]+")                                     # what parse.CALL_ID accepts
_ESCAPES = {ord('"'): ord('"'), ord("\\"): ord("\\"), ord("/"): ord("/"), ord("b"): 8, ord("f"): 12,
            ord("n"): 10, ord("r"): 13, ord("t"): 9}
_NUMBER_ENDS = frozenset(b",]}")
_BYTE = [bytes((b,)) for b in range(256)]
_ESCAPED_CHARS = tuple(sorted((c, c) for c in set(_ESCAPES.values())))


class ToolCallGrammar(_SchemaCompiler):
    """The automaton of a tool-call section for a list of tools (package docstring). Immutable after
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


@functools.lru_cache(maxsize=64)
def _grammar_cached(key: str, config: EnforcerConfig) -> ToolCallGrammar:
    return ToolCallGrammar(json.loads(key), config)


def compile_grammar(tools: Sequence[dict], config: EnforcerConfig = EnforcerConfig()) -> ToolCallGrammar:
    """ToolCallGrammar(tools, config), cached on the tools' JSON (requests that offer the same tools share it)."""
    return _grammar_cached(json.dumps(list(tools), sort_keys=True), config)
