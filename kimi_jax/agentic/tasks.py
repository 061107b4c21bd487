"""Agents, tasks and rubrics as plain dataclasses, and the end-state check shared by the environments.

A Task is everything one episode needs: the agent (system prompt + toolset), the user's first message, the
environment's initial state (`setup`, JSON), the goal (end-state paths -> expected values, see goal_failures),
the rubric the judge scores against, and a reference `solution` the scripted solver follows (never shown to
the agent). Task ids are deterministic (`{env}-{seed}-{index:06d}`), so a resumed run regenerates the same task
for the same id.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Sequence

from kimi_jax.agentic.tools import openai_form

ABSENT = "<absent>"   # goal value: the path must not exist in the end state


@dataclasses.dataclass(frozen=True)
class Agent:
    name: str
    system_prompt: str
    tools: tuple[dict, ...]              # OpenAI-style tools

    def tool_names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A call the trajectory must contain: tool `tool` with at least these argument values."""
    tool: str
    arguments: dict[str, Any]
    description: str

    def hit_by(self, name: str, arguments: dict) -> bool:
        return name == self.tool and all(arguments.get(k) == v for k, v in self.arguments.items())


@dataclasses.dataclass(frozen=True)
class Rubric:
    success_criteria: tuple[str, ...]    # for the LLM judge, in words
    expected_tools: tuple[str, ...]      # each must be called; their first calls in this order
    checkpoints: tuple[Checkpoint, ...] = ()
    answer_mentions: tuple[str, ...] = ()  # facts the final answer must state (the LLM judge checks them)


@dataclasses.dataclass(frozen=True)
class Persona:
    """A simulated user: who they are, how they write, and what they know but tell only when asked."""
    name: str
    style: str
    facts: dict[str, str]                # e.g. {"e-mail address": "ana@example.com"}
    max_turns: int = 3                   # user replies after the first message, at most


@dataclasses.dataclass(frozen=True)
class Task:
    task_id: str
    env: str                             # an ENVIRONMENTS key
    agent: Agent
    prompt: str                          # the user's first message
    setup: dict[str, Any]                # the environment's initial state (JSON)
    goal: dict[str, Any]                 # end-state path -> expected value (goal_failures)
    rubric: Rubric
    solution: tuple[dict, ...]           # steps: {"name", "arguments"} calls or {"say": text}; then `answer`
    answer: str                          # the reference final answer ("{results}": the episode's tool results)
    persona: Persona | None = None
    difficulty: int = 1


def task_id(env: str, seed: int, index: int) -> str:
    return f"{env}-{seed}-{index:06d}"


def task_rng(seed: int, index: int, salt: str = "") -> random.Random:
    """The generator of task `index` under `seed`: independent of every other index."""
    return random.Random(f"{salt}:{seed}:{index}")


def lookup(state: Any, path: str) -> Any:
    """state["a"]["b"][0] for path "a/b/0" (list indices as integers); ABSENT when any step is missing. A dict key
    may itself hold "/" (file paths): "files//docs/a.txt" is state["files"]["/docs/a.txt"] (longest key first)."""
    parts, node, i = path.split("/"), state, 0
    while i < len(parts):
        if isinstance(node, dict):
            j = next((j for j in range(len(parts), i, -1) if "/".join(parts[i:j]) in node), None)
            if j is None:
                return ABSENT
            node, i = node["/".join(parts[i:j])], j
        elif isinstance(node, list) and parts[i].isdigit() and int(parts[i]) < len(node):
            node, i = node[int(parts[i])], i + 1
        else:
            return ABSENT
    return node


def goal_failures(state: dict, goal: dict[str, Any]) -> list[str]:
    """One line per goal path whose value in `state` is not the expected one (ABSENT: must not exist)."""
    failures = []
    for path, expected in goal.items():
        got = lookup(state, path)
        if got != expected:
            failures.append(f"{path}: expected {expected!r}, got {got!r}")
    return failures


def make_agent(domain: str, tools: Sequence[dict], rng: random.Random) -> Agent:
    """A synthesized agent for `domain`: a system prompt drawn from templates (company, tone, rules)."""
    company = rng.choice(["Northwind", "Acme", "Globex", "Initech", "Umbrella", "Hooli", "Stark", "Wayne"])
    tone = rng.choice(["concise", "friendly", "formal", "patient"])
    rules = rng.sample(["Confirm what you changed in your final answer.",
                        "Use the tools to check facts instead of guessing.",
                        "Ask the user for missing information rather than inventing it.",
                        "Keep the final answer to one or two sentences.",
                        "Make one tool call at a time and read its result before the next."], 3)
    prompt = (f"You are the {domain} assistant of {company}. Be {tone}. You can call tools to act on the "
              f"user's behalf.\nRules:\n" + "\n".join(f"- {r}" for r in rules))
    return Agent(name=f"{company.lower()}-{domain.replace(' ', '-')}-{tone}", system_prompt=prompt,
                 tools=tuple(openai_form(t) for t in tools))
