"""The agentic demonstration end to end on the tiny preset, sized for CPU (15 minutes on 2 shared cores):

  (a) synthesise trajectories in the files environment with the scripted solver, wrong on purpose at
      --error_rate per turn, judged (rule checks + the scripted judge), the kept ones written as SFT shards;
  (b) evaluate the randomly initialised tiny model as an agent on held-out tasks (another task seed), through the
      chat template, the parser, the environment, with and without the tool-call enforcer;
  (c) SFT the tiny model on the kept shards (kimi_jax.train.loop.train, data.source="sft": loss on the assistant
      tokens only, one conversation per row);
  (d) evaluate again;
  (e) RL from the SFT model with the environment's reward (kimi_jax.agentic.rl: K2's loss, MuonClip, colocated
      weight sync) for --rl_iterations iterations; evaluate again.

    python experiments/agentic_demo.py --out=/tmp/agentic_demo        # -> experiments/results/agentic.{md,json}

Sizes (chosen for CPU): one environment (files) and its tasks whose reference solution uses only read_file and
write_file ("append a line to the to-do list", "copy the port from app.ini into port.txt"), offered exactly
those two tools with short declarations (the library's schemas without description prose, path patterns,
maxLength and additionalProperties) and a one-line system prompt, so a whole conversation is ~1,000 byte
tokens instead of ~2,500; at most --max_turns assistant turns of at most --max_tokens tokens.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from experiments.configs import rl_tiny, tiny  # noqa: E402
from kimi_jax import chat  # noqa: E402
from kimi_jax.agentic import (FilesEnv, RejectionStats, ScriptedBackend, ScriptedSolver, env_files, judge,  # noqa: E402
                              run_episode, scripted_judge)
from kimi_jax.agentic.rl import AgenticRL, with_agent  # noqa: E402
from kimi_jax.data.sources import write_token_shard  # noqa: E402
from kimi_jax.data.tokenizers import load_tokenizer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SYSTEM_PROMPT = "You manage the user's files with tools."
TOOL_NAMES = ("read_file", "write_file")
DESCRIPTIONS = {"read_file": "Read a text file.", "write_file": "Write a text file, or append to it."}
READING_MARKER = "## Reading"


def compact_tools() -> list[dict]:
    """read_file and write_file as tools/files.json declares them, less description prose and the keywords that
    only lengthen the declaration (pattern, maxLength, additionalProperties)."""
    out = []
    for tool in env_files.TOOLS:
        name = tool["function"]["name"]
        if name not in TOOL_NAMES:
            continue
        params = tool["function"]["parameters"]
        props = {k: {kk: vv for kk, vv in v.items() if kk not in ("pattern", "maxLength")}
                 for k, v in params["properties"].items()}
        out.append({"type": "function", "function": {
            "name": name, "description": DESCRIPTIONS[name],
            "parameters": {"type": "object", "properties": props, "required": params["required"]}}})
    return out


def make_tasks(seed: int, count: int) -> list:
    """The first `count` files tasks of `seed` whose reference solution calls only read_file / write_file, with
    the compact toolset and system prompt."""
    tools, out, index = compact_tools(), [], 0
    while len(out) < count:
        task = env_files.make_task(seed, index)
        index += 1
        if {s["name"] for s in task.solution if "name" in s} <= set(TOOL_NAMES):
            out.append(with_agent(task, tools=tools, system_prompt=SYSTEM_PROMPT))
    return out


def synthesise(tasks, out_dir: Path, *, error_rate: float, seed: int, max_turns: int) -> dict:
    """The synthesis pipeline's unit loop (kimi_jax.agentic.synthesis.run_unit) over these tasks: the scripted
    solver as the agent, the judge, the kept conversations as one SFT shard of chat.encode (ids, loss mask)."""
    tokenizer = load_tokenizer("byte")
    stats, records, lengths, mistakes = RejectionStats(), [], [], collections.Counter()
    judge_llm = ScriptedBackend(scripted_judge)
    for k, task in enumerate(tasks):
        solver = ScriptedSolver(task, error_rate=error_rate, seed=seed)
        trajectory = run_episode(FilesEnv(seed=seed, max_turns=max_turns), task, solver)
        mistakes.update(solver.mistakes)
        verdict = judge(task, trajectory, judge_llm, seed=seed + k)
        stats.add(verdict)
        if verdict.passed:
            ids, mask = chat.encode(tokenizer, trajectory.messages, trajectory.tools)
            records.append(ids + mask)
            lengths.append((len(ids), sum(mask)))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_token_shard(out_dir / "shard-00000.array_record", records)
    tokens = np.array(lengths) if lengths else np.zeros((1, 2))
    return {"tasks": len(tasks), **stats.to_json(), "solver_mistakes": dict(sorted(mistakes.items())),
            "tokens_mean": float(tokens[:, 0].mean()), "tokens_max": int(tokens[:, 0].max()),
            "assistant_tokens_mean": float(tokens[:, 1].mean())}


def sft(shards: Path, workdir: Path, args) -> dict:
    from kimi_jax.train.loop import train

    c = tiny.get_config()
    c.steps, c.log_every, c.checkpoint_every = args.sft_steps, 10, args.sft_steps
    c.data.source, c.data.paths = "sft", (str(shards),)
    c.data.seq_len, c.data.global_batch_size, c.data.split_documents = args.sft_seq_len, args.sft_batch, False
    c.optimizer.learning_rate, c.optimizer.warmup_steps = args.sft_lr, max(1, args.sft_steps // 10)
    c.sample.max_new_tokens = 0
    start = time.perf_counter()
    summary = train(c, str(workdir))
    lines = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    losses = [(line["step"], line["loss"]) for line in lines if "loss" in line]
    return {"steps": args.sft_steps, "seq_len": args.sft_seq_len, "batch": args.sft_batch, "lr": args.sft_lr,
            "loss_curve": losses, "final_loss": summary.get("loss"), "wall_s": time.perf_counter() - start}


def agent_config(args, init_workdir: str = "") -> ml_collections.ConfigDict:
    c = rl_tiny.get_config()
    c.seed, c.init_workdir, c.steps = args.seed, init_workdir, max(1, args.rl_iterations)
    c.prompts.per_step = args.rl_tasks
    c.optimizer.learning_rate = args.rl_lr
    r = c.rollout
    r.samples_per_prompt, r.temperature, r.seq_len = args.rl_samples, 1.0, args.seq_len
    r.max_slots, r.page_size, r.prefill_chunk, r.prefill_batch, r.decode_steps = 16, 16, 256, 4, 8
    r.num_pages = r.max_slots * (args.seq_len // r.page_size + 1) + 8
    c.agentic = ml_collections.ConfigDict({"max_tokens": args.max_tokens, "enforce": args.rl_enforce,
                                           "reward": args.rl_reward,
                                           "eval_temperature": args.eval_temperature})
    return c


def make_env_factory(args):
    return lambda task: FilesEnv(seed=args.seed, max_turns=args.max_turns)


def evaluate(rl: AgenticRL, held_out, stage: str, results: dict) -> None:
    results["eval"][stage] = {}
    for enforce in (False, True):
        report = rl.evaluate(held_out, enforce=enforce)
        results["eval"][stage]["enforcer_on" if enforce else "enforcer_off"] = report
        logging.info("eval %s enforce=%s: success %.3f malformed %s well-formed calls %d first tool %.3f (%.0f s)",
                     stage, enforce, report["success_rate"], report["malformed_call_rate"],
                     report["well_formed_calls"], report["first_tool_correct"], report["eval_s"])


COLUMNS = [("success_rate", "success", "{:.2f}"), ("judge_pass_rate", "judge pass", "{:.2f}"),
           ("malformed_call_rate", "malformed / attempted", "{:.2f}"), ("calls_attempted", "calls attempted", "{:.0f}"),
           ("well_formed_calls", "well-formed calls", "{:.0f}"), ("first_tool_correct", "first tool right", "{:.2f}"),
           ("first_call_correct", "first call right", "{:.2f}"), ("tools_share", "expected tools called", "{:.2f}"),
           ("checkpoint_share", "checkpoints hit", "{:.2f}"), ("finished", "final answer", "{:.2f}"),
           ("turns_with_errors", "turns with parse errors", "{:.2f}"), ("context_cut", "cut at seq_len", "{:.2f}")]


def markdown(results: dict, reading: str) -> str:
    s, a = results["settings"], results["synthesis"]
    lines = ["# Agentic demonstration: synthesis, SFT and RL of the tiny model as a tool-using agent", "",
             "`python experiments/agentic_demo.py` (CPU: " + results["machine"] + "). Raw numbers: `agentic.json`.", "",
             "## Setup", "",
             f"- Environment: `FilesEnv` (kimi_jax/agentic/env_files.py), its tasks whose reference solution uses only "
             f"read_file and write_file (append a line to /home/todo.md; copy the port of /config/app.ini into "
             f"/config/port.txt). Toolset: those two tools, declared without description prose, path patterns, "
             f"maxLength and additionalProperties; system prompt \"{SYSTEM_PROMPT}\". A conversation is "
             f"~{a['tokens_mean']:.0f} byte tokens (max {a['tokens_max']}), {a['assistant_tokens_mean']:.0f} of "
             f"them assistant tokens.",
             f"- Synthesis: {a['tasks']} tasks (seed {s['seed']}), scripted solver with error_rate {s['error_rate']}, "
             f"max_turns {s['max_turns']}; rule checks + scripted judge.",
             f"- Held-out evaluation: {s['eval_tasks']} tasks of task seed {s['seed'] + 1} (not used in synthesis or "
             f"RL), one episode each at temperature {s['eval_temperature']}, at most {s['max_turns']} assistant "
             f"turns of at most {s['max_tokens']} "
             f"tokens, dialogue re-rendered every turn as the server does; with and without the tool-call enforcer.",
             f"- SFT: tiny preset (kimi_jax.config.tiny, {results['params']:,} parameters), "
             f"`train(config, workdir)` with data.source=\"sft\", seq_len {s['sft_seq_len']}, batch {s['sft_batch']}, "
             f"{s['sft_steps']} steps, lr {s['sft_lr']} (WSD), MuonClip, one conversation per row "
             f"(split_documents=False).",
             f"- RL: {s['rl_iterations']} iterations x {s['rl_tasks']} training tasks (the synthesis tasks, in "
             f"order) x "
             f"{s['rl_samples']} episodes "
             f"(temperature 1, enforcer {'on' if s['rl_enforce'] else 'off'}), reward \"{s['rl_reward']}\", "
             f"K2's loss (tau 0.01), MuonClip lr "
             f"{s['rl_lr']}, episode sequences of at most {s['seq_len']} tokens.", "",
             "## Synthesis (judge)", "",
             f"kept {a['kept']}, rejected {a['rejected']}; rejections by reason (a trajectory counts once per kind): "
             + ", ".join(f"{k} {v}" for k, v in a["by_kind"].items())
             + "; the solver's mistakes: " + ", ".join(f"{k} {v}" for k, v in a["solver_mistakes"].items()) + ".", "",
             "## Held-out evaluation", "",
             "| model | enforcer | " + " | ".join(c[1] for c in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    names = {"random_init": "random init", "sft": "after SFT", "rl": "after SFT + RL"}
    for stage, modes in results["eval"].items():
        for mode, report in modes.items():
            lines.append(f"| {names.get(stage, stage)} | {mode.split('_')[1]} | "
                         + " | ".join("n/a" if report[k] is None else f.format(report[k]) for k, _, f in COLUMNS)
                         + " |")
    lines += ["", "success: the environment's end state reached with a final answer (its reward); judge pass: "
              "also the rule checks (no malformed call, rubric tools in order, checkpoints) and the judge's facts; "
              "malformed / attempted: the environment's parse errors over (executed calls + parse errors); "
              "first tool / call right: the first executed call is the reference solution's first tool / also with "
              "its arguments; expected tools called, checkpoints hit: shares of the rubric's.", "",
              "Parse errors by kind (kimi_jax.chat.parse):", ""]
    for stage, modes in results["eval"].items():
        for mode, report in modes.items():
            kinds = report.get("error_kinds") or {}
            lines.append(f"- {names.get(stage, stage)}, enforcer {mode.split('_')[1]}: "
                         + (", ".join(f"{k} {v}" for k, v in kinds.items()) or "none"))
    lines.append("")
    if results.get("sft"):
        curve = results["sft"]["loss_curve"]
        lines += ["## SFT", "", "loss (assistant tokens, nats/token) by step: "
                  + ", ".join(f"{step}: {loss:.3f}" for step, loss in curve)
                  + f" ({results['sft']['wall_s']:.0f} s)", ""]
    if results.get("rl"):
        lines += ["## RL iterations", "", "Training rollouts (temperature 1). reward: the mean of the batch's rewards; "
                  "kl_to_old: KL(pi_old || pi) on the batch before the update (0: the engine's logprobs are the "
                  "trainer's); sampled = template: share of turns whose sampled ids equal the template's rendering "
                  "of the recorded message.", "",
                  "| iteration | reward | success | malformed / attempted | well-formed calls | cut at seq_len "
                  "| sampled = template | kl_to_old | loss | grad norm | rollout s | train s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for i, m in enumerate(results["rl"], 1):
            rate = m["rollout_malformed_call_rate"]
            lines.append(f"| {i} | {m['reward']:.3f} | {m['rollout_success_rate']:.2f} | "
                         f"{'n/a' if rate is None else f'{rate:.2f}'} | {m['rollout_well_formed_calls']:.0f} | "
                         f"{m['rollout_context_cut']:.2f} | {m['rollout_rendered_as_sampled']:.2f} | "
                         f"{m['kl_to_old']:.1e} | {m['loss']:.2e} | {m['grad_norm']:.3f} | {m['rollout_s']:.0f} | "
                         f"{m['train_s']:.0f} |")
        lines.append("")
    lines += ["## Wall times", "", ", ".join(f"{k} {v:.0f} s" for k, v in results["wall_s"].items()), ""]
    return "\n".join(lines) + "\n" + (reading or f"{READING_MARKER}\n\n(to be written)\n")


def write(results: dict, out: Path) -> None:
    where = Path(results["settings"]["results_dir"])
    where.mkdir(parents=True, exist_ok=True)
    (where / "agentic.json").write_text(json.dumps(results, indent=1))
    md = where / "agentic.md"
    old = md.read_text() if md.exists() else ""
    reading = old[old.index(READING_MARKER):] if READING_MARKER in old else ""
    md.write_text(markdown(results, reading))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="/tmp/agentic_demo", help="synthesis shards, SFT checkpoints")
    p.add_argument("--results_dir", default=str(RESULTS), help="where agentic.md / agentic.json go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", type=int, default=200, help="synthesis tasks")
    p.add_argument("--error_rate", type=float, default=0.25)
    p.add_argument("--max_turns", type=int, default=4)
    p.add_argument("--max_tokens", type=int, default=128, help="tokens per assistant turn")
    p.add_argument("--seq_len", type=int, default=1536, help="longest episode (engine and RL batch)")
    p.add_argument("--eval_tasks", type=int, default=20)
    p.add_argument("--eval_temperature", type=float, default=0.7)
    p.add_argument("--sft_steps", type=int, default=200)
    p.add_argument("--sft_seq_len", type=int, default=1152)
    p.add_argument("--sft_batch", type=int, default=2)
    p.add_argument("--sft_lr", type=float, default=6e-3)
    p.add_argument("--rl_iterations", type=int, default=8)
    p.add_argument("--rl_tasks", type=int, default=4)
    p.add_argument("--rl_samples", type=int, default=4)
    p.add_argument("--rl_lr", type=float, default=5e-4)
    p.add_argument("--rl_reward", default="rubric", choices=("success", "rubric"))
    p.add_argument("--rl_enforce", action="store_true", help="the enforcer in RL rollouts (off: on-policy)")
    p.add_argument("--skip", default="", help="comma-separated stages to skip: eval0,sft,rl")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    for noisy in ("absl", "jax", "orbax", "kimi_jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    skip = set(filter(None, args.skip.split(",")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import kimi_jax

    results = {"settings": vars(args), "machine": f"{os.cpu_count()} cores, jax {__import__('jax').__version__}",
               "params": kimi_jax.count_params(kimi_jax.tiny())["total"], "eval": {}, "wall_s": {}}
    t0 = time.perf_counter()
    stage = time.perf_counter()
    train_tasks = make_tasks(args.seed, args.tasks)
    held_out = make_tasks(args.seed + 1, args.eval_tasks)
    results["synthesis"] = synthesise(train_tasks, out / "sft_data", error_rate=args.error_rate, seed=args.seed,
                                      max_turns=args.max_turns)
    results["wall_s"]["synthesis"] = time.perf_counter() - stage
    logging.info("synthesis: %s", results["synthesis"])
    write(results, out)

    if "eval0" not in skip:
        stage = time.perf_counter()
        evaluate(AgenticRL(agent_config(args), make_env_factory(args)), held_out, "random_init", results)
        results["wall_s"]["eval_random_init"] = time.perf_counter() - stage
        write(results, out)

    sft_dir = out / "sft"
    if "sft" not in skip:
        stage = time.perf_counter()
        results["sft"] = sft(out / "sft_data", sft_dir, args)
        results["wall_s"]["sft"] = time.perf_counter() - stage
        logging.info("sft: final loss %s", results["sft"]["final_loss"])
        write(results, out)

    stage = time.perf_counter()
    rl = AgenticRL(agent_config(args, str(sft_dir)), make_env_factory(args))
    evaluate(rl, held_out, "sft", results)
    results["wall_s"]["eval_sft"] = time.perf_counter() - stage
    write(results, out)

    if "rl" not in skip and args.rl_iterations:
        stage = time.perf_counter()
        results["rl"] = []
        for i in range(args.rl_iterations):
            tasks = [train_tasks[(i * args.rl_tasks + k) % len(train_tasks)] for k in range(args.rl_tasks)]
            metrics, _, _ = rl.iteration(tasks)
            results["rl"].append(metrics)
            logging.info("rl %d: reward %.3f success %.3f malformed %s loss %.2e (%.0f + %.0f s)", i + 1,
                         metrics["reward"], metrics["rollout_success_rate"], metrics["rollout_malformed_call_rate"],
                         metrics["loss"], metrics["rollout_s"], metrics["train_s"])
            write(results, out)
        results["wall_s"]["rl"] = time.perf_counter() - stage
        stage = time.perf_counter()
        evaluate(rl, held_out, "rl", results)
        results["wall_s"]["eval_rl"] = time.perf_counter() - stage
    results["wall_s"]["total"] = time.perf_counter() - t0
    write(results, out)
    logging.info("done in %.0f s", results["wall_s"]["total"])


if __name__ == "__main__":
    main()
