"""The synthesis pipeline: tasks -> episodes -> judge -> ArrayRecord shards of tokenised, masked conversations.

    summary = synthesize(SynthesisConfig(output_dir="/tmp/agentic", num_tasks=1000, workers=8))

Task i (deterministic id `{env}-{seed}-{i:06d}`, env = envs[i % len(envs)]) belongs to work unit
i // shard_size. A unit runs its tasks, judges them and writes, in this order, each file atomically
(tmp + rename):
    shard-{unit:05d}.array_record   one record per kept trajectory: little-endian uint32 [ids..., loss_mask...]
                                     (2n values: the ids of chat.encode(tokenizer, messages, tools), then its
                                     loss mask, 1 on assistant tokens)
    shard-{unit:05d}.json           the manifest: {"unit", "task_ids", "kept": [{"task_id", "tokens", "messages",
                                     "tools"}] in record order, "rejected": [{"task_id", "reasons"}], "stats"}
A unit is done iff its manifest exists; a run (or a rerun after a crash) does the units that are not done, in
parallel worker processes, and rewrites their shards from scratch. Since a task is a pure function of (seed,
index) and every unit is committed by one rename, each trajectory lands exactly once. summary.json holds the
merged statistics of all manifests.

Backends: "scripted" (ScriptedSolver as the agent, scripted user, tool simulator and judge) or the base URL of
an OpenAI-compatible endpoint, which then plays every role (agent, user, simulator, judge, tool evolution).
With evolve_categories, synthetic tools are evolved first (once per run, kept under evolved_tools/) and join the
toolset; the simulated environment makes generic tasks over them.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
from pathlib import Path

import numpy as np

from kimi_jax import chat
from kimi_jax.agentic import env_accounts, env_calendar, env_files, env_simulated, simulated_tasks
from kimi_jax.agentic.backends import Backend, OpenAIBackend, ScriptedBackend
from kimi_jax.agentic.evolve import evolve_tools, write_tool_file
from kimi_jax.agentic.judge import RejectionStats, judge, scripted_judge
from kimi_jax.agentic.rollout import run_episode
from kimi_jax.agentic.solver import ScriptedSolver
from kimi_jax.agentic.tasks import Task
from kimi_jax.agentic.tools import TOOLS_DIR, deduplicate, load_tools
from kimi_jax.agentic.user import SimulatedUser, scripted_user
from kimi_jax.data.sources import write_token_shard
from kimi_jax.data.tokenizers import load_tokenizer

ENVIRONMENTS = {"accounts": env_accounts.AccountsEnv, "calendar": env_calendar.CalendarEnv,
                "files": env_files.FilesEnv, "simulated": env_simulated.SimulatedToolEnv}
_TASK_MAKERS = {"accounts": env_accounts.make_task, "calendar": env_calendar.make_task,
                "files": env_files.make_task}


@dataclasses.dataclass(frozen=True)
class SynthesisConfig:
    output_dir: str
    num_tasks: int
    seed: int = 0
    workers: int = 1
    shard_size: int = 16
    backend: str = "scripted"               # "scripted" or an OpenAI-compatible base URL
    model: str = "kimi-jax"                 # the model name sent to the endpoint
    tools_dir: str = str(TOOLS_DIR)
    envs: tuple[str, ...] = ("accounts", "calendar", "files", "simulated")
    error_rate: float = 0.25                # the scripted solver's mistakes per turn
    max_turns: int = 12
    tokenizer: str = "byte"
    timeout_s: float = 120.0
    max_retries: int = 3
    rate: float | None = None               # requests per second to the endpoint, per worker
    evolve_categories: tuple[str, ...] = ()  # evolve synthetic tools for these categories first (needs an LLM)
    evolve_domains: int = 3                 # domains per category
    evolve_tools: int = 4                   # tools per domain

    def __post_init__(self):
        unknown = [e for e in self.envs if e not in ENVIRONMENTS]
        if unknown or not self.envs:
            raise ValueError(f"envs must be among {sorted(ENVIRONMENTS)}, got {list(self.envs)}")
        if self.num_tasks < 0 or self.workers < 1 or self.shard_size < 1:
            raise ValueError(f"need num_tasks >= 0, workers >= 1, shard_size >= 1; got {self.num_tasks}, "
                             f"{self.workers}, {self.shard_size}")

    @property
    def num_units(self) -> int:
        return -(-self.num_tasks // self.shard_size)


def make_task(config: SynthesisConfig, index: int, tools: list[dict]) -> Task:
    env = config.envs[index % len(config.envs)]
    if env == "simulated":
        return simulated_tasks.make_task(config.seed, index, tools)
    return _TASK_MAKERS[env](config.seed, index)


def evolved_dir(output_dir) -> Path:
    return Path(output_dir) / "evolved_tools"


def run_tools(config: SynthesisConfig) -> tuple[list[dict], list[tuple[dict, str]]]:
    """The run's toolset: config.tools_dir plus the evolved tools (if any), deduplicated -> (kept, dropped)."""
    evolved = evolved_dir(config.output_dir)
    has_evolved = config.evolve_categories and evolved.is_dir() and any(evolved.glob("*.json"))
    return deduplicate(load_tools([config.tools_dir] + ([evolved] if has_evolved else [])))


