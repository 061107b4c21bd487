"""One episode: an agent backend talking to an environment until it is done.

    trajectory = run_episode(env, task, agent_backend)

The trajectory's `messages` are the dialogue as it belongs in training data: the agent's system prompt, the
user's messages, the assistant turns as the environment recorded them (canonical call ids), tool results and
error observations; `tools` is the agent's toolset. encode(tokenizer, messages, tools) gives ids and loss mask.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kimi_jax.agentic.backends import Backend, BackendError
from kimi_jax.agentic.environment import Environment
from kimi_jax.agentic.tasks import Task


@dataclasses.dataclass
class Trajectory:
    task_id: str
    messages: list[dict]
    tools: list[dict]
    reward: float = 0.0
    done: bool = False
    truncated: bool = False
    calls: list[dict] = dataclasses.field(default_factory=list)          # executed: {"name", "arguments", "result"}
    errors: list[dict] = dataclasses.field(default_factory=list)         # malformed-call errors, all turns
    goal_failures: list[str] = dataclasses.field(default_factory=list)
    backend_error: str | None = None                                     # the agent's backend failed for good

    @property
    def final_answer(self) -> str | None:
        last = self.messages[-1] if self.messages else {}
        if last.get("role") == "assistant" and not last.get("tool_calls"):
            return last.get("content") or ""
        return None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def run_episode(env: Environment, task: Task, agent: Backend, **sampling) -> Trajectory:
    """Reset `env` on `task` and let `agent` act until done (the env's max_turns bounds it). A backend failure
    ends the episode with `backend_error` set, not an exception."""
    observation = env.reset(task)
    messages = [{"role": "system", "content": task.agent.system_prompt}] + observation
    trajectory = Trajectory(task.task_id, messages, list(task.agent.tools))
    while not trajectory.done:
        try:
            reply = agent.chat(messages, list(task.agent.tools), **sampling)
        except BackendError as e:
            trajectory.backend_error = str(e)
            break
        observation, reward, done, info = env.step(reply)
        messages.append(info["assistant"])
        messages.extend(observation)
        trajectory.calls.extend(info["calls"])
        trajectory.errors.extend(info["errors"])
        trajectory.reward, trajectory.done, trajectory.truncated = reward, done, info["truncated"]
        trajectory.goal_failures = info.get("goal_failures", [])
    return trajectory
