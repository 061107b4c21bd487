"""Steps 2 and 3 of the RL demonstration on the tiny K2-shaped model (a task family's held-out problems):

  - K2's loss (kimi_jax.rl.policy_loss, MuonClip) over 3 seeds, against the same runs with shuffled rewards
    (config.rl.shuffle_rewards: each sample's reward is another sample's, so the signal carries no information)
    and GRPO (config.rl.loss=grpo) on the same budget of iterations;
  - budget control: the same K2 runs with a token budget below the long answer form (truncated + penalised)
    against the unconstrained budget.

    python experiments/rl_warmup.py --family=strings --pool=4000 --held_out=64 --steps=300 \
        --workdir=/tmp/kimi_rl/warmup                                        # step 1 (about 5 minutes)
    python experiments/rl_runs.py --warmup=/tmp/kimi_rl/warmup --out=/tmp/kimi_rl

Every run is `launch/rl.py` in a subprocess with its own workdir under --out (a finished run is not rerun: delete
its workdir to redo it). The family, pool and held-out problems are the warm-up's (its config.json). Writes
experiments/results/rl_<family>.{md,json,png}: held-out pass@1 / pass@8, train
reward, response length, KL and entropy per run, and the wall time of each run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "experiments", "results")

_WARMUP = flags.DEFINE_string("warmup", "/tmp/kimi_rl/warmup", "The warm-up workdir (experiments/rl_warmup.py).")
_OUT = flags.DEFINE_string("out", "/tmp/kimi_rl", "Workdirs of the runs.")
_STEPS = flags.DEFINE_integer("steps", 60, "RL iterations per run.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of each arm.")
_ARMS = flags.DEFINE_list("arms", ["k2", "shuffled", "grpo", "budget"], "Which arms to run.")
_LR = flags.DEFINE_float("lr", 3e-4, "RL learning rate (MuonClip, constant).")
_BUDGET = flags.DEFINE_integer("budget", 8, "The budget arm's token budget (the others get 32).")

COMMON = {"prompts.per_step": 16, "rollout.samples_per_prompt": 8, "eval.every": 10, "eval.samples": 8,
          "eval.k": 8, "rollout.temperature_decay_steps": 0, "rollout.final_temperature": 1.0}
ARMS = ("k2", "shuffled", "grpo", "budget")


def arm_overrides(arm: str, family: str, budget: int) -> dict:
    return {"k2": {}, "shuffled": {"rl.shuffle_rewards": True}, "grpo": {"rl.loss": "grpo"},
            "budget": {f"rollout.budgets.{family}": budget}}[arm]


def run_arm(arm: str, seed: int, steps: int, warmup: str, out: str) -> None:
    """Runs one arm in a subprocess (unless it has finished; an interrupted run resumes from its checkpoint)."""
    workdir = os.path.join(out, f"{arm}_seed{seed}")
    metrics = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(metrics) and any(json.loads(line)["step"] == steps for line in open(metrics)):
        return
    with open(os.path.join(warmup, "config.json")) as f:
        warm = json.load(f)
    family = warm["prompts"]["family"]
    overrides = {**COMMON, "prompts.family": family, "prompts.pool_size": warm["prompts"]["pool_size"],
                 "eval.num_prompts": warm["eval"]["num_prompts"], f"rollout.budgets.{family}": 32,
                 "optimizer.learning_rate": _LR.value, **arm_overrides(arm, family, _BUDGET.value),
                 "seed": seed, "steps": steps, "init_workdir": warmup}
    cmd = [sys.executable, os.path.join(ROOT, "launch", "rl.py"), f"--workdir={workdir}",
           *(f"--config.{k}={v}" for k, v in overrides.items())]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def finished_runs(out: str, steps: int) -> tuple[dict, dict]:
    """Every run under `out` that reached `steps` (also those of earlier invocations) -> ({(arm, seed): metric
    lines}, {(arm, seed): wall seconds from its first to its last metrics line})."""
    runs, walls = {}, {}
    for name in sorted(os.listdir(out)):
        arm, _, seed = name.rpartition("_seed")
        if arm not in ARMS or not os.path.exists(os.path.join(out, name, "metrics.jsonl")):
            continue
        lines = read(os.path.join(out, name))
        if lines[-1]["step"] == steps:
            runs[(arm, int(seed))] = lines
            walls[(arm, int(seed))] = lines[-1]["time"] - lines[0]["time"]
    return runs, walls


def read(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def curve(lines: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(line["step"], line[key]) for line in lines if key in line]
    return [s for s, _ in points], [v for _, v in points]


def summarise(lines: list[dict]) -> dict:
    steps, p1 = curve(lines, "heldout_pass@1")
    _, p8 = curve(lines, "heldout_pass@8")
    _, length = curve(lines, "heldout_response_length")
    train = [line for line in lines if "reward" in line]
    last = train[-10:]
    return {"pass@1_start": p1[0], "pass@1_end": p1[-1], "pass@8_start": p8[0], "pass@8_end": p8[-1],
            "heldout_length_start": length[0], "heldout_length_end": length[-1],
            "train_reward_first10": float(np.mean([line["reward"] for line in train[:10]])),
            "train_reward_last10": float(np.mean([line["reward"] for line in last])),
            "kl_after_update_mean": float(np.mean([line["kl_after_update"] for line in train])),
            "entropy_last10": float(np.mean([line["entropy"] for line in last])),
            "truncated_share_last10": float(np.mean([line["truncated_share"] for line in last]))}


def plot(runs: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [("heldout_pass@1", "held-out pass@1"), ("heldout_pass@8", "held-out pass@8"),
            ("response_length", "train response length (tokens)"), ("kl_after_update", "KL(pi_old || pi_new)")]
    colors = {"k2": "C0", "shuffled": "C3", "grpo": "C2", "budget": "C1"}
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for (arm, seed), lines in sorted(runs.items()):
        for ax, (key, title) in zip(axes, keys):
            x, y = curve(lines, key)
            ax.plot(x, y, color=colors[arm], alpha=0.7, label=arm if seed == min(s for a, s in runs if a == arm)
                    else None)
            ax.set_title(title)
            ax.set_xlabel("RL iteration")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def report(runs: dict, walls: dict, steps: int, warmup: str, lr: float, budget: int) -> str:
    with open(os.path.join(warmup, "warmup.json")) as f:
        warm = json.load(f)
    rows = []
    by_arm: dict[str, list[dict]] = {}
    for (arm, seed), lines in sorted(runs.items()):
        s = summarise(lines)
        by_arm.setdefault(arm, []).append(s)
        rows.append(f"| {arm} | {seed} | {s['pass@1_start']:.3f} -> {s['pass@1_end']:.3f} | "
                    f"{s['pass@8_start']:.3f} -> {s['pass@8_end']:.3f} | {s['train_reward_first10']:.3f} -> "
                    f"{s['train_reward_last10']:.3f} | {s['heldout_length_start']:.1f} -> "
                    f"{s['heldout_length_end']:.1f} | {s['truncated_share_last10']:.2f} | "
                    f"{s['kl_after_update_mean']:.3f} | {s['entropy_last10']:.3f} | {walls[(arm, seed)]:.0f} |")
    means = []
    for arm, ss in by_arm.items():
        delta = [s["pass@1_end"] - s["pass@1_start"] for s in ss]
        means.append(f"| {arm} | {len(ss)} | {100 * np.mean(delta):+.1f} (" +
                     ", ".join(f"{100 * d:+.1f}" for d in delta) + f") | "
                     f"{np.mean([s['pass@1_end'] for s in ss]):.3f} | "
                     f"{np.mean([s['heldout_length_end'] for s in ss]):.1f} |")
    w = warm["curve"][-1]
    reading = []
    if "k2" in by_arm and "shuffled" in by_arm:
        k2 = np.mean([s["pass@1_end"] - s["pass@1_start"] for s in by_arm["k2"]])
        shuffled = np.mean([s["pass@1_end"] - s["pass@1_start"] for s in by_arm["shuffled"]])
        reading.append(f"- K2's loss raises held-out pass@1 by {100 * k2:+.1f} points (mean of {len(by_arm['k2'])} "
                       f"seeds); the same runs with shuffled rewards move it by {100 * shuffled:+.1f}: with no "
                       "information in the rewards the updates are a random walk away from the warm-up. pass@8 "
                       "rises too, so RL does more than sharpen onto answers the policy already ranked first.")
    if ("budget", 0) in runs and ("k2", 0) in runs:
        b, k = summarise(runs[("budget", 0)]), summarise(runs[("k2", 0)])
        reading.append(f"- Budget control (seed 0 against K2 seed 0): held-out pass@1 {b['pass@1_end']:.3f} vs "
                       f"{k['pass@1_end']:.3f} at held-out length {b['heldout_length_end']:.1f} vs "
                       f"{k['heldout_length_end']:.1f} tokens. Both drop the long form (it is longer and riskier), "
                       "the budget arm faster: its evaluation also runs under its budget, so it starts lower "
                       f"({b['pass@1_start']:.3f}: long answers are cut) and ends at about the same accuracy with "
                       "shorter answers.")
    if ("grpo", 0) in runs and ("k2", 0) in runs:
        g, k = summarise(runs[("grpo", 0)]), summarise(runs[("k2", 0)])
        reading.append(f"- GRPO on the same budget (seed 0): {g['pass@1_start']:.3f} -> {g['pass@1_end']:.3f}, "
                       f"K2's loss {k['pass@1_start']:.3f} -> {k['pass@1_end']:.3f}: no difference at this scale.")
    reading.append(f"- Wall time: {sum(walls.values()) / 60:.0f} minutes for the {len(runs)} runs (from each run's "
                   "first evaluation to its last; compilation before it not counted), on 2 CPU cores shared with "
                   "other jobs.")
    return "\n".join([
        f"# RL on verifiable rewards: tiny K2-shaped model, task family `{warm['family']}`", "",
        "Produced by `experiments/rl_warmup.py` then `experiments/rl_runs.py` (numbers from the JSON beside "
        "this file). CPU only, 2 cores shared with other work while it ran.", "",
        "## 1. Warm-up", "",
        f"Supervised on training problems (chat format, loss on the answer; {warm['verbose_share']:.0%} of answers in "
        f"the long form `The answer is X.\\nX`), {warm['steps']} steps of {warm['batch']} dialogues drawn from "
        f"{warm['pool']} training problems, MuonClip lr {warm['lr']}: held-out pass@1 {w['heldout_pass@1']:.3f}, "
        f"pass@8 {w['heldout_pass@8']:.3f} over {warm['held_out']} held-out problems x 8 samples "
        f"({w['seconds']:.0f} s). Held-out problems are never in the training pool (hash split of the problem "
        "space).", "",
        "## 2-3. RL", "",
        f"{steps} iterations per run from the warm-up; each: 16 prompts x 8 samples at temperature 1.0, one "
        f"MuonClip step (lr {lr}) of K2's loss (tau 0.01) or GRPO. Held-out: the warm-up's problems x 8 samples "
        "at temperature 1.0. Arms: `k2`; `shuffled` (config.rl.shuffle_rewards: rewards permuted across the "
        "batch's samples before the loss: same loss, no information); `grpo` (clipped ratio, eps 0.2); `budget` "
        f"(K2's budget control: at most {budget} response tokens, truncated responses penalised by 0.5; the "
        "other arms allow 32).", "",
        "Mean over seeds:", "",
        "| arm | seeds | held-out pass@1 change, points (per seed) | pass@1 end | held-out length end |",
        "|---|---|---|---|---|", *means, "",
        "Per run:", "",
        "| arm | seed | held-out pass@1 | held-out pass@8 | train reward (first 10 -> last 10 it.) | held-out "
        "length | truncated (last 10) | mean KL after update | entropy (last 10) | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|", *rows, "",
        "Reading:", "", *reading, "", "![curves](CURVES)", ""])


def main(argv):
    del argv
    os.makedirs(_OUT.value, exist_ok=True)
    for seed in map(int, _SEEDS.value):
        for arm in _ARMS.value:
            run_arm(arm, seed, _STEPS.value, _WARMUP.value, _OUT.value)
    runs, walls = finished_runs(_OUT.value, _STEPS.value)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(_WARMUP.value, "config.json")) as f:
        name = f"rl_{json.load(f)['prompts']['family']}"
    with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
        json.dump({f"{arm}_seed{seed}": {"wall_s": walls[(arm, seed)], "metrics": lines}
                   for (arm, seed), lines in runs.items()}, f)
    plot(runs, os.path.join(RESULTS, f"{name}.png"))
    text = report(runs, walls, _STEPS.value, _WARMUP.value, _LR.value, _BUDGET.value).replace(
        "CURVES", f"{name}.png")
    with open(os.path.join(RESULTS, f"{name}.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    app.run(main)
