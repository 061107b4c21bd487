"""The RL loop (K2 section 3.2; POSTTRAINING.md sections 1-2): colocated rollouts with the engine, verifiable
rewards, K2's policy loss with MuonClip.

`train_rl(config, workdir)` takes an ml_collections config (experiments/configs/rl_tiny.py) and runs `config.steps`
iterations. Iteration i (1-based):
  1. sync: the trainer's parameters go to the engine as weight version i - 1 (kimi_jax.serve.weight_sync.
     ColocatedSync; the trainer's state waits in host memory during the rollout when rollout.offload_trainer);
  2. rollout: prompts.per_step problems from the sampler (uniform or prioritised), rendered in the chat format,
     rollout.samples_per_prompt samples each at the decayed temperature, each within its family's token budget;
  3. rewards: the task verifiers (or `reward_fn`), truncated responses penalised, k1.5's length reward optionally;
  4. rl.updates_per_rollout gradient steps of kimi_jax.rl.step (K2's loss or GRPO, + ptx.weight x PTX loss),
     accumulated over rl.microbatches groups of whole prompts; with rl.shuffle_rewards (a control run) the shaped
     rewards are first permuted across all the iteration's samples, so the loss sees rewards without information;
  5. every eval.every iterations and at the end: the new weights are synced (version i) and the held-out
     problems sampled: pass@1 and pass@k.
Logged per iteration (console progress bar, <workdir>/tensorboard, <workdir>/metrics.jsonl): reward (mean task
score), shaped_reward (what the loss sees), response_length, truncated_share, excluded (unscored samples),
temperature, weight_version, the last update's step metrics (loss, policy_loss, kl_to_old, entropy, [ptx_loss],
grad_norm, lr, max_attention_logit, clipped_head_share, skipped), kl_after_update (k3 KL(pi_old || pi_new) over
the rollout, nats per response), rollout_tokens_per_s (response tokens / rollout time), train_tokens_per_s,
sync_s, and at eval steps heldout_pass@1, heldout_pass@<k>, heldout_response_length. Eval lines are written at
step 0 too (the starting policy) on a fresh run.

With config.critic.enabled (kimi_jax/rl/critic.py, the self-critique rubric reward with its closed loop): step 3
adds config.critic.reward_weight x the rubric reward (each sample's mean win probability against the other
samples of its prompt, judged by the critic) to the shaped reward (logged as rubric_reward); after step 4,
config.critic.updates_per_iteration Bradley-Terry steps train the critic on the iteration's (correct, incorrect)
pairs (logged: critic_pairs, critic_loss, critic_accuracy, critic_grad_norm, critic_lr, critic_skipped,
critic_s); at eval steps (and step 0): critic_pairwise_accuracy on fixed held-out pairs and
critic_onpolicy_accuracy on the eval rollout's pairs. In mode "policy" the critic step updates the policy's
parameters (before the eval sync, so the engine serves them) with the critic's own optimizer state.

Checkpoints (as training: orbax, every checkpoint_every iterations, at the end and on SIGTERM) hold the train
state and, as JSON, the prompt sampler's state and the engine's weight version; with the critic enabled,
<workdir>/critic_checkpoints holds the critic's state (optimizer state, step, and its parameters in mode
"separate") at the same iterations. Everything random is a function
of (config.seed, iteration): prompts, sampling seeds, PTX problems, so a resumed run logs what the uninterrupted
run would (timings aside).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from kimi_jax import chat, sharding
from kimi_jax.checkpoint.orbax_io import SigtermFlag, TrainCheckpointer
from kimi_jax.data import load_tokenizer
from kimi_jax.rl import critic as critic_lib, rewards, rollout, tasks
from kimi_jax.rl.sampler import PromptSampler, pass_at_k, temperature
from kimi_jax.rl.step import make_rl_loss, make_rl_step
from kimi_jax.serve.engine import Engine, EngineConfig
from kimi_jax.serve.weight_sync import ColocatedSync
from kimi_jax.train import loop
from kimi_jax.train.checkpointing import restore_model, save_run_config
from kimi_jax.train.metrics import MetricsWriter

logger = logging.getLogger(__name__)
SEED_LIMIT = 2 ** 30


def check_config(config) -> None:
    """ValueErrors naming the field for values that would fail late or misbehave."""
    positive = {"config.log_every": config.log_every, "config.checkpoint_every": config.checkpoint_every,
                "config.rl.updates_per_rollout": config.rl.updates_per_rollout,
                "config.prompts.per_step": config.prompts.per_step,
                "config.rollout.samples_per_prompt": config.rollout.samples_per_prompt,
                "config.rollout.seq_len": config.rollout.seq_len, "config.ptx.batch_size": config.ptx.batch_size}
    for name, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not isinstance(config.steps, int) or config.steps < 0:
        raise ValueError(f"config.steps must be an integer >= 0, got {config.steps!r}")
    if config.prompts.family not in tasks.FAMILIES:
        raise ValueError(f"config.prompts.family must be one of {sorted(tasks.FAMILIES)}, got "
                         f"{config.prompts.family!r}")
    if config.rl.tau <= 0:
        raise ValueError(f"config.rl.tau must be > 0, got {config.rl.tau}")
    if config.ptx.weight < 0:
        raise ValueError(f"config.ptx.weight must be >= 0, got {config.ptx.weight}")
    if config.eval.every and not 1 <= config.eval.k <= config.eval.samples:
        raise ValueError(f"config.eval.k must be in [1, config.eval.samples={config.eval.samples}], got "
                         f"{config.eval.k}")
    if critic_enabled(config):
        critic_lib.check_config(config)


def critic_enabled(config) -> bool:
    return "critic" in config and bool(config.critic.enabled)


def optimizer_steps_config(config) -> ml_collections.ConfigDict:
    """The config the training code builds the state and optimizer from: steps = gradient steps of the run."""
    train_config = ml_collections.ConfigDict(config.to_dict())
    train_config.steps = config.steps * config.rl.updates_per_rollout
    return train_config


def initial_state(config, cfg, mesh):
    """(graphdef, TrainState, tx, lr): fresh, with config.init_workdir's newest parameters when set (the
    optimizer state starts fresh)."""
    graphdef, state, tx, lr = loop.init_state(optimizer_steps_config(config), cfg, mesh)
    if config.init_workdir:
        params = nnx.to_pure_dict(nnx.state(restore_model(config.init_workdir, mesh)))
        params = jax.tree.map(lambda x, target: jax.device_put(x, target.sharding), params, state.params)
        state = state._replace(params=params, opt_state=jax.jit(tx.init)(params))
    return graphdef, state, tx, lr


class ColocatedEngine:
    """The rollout engine on its own mesh, fed by colocated weight sync from the trainer's state."""

    def __init__(self, config, cfg, stop_token_ids):
        r = config.rollout
        self.sync = ColocatedSync(cfg.replace(param_dtype=r.param_dtype), loop.make_mesh(r.mesh),
                                  bucket_bytes=r.bucket_bytes)
        self.engine_config = EngineConfig(max_slots=r.max_slots, page_size=r.page_size, num_pages=r.num_pages,
                                          max_seq_len=r.seq_len, prefill_chunk=r.prefill_chunk,
                                          prefill_batch=r.prefill_batch, decode_steps=r.decode_steps)
        self.offload, self.stop_token_ids = r.offload_trainer, stop_token_ids
        self.engine, self.version = None, None

    def run(self, state, version: int, fn):
        """Serves `state`'s parameters as `version` (synced unless the engine already has that version), runs
        fn(engine) -> (state back on device, fn's result, seconds of the sync)."""
        start = time.perf_counter()
        held = ColocatedSync.offload(state) if self.offload else state
        if self.version != version:
            engine_state, _ = self.sync.to_engine(held.params, version)
            if self.engine is None:
                self.engine = Engine(nnx.merge(self.sync.graphdef, engine_state), self.engine_config,
                                     stop_token_ids=self.stop_token_ids, weight_version=version)
            else:
                self.engine.load_weights(engine_state, version)
            self.version = version
        sync_s = time.perf_counter() - start
        try:
            result = fn(self.engine)
        finally:
            state = ColocatedSync.restore(held) if self.offload else held
        return state, result, sync_s


