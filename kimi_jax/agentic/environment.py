"""The Gym-like interface every tool environment shares.

    observation = env.reset(task)                               # [{"role": "user", "content": task.prompt}]
    observation, reward, done, info = env.step(assistant_message)

assistant_message: an OpenAI-style assistant message. Its tool calls are taken from `tool_calls` (each checked
against the toolset: a declared name, arguments a JSON object valid for the tool's schema) or, when the
content holds Kimi tool-call tokens (a backend that could not parse the model's text returns it raw), parsed
from the content with `kimi_jax.chat.parse_assistant` (ids must count on over the episode's calls).

Observations are lists of OpenAI-style messages:
- calls, all well-formed: one {"role": "tool", "tool_call_id", "content": JSON result} per call, in order; a
  tool that fails (unknown order, overlap, ...) returns {"error": "..."} as its result;
- any malformed call: nothing is executed and the observation is one {"role": "user", "content": ...} whose
  content is "Tool call error" + JSON {"errors": [{"kind", "message", "span"}]} (ChatParseError fields), so the
  model can fix its call; the episode goes on (never an exception);
- no calls: the turn is a reply to the user. With a persona the simulated user may answer (a user message);
  otherwise the episode ends with reward 1.0 if the goal's end state is reached, else 0.0 (a task without a
  goal, e.g. a read-only question, gets 1.0 for finishing: whether it succeeded is the judge's call).
After max_turns assistant turns the episode ends (info["truncated"]).

info: {"assistant": the message as it belongs in the dialogue (canonical call ids), "calls": [{"name",
"arguments", "result"}] executed this step, "errors": [error dicts], "goal_failures": [...] (when done),
"truncated": bool}. Subclasses implement _setup(task), _execute(name, arguments) and state().
"""

from __future__ import annotations

import abc
import json
import random
from typing import Any

from kimi_jax import chat
from kimi_jax.agentic.tasks import Task, goal_failures
from kimi_jax.chat.template import (TOOL_CALL_ARGUMENT_BEGIN, TOOL_CALL_BEGIN, TOOL_CALL_END,
                                    TOOL_CALLS_SECTION_BEGIN, TOOL_CALLS_SECTION_END)
from kimi_jax.data.tokenizers import CHAT_SPECIAL_TOKENS

ERROR_PREFIX = "Tool call error"


class ToolError(Exception):
    """A tool that ran and failed (bad id, conflict, ...): its message becomes the call's {"error": ...}."""


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def calls_as_text(message: dict, first_index: int) -> str:
    """An assistant message with tool_calls -> the Kimi text a model would have generated (canonical ids)."""
    calls = []
    for k, call in enumerate(message.get("tool_calls") or []):
        function = call.get("function") if isinstance(call, dict) else None
        function = function if isinstance(function, dict) else {}
        args = function.get("arguments", "")
        args = args if isinstance(args, str) else json.dumps(args)
        calls.append(f"{TOOL_CALL_BEGIN}functions.{function.get('name')}:{first_index + k}"
                     f"{TOOL_CALL_ARGUMENT_BEGIN}{args}{TOOL_CALL_END}")
    return (message.get("content") or "") + TOOL_CALLS_SECTION_BEGIN + "".join(calls) + TOOL_CALLS_SECTION_END


def error_observation(errors: list[dict]) -> dict:
    return {"role": "user", "content": f"{ERROR_PREFIX}: {dumps({'errors': errors})}\nFix the call and try again."}


