"""Step 1 of the RL demonstration: supervised warm-up of the tiny model on a task family, stopped while it is still
unreliable, so that held-out pass@8 is well above pass@1 > 0 (there is something for RL to sharpen).

    python experiments/rl_warmup.py --workdir=/tmp/kimi_rl_warmup [--steps=300] [--verbose_share=0.5]

Data: the family's training problems as chat dialogues (user: the problem, assistant: the reference answer), loss
on the assistant's tokens (kimi_jax.rl.rollout.ptx_arrays). With --verbose_share > 0 that share of answers is
written out at length before the final line ("The answer is 7.\\n7"), both forms correct: the long form is what
budget control (experiments/rl_arithmetic.py, --budget) has to remove.
Evaluation: held-out pass@1 / pass@8 from the rollout engine (kimi_jax.rl.loop.evaluate) every --eval_every steps.
The workdir is a training workdir (config.json + orbax checkpoints): pass it as the RL run's config.init_workdir.
Writes <workdir>/warmup.json with the evaluation curve.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments.configs import rl_tiny  # noqa: E402
from experiments.configs.base import override  # noqa: E402
from kimi_jax import chat  # noqa: E402
from kimi_jax.checkpoint.orbax_io import TrainCheckpointer  # noqa: E402
from kimi_jax.data import load_tokenizer  # noqa: E402
from kimi_jax.rl import rewards, rollout, tasks  # noqa: E402
from kimi_jax.rl.loop import ColocatedEngine, evaluate, problems_of  # noqa: E402
from kimi_jax.rl.tasks import Problem  # noqa: E402
from kimi_jax.train import loop  # noqa: E402
from kimi_jax.train.checkpointing import save_run_config  # noqa: E402
from kimi_jax.train.step import make_train_step  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "workdir/rl_warmup", "Output training workdir.")
_STEPS = flags.DEFINE_integer("steps", 300, "Supervised steps.")
_BATCH = flags.DEFINE_integer("batch", 16, "Dialogues per step.")
_LR = flags.DEFINE_float("lr", 3e-3, "Learning rate (MuonClip, constant after 20 warm-up steps).")
_VERBOSE = flags.DEFINE_float("verbose_share", 0.5, "Share of answers written out at length.")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 50, "Held-out evaluation every this many steps.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed (model init, batches).")
_FAMILY = flags.DEFINE_string("family", "arithmetic", "Task family (kimi_jax.rl.tasks.FAMILIES).")
_HELD_OUT = flags.DEFINE_integer("held_out", 18, "Held-out problems evaluated.")
_POOL = flags.DEFINE_integer("pool", 128, "Training problems (config.prompts.pool_size).")


def warmup_config(steps: int, lr: float, seed: int, family: str, held_out: int, pool_size: int):
    """The RL config (rl_tiny) the warm-up shares its model, mesh, eval and engine settings with."""
    return override(rl_tiny.get_config(), {"seed": seed, "steps": steps, "optimizer.learning_rate": lr,
                                           "optimizer.warmup_steps": 20, "prompts.family": family,
                                           "prompts.pool_size": pool_size,
                                           "rollout.budgets": {family: 32}, "ptx.seq_len": 96, "eval.num_prompts": held_out,
                                           "eval.samples": 8, "eval.k": 8})


def verbose(problem: Problem) -> Problem:
    """The same problem with its answer written out at length; the last line stays the answer."""
    return Problem(problem.family, problem.difficulty, problem.prompt,
                   f"The answer is {problem.answer}.\n{problem.answer}", problem.key, problem.spec)


def supervised_batch(tokenizer, pool, rng, batch: int, verbose_share: float, seq_len: int) -> dict:
    picked = [pool[i] for i in rng.choice(len(pool), batch)]
    picked = [verbose(p) if rng.random() < verbose_share else p for p in picked]
    arrays = rollout.ptx_arrays(tokenizer, picked, "", seq_len)
    return arrays


def run(workdir: str, *, steps: int, batch: int, lr: float, verbose_share: float, eval_every: int, seed: int,
        family: str = "arithmetic", held_out: int = 18, pool_size: int = 128):
    workdir = os.path.abspath(workdir)
    config = warmup_config(steps, lr, seed, family, held_out, pool_size)
    config.data.global_batch_size, config.data.seq_len = batch, config.ptx.seq_len
    tokenizer = load_tokenizer(config.data.tokenizer)
    generator = tasks.FAMILIES[config.prompts.family]
    pool = problems_of(generator, seed, config.prompts.pool_size, config.prompts.difficulty, "train", "pool")
    held_out = problems_of(generator, seed, config.eval.num_prompts, config.prompts.difficulty, "held_out", "eval")
    cfg = loop.model_config(config.model)
    mesh = loop.make_mesh(config.mesh)
    graphdef, state, tx, lr_fn = loop.init_state(config, cfg, mesh)
    step_fn = jax.jit(make_train_step(graphdef, cfg, tx, lr_fn, **loop.step_kwargs(config)), donate_argnums=0)
    engine = ColocatedEngine(config, cfg, chat.stop_token_ids(tokenizer))
    rng = np.random.default_rng(seed)
    curve, start = [], time.perf_counter()
    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps:
            state, heldout, _ = engine.run(state, step, lambda e: evaluate(e, tokenizer, held_out, config,
                                                                           rewards.score))
            curve.append({"step": step, "seconds": round(time.perf_counter() - start, 1), **heldout})
            print(json.dumps(curve[-1]), flush=True)
        if step == steps:
            break
        state, metrics = step_fn(state, supervised_batch(tokenizer, pool, rng, batch, verbose_share,
                                                         config.ptx.seq_len))
    ckpt = TrainCheckpointer(os.path.join(workdir, "checkpoints"), keep=1, async_save=False)
    try:
        ckpt.save(steps, state, {}, force=True)
    finally:
        ckpt.close()
    save_run_config(config, workdir)
    result = {"family": family, "pool": pool_size, "held_out": held_out, "steps": steps, "batch": batch, "lr": lr,
              "verbose_share": verbose_share, "seed": seed,
              "final_loss": float(metrics["loss"]), "curve": curve}
    with open(os.path.join(workdir, "warmup.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def main(argv):
    del argv
    run(_WORKDIR.value, steps=_STEPS.value, batch=_BATCH.value, lr=_LR.value, verbose_share=_VERBOSE.value,
        eval_every=_EVAL_EVERY.value, seed=_SEED.value, family=_FAMILY.value, held_out=_HELD_OUT.value,
        pool_size=_POOL.value)


if __name__ == "__main__":
    app.run(main)
