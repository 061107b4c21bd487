"""A scripted agent that follows a task's reference solution and is sometimes wrong on purpose.

ScriptedSolver(task, error_rate, seed) is a Backend: each chat() returns the next step of `task.solution` (one
tool call per turn, or a {"say": ...} text turn), then `task.answer` (its "{results}", if any, replaced by the
episode's tool results joined by "; "). With probability error_rate per turn it
makes one seeded mistake instead, so that the judge has work:

    invalid_json, unterminated_section   raw Kimi text with a broken call (the env returns a parse error)
    unknown_tool                         a call to a tool that is not declared
    wrong_argument                       the step's call with one argument value changed
    skip_step                            the next step is left out
    early_answer                         the final answer before the work is done
    vague_answer                         a final answer that states none of the facts (only at the end)

After a malformed call it repeats the step correctly; after a retryable tool error ({"retryable": true} in the
result, e.g. an injected timeout) it repeats the call. Deterministic: the same task, seed and observations give
the same replies.
"""

from __future__ import annotations

import json
import random
from typing import Sequence

from kimi_jax.agentic.environment import ERROR_PREFIX
from kimi_jax.agentic.tasks import Task
from kimi_jax.chat.template import (TOOL_CALL_ARGUMENT_BEGIN, TOOL_CALL_BEGIN, TOOL_CALL_END,
                                    TOOL_CALLS_SECTION_BEGIN, TOOL_CALLS_SECTION_END)

MISTAKES = ("invalid_json", "unterminated_section", "unknown_tool", "wrong_argument", "skip_step", "early_answer")


def _call_message(name: str, arguments: dict) -> dict:
    return {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}]}


def _changed(arguments: dict, rng: random.Random) -> dict:
    key = rng.choice(sorted(arguments))
    value = arguments[key]
    if isinstance(value, bool):
        new = not value
    elif isinstance(value, int):
        new = value + 1
    elif isinstance(value, str):
        new = value[:-1] + ("0" if value[-1:] != "0" else "1") if value else "x"
    elif isinstance(value, dict) and value:
        new = _changed(value, rng)
    else:
        new = value
    return {**arguments, key: new}


class ScriptedSolver:
    def __init__(self, task: Task, *, error_rate: float = 0.0, seed: int = 0):
        if not 0 <= error_rate <= 1:
            raise ValueError(f"error_rate must be in [0, 1], got {error_rate}")
        self.task, self.error_rate = task, error_rate
        self.rng = random.Random(f"solver:{seed}:{task.task_id}")
        self.pos = 0                      # the next solution step
        self.mistakes: list[str] = []     # what it got wrong on purpose, in order

    def chat(self, messages: Sequence[dict], tools=None, **sampling) -> dict:
        last = messages[-1]
        if last["role"] == "user" and str(last.get("content", "")).startswith(ERROR_PREFIX):
            self.pos -= 1                 # the previous call was malformed: do it again
        elif last["role"] == "tool" and '"retryable": true' in last.get("content", ""):
            self.pos -= 1
        steps = self.task.solution
        if self.pos >= len(steps):
            self.pos += 1
            if self.rng.random() < self.error_rate:
                return self._mistake("vague_answer", None, messages)
            return {"role": "assistant", "content": self._answer(messages)}
        step = steps[self.pos]
        self.pos += 1
        if "say" not in step and self.rng.random() < self.error_rate:
            return self._mistake(self.rng.choice(MISTAKES), step, messages)
        if "say" in step:
            return {"role": "assistant", "content": step["say"]}
        return _call_message(step["name"], step["arguments"])

    def _answer(self, messages: Sequence[dict]) -> str:
        results = [m["content"] for m in messages if m["role"] == "tool" and '"error"' not in m["content"]]
        return self.task.answer.replace("{results}", "; ".join(results))

    def _mistake(self, kind: str, step: dict | None, messages: Sequence[dict]) -> dict:
        self.mistakes.append(kind)
        if kind == "vague_answer":
            return {"role": "assistant", "content": "All done."}
        if kind == "early_answer":
            self.pos = len(self.task.solution)
            return {"role": "assistant", "content": self._answer(messages)}
        if kind == "skip_step":
            if self.pos >= len(self.task.solution) or "say" in self.task.solution[self.pos]:
                return {"role": "assistant", "content": self._answer(messages)}
            step = self.task.solution[self.pos]
            self.pos += 1
            return _call_message(step["name"], step["arguments"])
        if kind == "wrong_argument":
            return _call_message(step["name"], _changed(step["arguments"], self.rng))
        if kind == "unknown_tool":
            return _call_message(step["name"] + "_v2", step["arguments"])
        index = sum(len(m.get("tool_calls") or []) for m in messages if m["role"] == "assistant")
        args = json.dumps(step["arguments"])
        call = f"{TOOL_CALL_BEGIN}functions.{step['name']}:{index}{TOOL_CALL_ARGUMENT_BEGIN}"
        if kind == "invalid_json":
            text = f"{TOOL_CALLS_SECTION_BEGIN}{call}{args[:-1]}{TOOL_CALL_END}{TOOL_CALLS_SECTION_END}"
        else:                                                  # unterminated_section
            text = f"{TOOL_CALLS_SECTION_BEGIN}{call}{args}{TOOL_CALL_END}"
        return {"role": "assistant", "content": text}