class Environment(abc.ABC):
    """Base class (module docstring). seed: with the task id, seeds everything random in an episode."""

    name = "base"

    def __init__(self, *, seed: int = 0, max_turns: int = 12, user=None):
        self.seed, self.max_turns, self.user = seed, max_turns, user
        self.task: Task | None = None
        self.done = False

    # -- subclass hooks (every environment implements all three) ---------------------------------------------
    @abc.abstractmethod
    def _setup(self, task: Task) -> None:
        """Build the environment's state for `task`."""

    @abc.abstractmethod
    def _execute(self, name: str, arguments: dict) -> Any:
        """Run one tool call; raise ToolError for a failure the model should see."""

    @abc.abstractmethod
    def state(self) -> dict:
        """The end state the goal is checked against (JSON)."""

    # -- the interface ----------------------------------------------------------------------------------------
    def reset(self, task: Task) -> list[dict]:
        self.task = task
        self.rng = random.Random(f"{self.seed}:{task.task_id}")
        self.n_calls, self.turns, self.user_turns, self.done = 0, 0, 0, False
        self.dialogue: list[dict] = [{"role": "user", "content": task.prompt}]
        self._setup(task)
        return [dict(self.dialogue[0])]

    def step(self, message: dict) -> tuple[list[dict], float, bool, dict]:
        if self.task is None or self.done:
            raise RuntimeError(f"{type(self).__name__}.step " + ("after the episode ended" if self.done else
                                                                 "before reset(task)"))
        self.turns += 1
        info: dict[str, Any] = {"calls": [], "errors": [], "truncated": False}
        parsed = self._parse(message)
        info["errors"] = [{"kind": e.kind, "message": e.message, "span": list(e.span)} for e in parsed.errors]
        if parsed.errors:
            info["assistant"] = {"role": "assistant", "content": message.get("content") or ""}
            observation = [error_observation(info["errors"])]
        elif parsed.tool_calls:
            calls = [{**c, "id": chat.canonical_call_id(c["function"]["name"], self.n_calls + k)}
                     for k, c in enumerate(parsed.tool_calls)]
            self.n_calls += len(calls)
            info["assistant"] = {"role": "assistant", "content": parsed.content, "tool_calls": calls}
            observation = []
            for call in calls:
                name, arguments = call["function"]["name"], json.loads(call["function"]["arguments"])
                result = self._run_tool(name, arguments)
                info["calls"].append({"name": name, "arguments": arguments, "result": result})
                observation.append({"role": "tool", "tool_call_id": call["id"], "content": dumps(result)})
        else:
            info["assistant"] = {"role": "assistant", "content": parsed.content}
            observation = []
            self.dialogue.append(info["assistant"])
            reply = self._user_reply()
            if reply is None:
                return self._finish(observation, info)
            observation = [{"role": "user", "content": reply}]
            self.dialogue.extend(observation)
            return observation, 0.0, False, info
        self.dialogue.append(info["assistant"])
        self.dialogue.extend(observation)
        if self.turns >= self.max_turns:
            info["truncated"] = True
            return self._finish(observation, info)
        return observation, 0.0, False, info

    # -- internals --------------------------------------------------------------------------------------------
    def _parse(self, message: dict) -> chat.ParsedAssistant:
        tools = list(self.task.agent.tools)
        content = message.get("content") or ""
        if not isinstance(content, str):
            return chat.ParsedAssistant("", [], [chat.ChatParseError(
                "bad_message", f"assistant content must be a string, got {type(content).__name__}", (0, 0))])
        if message.get("tool_calls"):
            return chat.parse_assistant(calls_as_text(message, self.n_calls), tools, first_call_index=self.n_calls)
        if any(token in content for token in CHAT_SPECIAL_TOKENS):
            return chat.parse_assistant(content, tools, first_call_index=self.n_calls)
        return chat.ParsedAssistant(content, [])

    def _run_tool(self, name: str, arguments: dict) -> Any:
        try:
            return self._execute(name, arguments)
        except ToolError as e:
            return {"error": str(e)}

    def _user_reply(self) -> str | None:
        persona = self.task.persona
        if self.user is None or persona is None or self.user_turns >= persona.max_turns:
            return None
        self.user_turns += 1
        return self.user.reply(self.task, self.dialogue, seed=self.rng.randrange(2**31))

    def _finish(self, observation: list[dict], info: dict) -> tuple[list[dict], float, bool, dict]:
        self.done = True
        info["goal_failures"] = goal_failures(self.state(), self.task.goal)
        reward = 0.0 if info["truncated"] or info["goal_failures"] else 1.0
        return observation, reward, True, info
