"""Example arguments for any tool, drawn from its JSON Schema: what generic tasks over tools without a
hand-written task template (user-supplied MCP tools, evolved tools) call them with.

    arguments = example_arguments(tool["function"]["parameters"], rng)   # None if it cannot make a valid one

Covers object (required properties, plus each optional one with probability 1/2), string (enum, const, default,
examples, format date / email, min/maxLength), integer and number (bounds), boolean, array (items, minItems)
and null. A string with a `pattern` and none of enum/const/default/examples cannot be drawn; the result is
checked against the schema, and None returned when it does not validate.
"""

from __future__ import annotations

import random
from typing import Any

import jsonschema

_WORDS = ["alpha", "blue", "delta", "north", "river", "summit", "orbit", "maple"]


def _value(schema: dict, rng: random.Random, depth: int = 0) -> Any:
    if depth > 6:
        raise ValueError("schema nests too deeply")
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return rng.choice(schema["enum"])
    if "default" in schema:
        return schema["default"]
    if schema.get("examples"):
        return rng.choice(schema["examples"])
    kind = schema.get("type", "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        props, required = schema.get("properties", {}), set(schema.get("required", []))
        return {name: _value(sub, rng, depth + 1) for name, sub in props.items()
                if name in required or rng.random() < 0.5}
    if kind == "array":
        n = max(schema.get("minItems", 1), 1)
        return [_value(schema.get("items", {"type": "string"}), rng, depth + 1) for _ in range(n)]
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum", 0) + (1 if "exclusiveMinimum" in schema else 0))
        high = schema.get("maximum", schema.get("exclusiveMaximum", low + 101) - 1)
        value = rng.randint(int(low), max(int(low), int(high)))
        return value if kind == "integer" else float(value)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if "pattern" in schema:
        raise ValueError("cannot draw a string for a pattern")
    fmt = schema.get("format")
    if fmt == "date":
        return f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    if fmt == "email":
        return f"{rng.choice(_WORDS)}@example.com"
    text = " ".join(rng.sample(_WORDS, 2))
    text = text.ljust(schema.get("minLength", 0), "x")
    return text[:schema["maxLength"]] if "maxLength" in schema else text


def example_arguments(schema: dict, rng: random.Random) -> dict | None:
    """Arguments valid for the object schema, or None when none can be drawn (module docstring)."""
    try:
        value = _value(schema, rng)
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    return value if validator.is_valid(value) else None
