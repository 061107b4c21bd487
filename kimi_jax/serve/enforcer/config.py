"""The enforcer's bounds (EnforcerConfig), its error for schemas it cannot enforce (UnsupportedSchema) and the
chat special tokens the automaton reads."""

from __future__ import annotations

import dataclasses

from kimi_jax.chat.template import (IM_ASSISTANT, IM_END, IM_MIDDLE, IM_SYSTEM, IM_USER, TOOL_CALL_ARGUMENT_BEGIN,
                                    TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_SECTION_BEGIN,
                                    TOOL_CALLS_SECTION_END)

ATOMS = (TOOL_CALL_BEGIN, TOOL_CALL_ARGUMENT_BEGIN, TOOL_CALL_END, TOOL_CALLS_SECTION_END, IM_END)
_ALL_CHAT_NAMES = (TOOL_CALLS_SECTION_BEGIN,) + ATOMS + (IM_USER, IM_ASSISTANT, IM_SYSTEM, IM_MIDDLE)


class UnsupportedSchema(ValueError):
    """A tool whose parameters use JSON Schema outside the supported subset (package docstring), or that no
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
