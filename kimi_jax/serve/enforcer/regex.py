"""Code point interval sets and the regex subset of a string schema's `pattern`: parser, Thompson NFA and the
string DFA (pattern intersected with "no '<|'") that string frames step through."""

from __future__ import annotations

import bisect
import re

from .config import UnsupportedSchema

_MAX_CP = 0x10FFFF
# The characters a generated string can hold: \b \t \n, \f \r (escaped) and every non-surrogate from space up.
_UNIVERSE = ((8, 10), (12, 13), (0x20, 0xD7FF), (0xE000, _MAX_CP))
_LT, _PIPE = ord("<"), ord("|")


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
