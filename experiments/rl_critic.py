"""Demonstration of the self-critique rubric reward's closed loop (kimi_jax/rl/critic.py): the critic's pairwise
accuracy on held-out verifiable pairs, before and after RL iterations whose verifiable pairs train it.

    python experiments/rl_critic.py [--seeds=0,1,2] [--warm_seeds=0] [--iterations=12] [--out=experiments/results]

Per run: kimi_jax.rl.loop.train_rl on integer arithmetic (difficulty 1), the tiny model cut to 2 layers, K2's
policy loss, 8 prompts x 8 samples per iteration, with the critic enabled: a separate critic starting from the
policy's parameters, reward_weight 0 (the critic is trained and evaluated; the policy's reward stays the
verifier's). After each policy step, --critic_updates Bradley-Terry steps ("paired" loss, 16 pairs each) on the
iteration's (correct, incorrect) sample pairs; a prompt without a correct sample pairs its reference answer.
Two starting points:
  - random_init (--seeds): policy and critic at random init (config.seed); every sample is wrong, so the pairs
    are (reference answer, malformed sample);
  - warmed_up (--warm_seeds): both from a supervised warm-up on the training problems' reference answers
    (--warmup_steps, chat format), stopped while unreliable: its samples are integers, mostly wrong, so the
    pairs are (correct integer, wrong integer).
Held-out accuracy, logged by the loop at step 0 and every --eval_every iterations:
  - critic_pairwise_accuracy: 64 fixed pairs of 16 held-out problems, (reference answer, another held-out
    problem's answer that the verifier scores wrong): both integers, so only checking the arithmetic helps;
  - critic_onpolicy_accuracy: the eval rollout's pairs of the held-out problems (a verified-correct sample or
    the reference vs each distinct wrong sample of the current policy), at most 64.
The critic prompt uses compact rubric texts (one line each, the default headings' content) to fit the CPU
budget: the default texts make byte-level prompts of ~870 tokens. JAX's persistent compilation cache (in the
scratch directory) lets the later runs reuse the first run's compiled programs.
Writes <out>/rl_critic.json (every logged line of every run) and <out>/rl_critic.png.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments.configs import rl_tiny  # noqa: E402
from experiments.configs.base import override  # noqa: E402
from kimi_jax.checkpoint.orbax_io import TrainCheckpointer  # noqa: E402
from kimi_jax.data import load_tokenizer  # noqa: E402
from kimi_jax.rl import rollout, tasks  # noqa: E402
from kimi_jax.rl.loop import problems_of, train_rl  # noqa: E402
from kimi_jax.train import loop  # noqa: E402
from kimi_jax.train.checkpointing import save_run_config  # noqa: E402
from kimi_jax.train.step import make_train_step  # noqa: E402

_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of the runs from a random-init policy.")
_WARM_SEEDS = flags.DEFINE_list("warm_seeds", ["0"], "Seeds of the runs from the warmed-up policy ('' for none).")
_ITERATIONS = flags.DEFINE_integer("iterations", 12, "RL iterations per run.")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 4, "Held-out evaluation every this many iterations.")
_WARMUP_STEPS = flags.DEFINE_integer("warmup_steps", 100, "Supervised warm-up steps.")
_CRITIC_UPDATES = flags.DEFINE_integer("critic_updates", 2, "BT steps per iteration.")
_CRITIC_LR = flags.DEFINE_float("critic_lr", 1e-3, "The critic's learning rate (MuonClip).")
_OUT = flags.DEFINE_string("out", "experiments/results", "Where rl_critic.{md,json,png} go.")
_WORKDIR = flags.DEFINE_string("workdir", "", "Scratch directory (default: a temporary one).")

LAYERS = 2
COMPACT = {"critic.instruction": "Which response is better? Answer A or B.",
           "critic.core_rubrics": "- clarity and relevance; fluency; objective, grounded, correct",
           "critic.prescriptive_rubrics": "- no initial praise; no self-justification"}


def base_config(seed: int):
    return override(rl_tiny.get_config(), {
        "seed": seed, "model.num_hidden_layers": LAYERS, "prompts.per_step": 8, "rollout.samples_per_prompt": 8,
        "rollout.budgets": {"arithmetic": 8}, "rollout.seq_len": 48, "rollout.max_slots": 64,
        "eval.num_prompts": 16, "eval.samples": 8, "eval.k": 8, "checkpoint_every": 1000,
        "async_checkpoint": False})


def warm_up(workdir: str, steps: int) -> dict:
    """Supervised warm-up on reference answers (chat format, loss on the assistant's tokens); saves a training
    workdir (config.json + checkpoint) for config.init_workdir."""
    config = override(base_config(0), {"steps": steps, "optimizer.learning_rate": 1e-2, "optimizer.warmup_steps": 10,
                                       "ptx.seq_len": 48})
    tokenizer = load_tokenizer("byte")
    cfg, mesh = loop.model_config(config.model), loop.make_mesh(config.mesh)
    graphdef, state, tx, lr = loop.init_state(config, cfg, mesh)
    step = jax.jit(make_train_step(graphdef, cfg, tx, lr, ce_chunk=None,
                                   qk_clip_tau=config.optimizer.qk_clip_tau), donate_argnums=0)
    pool = problems_of(tasks.FAMILIES["arithmetic"], 0, 150, 1, "train", "pool")
    rng = np.random.default_rng(0)
    start, losses = time.perf_counter(), []
    for _ in range(steps):
        batch = rollout.ptx_arrays(tokenizer, [pool[i] for i in rng.choice(len(pool), 32)], "", 48)
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    save_run_config(config, workdir)
    with TrainCheckpointer(os.path.join(workdir, "checkpoints"), async_save=False) as ckpt:
        ckpt.save(steps, state, {"step": steps}, force=True)
    return {"steps": steps, "first_loss": losses[0], "last_loss": float(np.mean(losses[-10:])),
            "seconds": time.perf_counter() - start}


def run(workdir: str, seed: int, init_workdir: str, *, iterations: int, eval_every: int, updates: int,
        critic_lr: float) -> list[dict]:
    config = override(base_config(seed), {
        "steps": iterations, "init_workdir": init_workdir, "eval.every": eval_every, "critic.enabled": True,
        "critic.mode": "separate", "critic.updates_per_iteration": updates, "critic.learning_rate": critic_lr,
        "critic.batch_pairs": 16, "critic.eval_pairs": 64, "critic.length_bucket": 32, "critic.forward_batch": 64,
        **COMPACT})
    train_rl(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def main(_):
    start = time.time()
    scratch = _WORKDIR.value or tempfile.mkdtemp(prefix="rl_critic_")
    jax.config.update("jax_compilation_cache_dir", os.path.join(scratch, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    warm_seeds = [int(x) for x in _WARM_SEEDS.value if x != ""]
    warm = None
    if warm_seeds:
        warm = warm_up(os.path.join(scratch, "warmup"), _WARMUP_STEPS.value)
        print(f"warm-up: {warm}", flush=True)
    runs = {}
    plan = [("random_init", seed, "") for seed in map(int, _SEEDS.value)]
    plan += [("warmed_up", seed, os.path.join(scratch, "warmup")) for seed in warm_seeds]
    for start_from, seed, init in plan:
        t = time.time()
        lines = run(os.path.join(scratch, f"{start_from}_{seed}"), seed, init, iterations=_ITERATIONS.value,
                    eval_every=_EVAL_EVERY.value, updates=_CRITIC_UPDATES.value, critic_lr=_CRITIC_LR.value)
        runs[f"{start_from}/{seed}"] = {"seconds": time.time() - t, "lines": lines}
        evals = [(l["step"], l.get("critic_pairwise_accuracy"), l.get("critic_onpolicy_accuracy"),
                  l.get("heldout_pass@1")) for l in lines if "critic_pairwise_accuracy" in l]
        print(f"{start_from} seed {seed} ({time.time() - t:.0f}s): (step, fixed, on-policy, pass@1) {evals}",
              flush=True)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result = {"warmup": warm, "runs": runs, "wall_s": time.time() - start,
              "cpu_s": usage.ru_utime + usage.ru_stime, "load_average_end": os.getloadavg(),
              "settings": {"iterations": _ITERATIONS.value, "eval_every": _EVAL_EVERY.value,
                           "critic_updates": _CRITIC_UPDATES.value, "critic_lr": _CRITIC_LR.value,
                           "warmup_steps": _WARMUP_STEPS.value, "layers": LAYERS, **COMPACT}}
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "rl_critic.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.join(_OUT.value, "rl_critic.png"))
    print(f"wall time {result['wall_s']:.0f}s, CPU time {result['cpu_s']:.0f}s")


def plot(result: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, title in zip(axes, ("critic_pairwise_accuracy", "critic_onpolicy_accuracy"),
                              ("fixed held-out pairs (reference vs another answer)",
                               "on-policy held-out pairs (correct vs wrong sample)")):
        for name, run_ in result["runs"].items():
            points = [(l["step"], l[key]) for l in run_["lines"] if key in l]
            if points:
                ax.plot(*zip(*points), marker="o", ls="-" if name.startswith("random") else "--", label=name)
        ax.axhline(0.5, color="grey", lw=0.5)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("RL iteration")
    axes[0].set_ylabel("critic pairwise accuracy")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    app.run(main)