def problems_of(family, seed: int, count: int, difficulty: int, split: str, field: str) -> list:
    """tasks.generate, its errors naming the config field that asked for `count` problems."""
    try:
        return tasks.generate(family, seed, count, difficulty=difficulty, split=split)
    except ValueError as e:
        raise ValueError(f"{field} ({count}): {e}") from e


def evaluate(engine, tokenizer, problems, config, reward_fn, keep: list | None = None) -> dict[str, float]:
    """Held-out pass@1 and pass@k (eval.samples samples per problem at eval.temperature, fixed seeds); the
    rollout is appended to `keep` when given."""
    n, k = config.eval.samples, config.eval.k
    seeds = np.random.default_rng([config.seed, 1]).integers(0, SEED_LIMIT, len(problems))
    out = rollout.sample(engine, tokenizer, problems, samples_per_prompt=n, budgets=dict(config.rollout.budgets),
                         temperature=config.eval.temperature, top_p=config.rollout.top_p, seeds=seeds,
                         system_prompt=config.prompts.system_prompt, reward_fn=reward_fn)
    if keep is not None:
        keep.append(out)
    correct = np.array([s is not None and s >= 1.0 for s in out.scores]).reshape(-1, n).sum(1)
    return {"heldout_pass@1": float(np.mean([pass_at_k(n, c, 1) for c in correct])),
            f"heldout_pass@{k}": float(np.mean([pass_at_k(n, c, k) for c in correct])),
            "heldout_response_length": float(out.lengths.mean())}


