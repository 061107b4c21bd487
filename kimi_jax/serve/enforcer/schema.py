"""The compiled JSON-schema nodes (string, number, literal, object, array, type union) and _SchemaCompiler,
which turns a tool's parameter schema into them (the supported subset: the package docstring)."""

from __future__ import annotations

import dataclasses
import json
import re
from fractions import Fraction
from typing import Any

import jsonschema

from .config import UnsupportedSchema
from .regex import _DFA


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


class _SchemaCompiler:
    """The schema half of ToolCallGrammar (its base class): compiles schemas into `self.nodes` (node id = index)
    under `self.config`, both set by ToolCallGrammar.__init__."""

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
