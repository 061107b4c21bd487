"""Task families for RL with verifiable rewards: seedable procedural generators with difficulty levels, a held-out
split disjoint from training by construction, exact verifiers. One module per family (FAMILIES)."""

from kimi_jax.rl.tasks import arithmetic, countdown, python_functions, strings
from kimi_jax.rl.tasks.base import Problem, Reward, generate, in_held_out, last_line

FAMILIES = {module.FAMILY: module for module in (arithmetic, countdown, strings, python_functions)}

__all__ = ["FAMILIES", "Problem", "Reward", "generate", "in_held_out", "last_line"]
