"""Agentic tool-use data (Kimi K2 section 3.1.1): tool specs, agents and tasks with rubrics, tool environments
behind one Gym-like interface, LLM backends, a judge, and the synthesis pipeline writing ArrayRecord shards; and
multi-turn RL in those environments with their rewards (kimi_jax.agentic.rl)."""

from kimi_jax.agentic.backends import (Backend, BackendError, EngineBackend, OpenAIBackend, ScriptedBackend,
                                       TokenBucket)
from kimi_jax.agentic.env_accounts import AccountsEnv
from kimi_jax.agentic.env_calendar import CalendarEnv
from kimi_jax.agentic.env_files import FilesEnv
from kimi_jax.agentic import simulated_tasks
from kimi_jax.agentic.env_simulated import SimulatedToolEnv, scripted_simulator
from kimi_jax.agentic.environment import Environment, ToolError
from kimi_jax.agentic.judge import RejectionStats, Verdict, judge, parse_verdict, rule_checks, scripted_judge
from kimi_jax.agentic.rollout import Trajectory, run_episode
from kimi_jax.agentic.rl import AgenticRL, Episode, episode_reward, run_episodes, summarize, with_agent
from kimi_jax.agentic.solver import ScriptedSolver
from kimi_jax.agentic.synthesis import ENVIRONMENTS, SynthesisConfig, read_shard, synthesize
from kimi_jax.agentic.tasks import Agent, Checkpoint, Persona, Rubric, Task, goal_failures
from kimi_jax.agentic.tools import ToolSpecError, deduplicate, load_tool_file, load_tools, validate_tool
from kimi_jax.agentic.user import SimulatedUser, scripted_user

__all__ = [
    "AccountsEnv", "Agent", "AgenticRL", "Backend", "BackendError", "CalendarEnv", "Checkpoint", "ENVIRONMENTS",
    "EngineBackend", "Environment", "Episode", "FilesEnv", "OpenAIBackend", "Persona", "RejectionStats", "Rubric",
    "ScriptedBackend", "ScriptedSolver", "SimulatedToolEnv", "SimulatedUser", "SynthesisConfig", "Task",
    "TokenBucket", "ToolError", "ToolSpecError", "Trajectory", "Verdict", "deduplicate", "episode_reward",
    "goal_failures", "judge", "load_tool_file", "load_tools", "parse_verdict", "read_shard", "rule_checks",
    "run_episode", "run_episodes", "scripted_judge", "scripted_simulator", "scripted_user", "simulated_tasks",
    "summarize", "synthesize", "validate_tool", "with_agent",
]