def train_rl(config, workdir: str, *, reward_fn: rollout.RewardFn | None = None) -> dict[str, Any]:
    """Runs (or resumes) RL; returns the last logged metrics with "step". reward_fn(problems, responses) ->
    [Reward] replaces the task verifiers (kimi_jax.rl.rewards.score) when given."""
    check_config(config)
    workdir = os.path.abspath(workdir)
    reward_fn = reward_fn or rewards.score
    tokenizer = load_tokenizer(config.data.tokenizer)
    family, p = tasks.FAMILIES[config.prompts.family], config.prompts
    sampler = PromptSampler(problems_of(family, config.seed, p.pool_size, p.difficulty, "train",
                                        "config.prompts.pool_size"), p.sampling, config.seed)
    held_out = (problems_of(family, config.seed, config.eval.num_prompts, p.difficulty, "held_out",
                            "config.eval.num_prompts") if config.eval.every else [])
    cfg = loop.model_config(config.model)
    mesh = loop.make_mesh(config.mesh)
    ckpt = TrainCheckpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints,
                             save_every=config.checkpoint_every, async_save=config.async_checkpoint)
    resume = ckpt.latest_step() is not None
    if resume:
        graphdef, state, tx, lr = loop.abstract_train_state(optimizer_steps_config(config), cfg, mesh)
    else:
        graphdef, state, tx, lr = initial_state(config, cfg, mesh)
    step_kwargs = dict(loss=config.rl.loss, tau=config.rl.tau, clip_eps=config.rl.clip_eps,
                       ptx_weight=config.ptx.weight, router_bias_update_rate=config.train.router_bias_update_rate,
                       qk_clip_tau=config.optimizer.qk_clip_tau if config.optimizer.name == "muonclip" else None,
                       microbatches=config.rl.get("microbatches", 1))
    step_fn = jax.jit(make_rl_step(graphdef, cfg, tx, lr, **step_kwargs), donate_argnums=0)
    loss_fn = make_rl_loss(graphdef, cfg, loss=config.rl.loss, tau=config.rl.tau, clip_eps=config.rl.clip_eps)
    stats_fn = jax.jit(lambda params, batch: loss_fn(params, batch)[1][0])

    engine = ColocatedEngine(config, cfg, chat.stop_token_ids(tokenizer))
    critic = (critic_lib.LoopCritic(config, cfg, mesh, tokenizer, graphdef, state, workdir, resume=resume,
                                    reward_fn=reward_fn) if critic_enabled(config) else None)
    save_run_config(config, workdir)
    if resume:
        state, extra = ckpt.restore(state)
        sampler.load_state_dict(extra["sampler"])
        engine.sync.version = extra["weight_version"]
        if critic is not None:
            critic.restore(extra["iteration"])
        logger.info("Resumed RL from iteration %d in %s", extra["iteration"], workdir)
    start = int(state.step) // config.rl.updates_per_rollout
    writer = MetricsWriter(workdir, config.steps, initial_step=start)
    sigterm = SigtermFlag()
    batch_sharding = NamedSharding(mesh, sharding.logical_to_spec(("batch", "seq"), mesh))
    put = lambda tree: jax.tree.map(lambda x: jax.make_array_from_process_local_data(batch_sharding, x), tree)
    budgets, r = dict(config.rollout.budgets), config.rollout
    last_metrics = {}

    def save(iteration):
        if critic is not None:
            critic.save(iteration)
        ckpt.save(iteration, state, {"iteration": iteration, "sampler": sampler.state_dict(),
                                     "weight_version": engine.sync.version}, force=True)

    try:
        if not resume and config.eval.every and config.steps:
            kept = [] if critic is not None else None
            state, metrics, _ = engine.run(state, 0, lambda e: evaluate(e, tokenizer, held_out, config, reward_fn,
                                                                        kept))
            if critic is not None:
                metrics.update(critic.evaluate(state, kept[0]))
            writer.write(0, metrics)
        for iteration in range(start + 1, config.steps + 1):
            rng = np.random.default_rng([config.seed, 2, iteration])
            indices = sampler.draw(iteration, p.per_step)
            problems = [sampler.pool[i] for i in indices]
            temp = temperature(iteration - 1, start=r.temperature, end=r.final_temperature,
                               decay_steps=r.temperature_decay_steps)
            seeds = rng.integers(0, SEED_LIMIT, len(problems))
            rollout_start = time.perf_counter()
            state, out, sync_s = engine.run(state, iteration - 1, lambda e: rollout.sample(
                e, tokenizer, problems, samples_per_prompt=r.samples_per_prompt, budgets=budgets, temperature=temp,
                top_p=r.top_p, seeds=seeds, system_prompt=p.system_prompt, reward_fn=reward_fn))
            rollout_s = time.perf_counter() - rollout_start - sync_s
            shaped, scored = rollout.shaped_rewards(out, penalty=r.budget_penalty,
                                                    length_weight=r.length_reward_weight)
            raw = np.array([0.0 if s is None else s for s in out.scores]).reshape(scored.shape)
            sampler.record(indices, (raw >= 1.0) & scored)
            critic_metrics = {}
            if critic is not None and config.critic.reward_weight:
                critic_start = time.perf_counter()
                rubric = critic.rubric_rewards(state, out)
                shaped = shaped + np.float32(config.critic.reward_weight) * rubric
                critic_metrics = {"rubric_reward": float(rubric.mean()),
                                  "critic_s": time.perf_counter() - critic_start}
            if config.rl.get("shuffle_rewards", False):      # the control arm: rewards carry no information
                shaped = np.random.default_rng([config.seed, 3, iteration]).permutation(shaped.reshape(-1)).reshape(
                    shaped.shape)
            batch = rollout.batch_arrays(out, shaped, scored, r.seq_len)
            rollout_batch = put({k: v for k, v in batch.items() if k != "rewards"})
            rollout_batch["rewards"] = jax.device_put(batch["rewards"], NamedSharding(mesh, P()))
            if config.ptx.weight:
                ptx_problems = [sampler.pool[i] for i in rng.choice(len(sampler.pool), config.ptx.batch_size)]
                rollout_batch["ptx"] = put(rollout.ptx_arrays(tokenizer, ptx_problems, p.system_prompt,
                                                              config.ptx.seq_len))
            train_start = time.perf_counter()
            for _ in range(config.rl.updates_per_rollout):
                state, step_metrics = step_fn(state, rollout_batch)
            after = stats_fn(state.params, {k: v for k, v in rollout_batch.items() if k != "ptx"})
            step_metrics = {k: np.asarray(v).item() for k, v in jax.device_get(step_metrics).items()}
            train_s = time.perf_counter() - train_start
            if int(step_metrics["nonfinite_streak"]) >= config.train.max_consecutive_nonfinite:
                raise loop.NonFiniteLossError(
                    f"{int(step_metrics['nonfinite_streak'])} consecutive RL updates up to iteration {iteration} "
                    f"had a non-finite loss or gradient; lower config.optimizer.learning_rate")
            trained_tokens = int(batch["segment_ids"].sum()) * config.rl.updates_per_rollout
            if critic is not None:
                critic_start = time.perf_counter()
                state, update_metrics = critic.update(state, out, iteration)
                if update_metrics.get("critic_skipped"):
                    logger.warning("Critic update of iteration %d had a non-finite loss or gradient; skipped",
                                   iteration)
                critic_metrics.update(update_metrics)
                critic_metrics["critic_s"] = critic_metrics.get("critic_s", 0.0) + time.perf_counter() - critic_start
            metrics = {**{k: v for k, v in step_metrics.items() if k != "nonfinite_streak"},
                       "kl_after_update": float(after["kl_to_old"]),
                       "reward": float(raw[scored].mean()) if scored.any() else 0.0,
                       "shaped_reward": float(shaped.mean()), "response_length": float(out.lengths.mean()),
                       "truncated_share": float(out.truncated.mean()), "excluded": int((~scored).sum()),
                       "temperature": temp, "weight_version": iteration - 1, "sync_s": sync_s,
                       "rollout_tokens_per_s": float(out.lengths.sum()) / max(rollout_s, 1e-9),
                       "train_tokens_per_s": trained_tokens / max(train_s, 1e-9), **critic_metrics}
            writer.advance()
            if config.eval.every and (iteration % config.eval.every == 0 or iteration == config.steps):
                kept = [] if critic is not None else None
                state, heldout, _ = engine.run(state, iteration, lambda e: evaluate(e, tokenizer, held_out, config,
                                                                                   reward_fn, kept))
                metrics.update(heldout)
                if critic is not None:
                    metrics.update(critic.evaluate(state, kept[0]))
            if iteration % config.log_every == 0 or iteration == config.steps or "heldout_pass@1" in metrics:
                writer.write(iteration, metrics)
            last_metrics = {"step": iteration, **metrics}
            if iteration == config.steps or iteration % config.checkpoint_every == 0:
                save(iteration)
            if sigterm.should_stop(iteration):
                save(iteration)
                logger.warning("Saved iteration %d after SIGTERM; exiting.", iteration)
                break
        ckpt.wait()
        if critic is not None:
            critic.wait()
    finally:
        sigterm.uninstall()
        ckpt.close()
        if critic is not None:
            critic.close()
        writer.close()
    return last_metrics
