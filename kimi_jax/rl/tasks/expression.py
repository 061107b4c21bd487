"""A small parser for integer arithmetic (+ - * / and parentheses), so verifiers read model text without `eval`.

    expression := term (("+" | "-") term)*
    term       := factor (("*" | "/") factor)*
    factor     := NUMBER | "(" expression ")"

No unary minus, no other characters. Values are exact Fractions ("/" is true division).
"""

from __future__ import annotations

import re
from fractions import Fraction

MAX_CHARS = 200
MAX_DEPTH = 32          # nested parentheses (keeps the recursive descent far from Python's recursion limit)
_TOKEN = re.compile(r"\s*(?:(\d+)|([-+*/()]))")


class ExpressionError(ValueError):
    pass


def parse(text: str):
    """text -> a tree: an int, or (op, left, right) with op in "+-*/". Raises ExpressionError naming the problem."""
    if len(text) > MAX_CHARS:
        raise ExpressionError(f"expression longer than {MAX_CHARS} characters")
    tokens, position = [], 0
    text = text.rstrip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            raise ExpressionError(f"unexpected character {text[position:].lstrip()[:1]!r}")
        tokens.append(int(match.group(1)) if match.group(1) is not None else match.group(2))
        position = match.end()
    depth = 0
    for token in tokens:
        depth += (token == "(") - (token == ")")
        if depth > MAX_DEPTH:
            raise ExpressionError(f"parentheses nested deeper than {MAX_DEPTH}")
    tree, rest = _expression(tokens)
    if rest:
        raise ExpressionError(f"unexpected {rest[0]!r} after a complete expression")
    return tree


def evaluate(tree) -> Fraction:
    """The exact value of a parsed tree; ExpressionError on division by zero."""
    if isinstance(tree, int):
        return Fraction(tree)
    op, left, right = tree
    a, b = evaluate(left), evaluate(right)
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if b == 0:
        raise ExpressionError("division by zero")
    return a / b


def numbers(tree) -> list[int]:
    """The number literals of a parsed tree, left to right."""
    return [tree] if isinstance(tree, int) else numbers(tree[1]) + numbers(tree[2])


def _expression(tokens):
    return _chain(tokens, "+-", _term)


def _term(tokens):
    return _chain(tokens, "*/", _factor)


def _chain(tokens, ops, operand):
    tree, tokens = operand(tokens)
    while tokens and isinstance(tokens[0], str) and tokens[0] in ops:
        right, rest = operand(tokens[1:])
        tree, tokens = (tokens[0], tree, right), rest
    return tree, tokens


def _factor(tokens):
    if not tokens:
        raise ExpressionError("the expression ends too early")
    head = tokens[0]
    if isinstance(head, int):
        return head, tokens[1:]
    if head == "(":
        tree, rest = _expression(tokens[1:])
        if not rest or rest[0] != ")":
            raise ExpressionError("missing ')'")
        return tree, rest[1:]
    raise ExpressionError(f"expected a number or '(', got {head!r}")