def evolve(config: SynthesisConfig, backend: Backend) -> dict:
    """Evolve tools for config.evolve_categories once per run (evolution.json marks it done; a resumed run
    reuses the files): one tool file per domain under OUTPUT_DIR/evolved_tools, rejections in evolution.json."""
    marker = Path(config.output_dir) / "evolution.json"
    if marker.exists():
        return json.loads(marker.read_text())
    out = evolved_dir(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.json*"):                 # files of an evolution that crashed before its marker
        stale.unlink()
    existing = deduplicate(load_tools(config.tools_dir))[0]
    result = evolve_tools(backend, config.evolve_categories, domains_per_category=config.evolve_domains,
                          tools_per_domain=config.evolve_tools, existing=existing, seed=config.seed)
    for k, (category, domain) in enumerate(result.domains):
        tools = [t for t in result.tools if t["x-category"] == category and t["x-domain"] == domain]
        if tools:
            write_tool_file(out / f"{k:03d}.json", category, domain, tools)
    report = {"domains": [list(d) for d in result.domains], "tools": len(result.tools),
              "rejected": [{"where": where, "reason": why} for where, _, why in result.rejected]}
    _write_json(marker, report)
    return report


def shard_path(output_dir, unit: int) -> Path:
    return Path(output_dir) / f"shard-{unit:05d}.array_record"


def manifest_path(output_dir, unit: int) -> Path:
    return Path(output_dir) / f"shard-{unit:05d}.json"


def _write_json(path: Path, value) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def _backends(config: SynthesisConfig):
    """-> (agent_for(task), user, simulator, judge) for config.backend."""
    if config.backend == "scripted":
        return ((lambda task: ScriptedSolver(task, error_rate=config.error_rate, seed=config.seed)),
                ScriptedBackend(scripted_user), ScriptedBackend(env_simulated.scripted_simulator),
                ScriptedBackend(scripted_judge))
    llm = OpenAIBackend(config.backend, config.model, timeout_s=config.timeout_s, max_retries=config.max_retries,
                        rate=config.rate, seed=config.seed)
    return (lambda task: llm), llm, llm, llm


def run_unit(config: SynthesisConfig, unit: int) -> dict:
    """Run, judge and write work unit `unit` (module docstring); returns its manifest."""
    tools, _ = run_tools(config)
    tokenizer = load_tokenizer(config.tokenizer)
    agent_for, user, simulator, judge_llm = _backends(config)
    stats, kept, rejected, records, ids_of_unit = RejectionStats(), [], [], [], []
    indices = range(unit * config.shard_size, min(config.num_tasks, (unit + 1) * config.shard_size))
    for index in indices:
        task = make_task(config, index, tools)
        ids_of_unit.append(task.task_id)
        kwargs = dict(seed=config.seed, max_turns=config.max_turns, user=SimulatedUser(user))
        env = (env_simulated.SimulatedToolEnv(simulator, **kwargs) if task.env == "simulated"
               else ENVIRONMENTS[task.env](**kwargs))
        trajectory = run_episode(env, task, agent_for(task))
        verdict = judge(task, trajectory, judge_llm, seed=config.seed + index)
        stats.add(verdict)
        if verdict.passed:
            ids, mask = chat.encode(tokenizer, trajectory.messages, trajectory.tools)
            records.append(ids + mask)
            kept.append({"task_id": task.task_id, "tokens": len(ids), "messages": trajectory.messages,
                         "tools": trajectory.tools})
        else:
            rejected.append({"task_id": task.task_id, "reasons": verdict.reasons})
    write_token_shard(shard_path(config.output_dir, unit), records)
    manifest = {"unit": unit, "task_ids": ids_of_unit, "kept": kept,
                "rejected": rejected, "stats": stats.to_json()}
    _write_json(manifest_path(config.output_dir, unit), manifest)
    return manifest


def _run_unit_job(args) -> int:
    config, unit = args
    run_unit(config, unit)
    return unit


def pending_units(config: SynthesisConfig) -> list[int]:
    return [u for u in range(config.num_units) if not manifest_path(config.output_dir, u).exists()]


def synthesize(config: SynthesisConfig, evolver: Backend | None = None) -> dict:
    """Evolve tools first if config.evolve_categories (through `evolver`, by default the endpoint), run every
    unit not done yet (in config.workers spawned processes when > 1), then write and return the summary:
    {"units", "units_run", "tasks", "tools", "tools_dropped", "evolution", "kept", "rejected", "by_kind",
    "kept_tokens"}."""
    os.makedirs(config.output_dir, exist_ok=True)
    config_path = Path(config.output_dir) / "config.json"
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "workers"}
    if config_path.exists() and json.loads(config_path.read_text()) != json.loads(json.dumps(settings)):
        raise ValueError(f"{config.output_dir} holds a run with other settings ({config_path}); use a new directory")
    _write_json(config_path, settings)
    evolution = None
    if config.evolve_categories:
        if evolver is None and config.backend == "scripted":
            raise ValueError("tool evolution needs an LLM: an endpoint URL as backend, or an evolver backend")
        evolution = evolve(config, evolver or _backends(config)[3])
    tools, dropped = run_tools(config)
    todo = pending_units(config)
    if config.workers > 1 and len(todo) > 1:
        with multiprocessing.get_context("spawn").Pool(min(config.workers, len(todo))) as pool:
            for _ in pool.imap_unordered(_run_unit_job, [(config, u) for u in todo]):
                pass
    else:
        for unit in todo:
            run_unit(config, unit)
    stats, tokens = RejectionStats(), 0
    for unit in range(config.num_units):
        manifest = json.loads(manifest_path(config.output_dir, unit).read_text())
        stats.merge(manifest["stats"])
        tokens += sum(k["tokens"] for k in manifest["kept"])
    summary = {"units": config.num_units, "units_run": len(todo), "tasks": config.num_tasks, "tools": len(tools),
               "tools_dropped": [[t["function"]["name"], why] for t, why in dropped], "evolution": evolution,
               **stats.to_json(),
               "kept_tokens": tokens}
    _write_json(Path(config.output_dir) / "summary.json", summary)
    return summary


def read_shard(path) -> list[tuple[np.ndarray, np.ndarray]]:
    """A shard's records -> [(ids int32 [n], loss_mask int32 [n])]."""
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(os.fspath(path))
    try:
        out = []
        for record in reader.read_all():
            values = np.frombuffer(record, "<u4").astype(np.int32)
            if values.size % 2:
                raise ValueError(f"{path}: a record of {values.size} values is not ids + mask of one length")
            out.append((values[:values.size // 2], values[values.size // 2:]))
        return out
    finally:
        reader.close()
