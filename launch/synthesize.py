"""Synthesise agentic tool-use trajectories: tasks -> tool environments -> judge -> ArrayRecord SFT shards.

    python launch/synthesize.py --output_dir=/tmp/agentic --num_tasks=2000 --workers=8          # scripted agent
    python launch/synthesize.py --output_dir=/tmp/agentic --num_tasks=200 --workers=4 \
        --backend=http://127.0.0.1:8000/v1 --model=tiny --rate=4                                 # an endpoint

--backend=scripted runs the scripted solver (wrong on purpose at --error_rate per turn) with scripted user, tool
simulator and judge; a URL sends every role to that OpenAI-compatible endpoint (launch/serve.py, vLLM, SGLang).
--evolve_categories=finance,health first evolves synthetic tools through the endpoint (kept in
OUTPUT_DIR/evolved_tools); the LLM-simulated environment then also makes generic tasks over them.
A rerun with the same flags resumes: finished shards are kept, the rest are redone, each trajectory lands once.
Prints the summary (kept, rejected by reason, tokens) as JSON; it is also written to OUTPUT_DIR/summary.json.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_TOOLS_DIR = flags.DEFINE_string("tools_dir", None, "Tool files (*.json, MCP style); default: the shipped set.")
_NUM_TASKS = flags.DEFINE_integer("num_tasks", 100, "Tasks to run (task i is the same in every run of a seed).")
_WORKERS = flags.DEFINE_integer("workers", 1, "Parallel worker processes.")
_BACKEND = flags.DEFINE_string("backend", "scripted", "'scripted' or an OpenAI-compatible base URL.")
_MODEL = flags.DEFINE_string("model", "kimi-jax", "Model name sent to the endpoint.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where the shards, manifests and summary.json go.")
_SEED = flags.DEFINE_integer("seed", 0, "Seeds the tasks, environments, failures and the scripted solver.")
_SHARD_SIZE = flags.DEFINE_integer("shard_size", 16, "Tasks per shard (the unit of work and of resumption).")
_ENVS = flags.DEFINE_list("envs", "accounts,calendar,files,simulated", "Environments, used round-robin.")
_ERROR_RATE = flags.DEFINE_float("error_rate", 0.25, "The scripted solver's mistakes per turn.")
_MAX_TURNS = flags.DEFINE_integer("max_turns", 12, "Assistant turns per episode, at most.")
_TOKENIZER = flags.DEFINE_string("tokenizer", "byte", "'byte' or a tiktoken.model file (or its directory).")
_TIMEOUT = flags.DEFINE_float("timeout_s", 120.0, "Per-request timeout for the endpoint.")
_RETRIES = flags.DEFINE_integer("max_retries", 3, "Retries per request (429, 5xx, timeouts), with backoff.")
_RATE = flags.DEFINE_float("rate", None, "Requests per second per worker to the endpoint (token bucket).")
_EVOLVE = flags.DEFINE_list("evolve_categories", [], "Evolve synthetic tools for these categories first "
                            "(category -> domains -> tools, through the endpoint); they join the toolset.")
_EVOLVE_DOMAINS = flags.DEFINE_integer("evolve_domains", 3, "Domains per evolved category.")
_EVOLVE_TOOLS = flags.DEFINE_integer("evolve_tools", 4, "Tools per evolved domain.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not _OUTPUT_DIR.value:
        raise app.UsageError("--output_dir is required")
    from kimi_jax.agentic.synthesis import SynthesisConfig, synthesize
    from kimi_jax.agentic.tools import TOOLS_DIR

    config = SynthesisConfig(output_dir=_OUTPUT_DIR.value, num_tasks=_NUM_TASKS.value, seed=_SEED.value,
                             workers=_WORKERS.value, shard_size=_SHARD_SIZE.value, backend=_BACKEND.value,
                             model=_MODEL.value, tools_dir=_TOOLS_DIR.value or str(TOOLS_DIR),
                             envs=tuple(_ENVS.value), error_rate=_ERROR_RATE.value, max_turns=_MAX_TURNS.value,
                             tokenizer=_TOKENIZER.value, timeout_s=_TIMEOUT.value, max_retries=_RETRIES.value,
                             rate=_RATE.value, evolve_categories=tuple(_EVOLVE.value),
                             evolve_domains=_EVOLVE_DOMAINS.value, evolve_tools=_EVOLVE_TOOLS.value)
    print(json.dumps(synthesize(config)))


if __name__ == "__main__":
    app.run(main)
