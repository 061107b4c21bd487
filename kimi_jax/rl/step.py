"""The RL train step: K2's policy loss (or GRPO) on a rollout batch, plus the PTX loss, minimised with the training
step's optimizer update (MuonClip with QK-Clip, router bias update; kimi_jax.train.step.apply_update).

A rollout batch holds N = P * K rows (P prompts, K samples each, row p * K + k), T positions each:
    input_ids, positions, segment_ids int32 [N, T]   prompt + response, right-padded (segment_ids 0 on padding)
    targets                            int32 [N, T]   input_ids shifted left by one (the token each position predicts)
    mask                               fp32  [N, T]   1.0 where targets[t] is a response token (so position t's
                                                      logits scored it), 0.0 on prompt and padding
    old_logp                           fp32  [N, T]   log pi_old(targets[t] | prefix), from the engine (0 off mask)
    rewards                            fp32  [P, K]
and optionally "ptx": a batch of curated text in the training step's format (input_ids, targets, positions,
segment_ids, loss_mask [B, S]).

Objective (K2 section 3.2.3; POSTTRAINING.md section 1):

    L = L_RL(logp, old_logp, mask, rewards) + ptx_weight * L_PTX

L_RL is `policy_loss` (loss "k2": (r - rbar - tau log(pi_theta/pi_old))^2 with the sequence-level log ratio) or
`grpo_loss` (loss "grpo"); L_PTX is the mean next-token cross entropy over the PTX batch's loss_mask tokens (K2's
PTX loss, as in InstructGPT). The PTX forward is a second forward of the same parameters; its attention logits
count for QK-Clip (S_max over both) and its expert counts for the router bias. No balance loss is added.

Several gradient steps on one rollout batch are several calls with the same batch: from the second on, the log
ratio against pi_old is no longer 0. The whole batch is one forward ([N, T, vocab] fp32 logits: fine for the
small vocabularies of the CPU runs; no microbatching).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from kimi_jax.rl.loss import DEFAULT_CLIP_EPS, grpo_loss, kl_to_old, mean_entropy, policy_loss, token_logprobs
from kimi_jax.train.step import TrainState, apply_update, cross_entropy, param_constraint

LOSSES = ("k2", "grpo")
ROLLOUT_KEYS = ("input_ids", "targets", "positions", "segment_ids", "mask", "old_logp", "rewards")


def make_rl_loss(graphdef, cfg, *, loss: str = "k2", tau: float = 0.01, clip_eps: float = DEFAULT_CLIP_EPS,
                 ptx_weight: float = 0.0):
    """-> loss_fn(params, batch) -> (objective, (metrics, max_logits [layers, heads], expert counts)), the
    objective of the module docstring; metrics: policy_loss, kl_to_old (k3, nats per response, at `params`),
    entropy (nats per response token) and, with a "ptx" batch, ptx_loss."""
    if loss not in LOSSES:
        raise ValueError(f"config.rl.loss must be one of {LOSSES}, got {loss!r}")

    def loss_fn(params, batch):
        model = nnx.merge(graphdef, params)
        p, k = batch["rewards"].shape
        n, t = batch["input_ids"].shape
        if n != p * k:
            raise ValueError(f"a rollout batch has prompts x K = {p} x {k} rows, got {n}")
        logits, aux = model.forward(batch["input_ids"], batch["positions"], batch["segment_ids"])
        logp = token_logprobs(logits, batch["targets"]).reshape(p, k, t)
        old_logp, mask = batch["old_logp"].reshape(p, k, t), batch["mask"].reshape(p, k, t)
        if loss == "k2":
            rl = policy_loss(logp, old_logp, mask, batch["rewards"], tau)
        else:
            rl = grpo_loss(logp, old_logp, mask, batch["rewards"], clip_eps=clip_eps)
        metrics = {"policy_loss": rl, "kl_to_old": kl_to_old(logp, old_logp, mask),
                   "entropy": mean_entropy(logits, batch["mask"])}
        max_logits, counts = aux["max_logits"], aux.get("expert_counts")
        objective = rl
        if "ptx" in batch:
            ptx = batch["ptx"]
            ptx_logits, ptx_aux = model.forward(ptx["input_ids"], ptx["positions"], ptx["segment_ids"])
            ce_sum, tokens = cross_entropy(ptx_logits, ptx["targets"], ptx["loss_mask"])
            metrics["ptx_loss"] = ce_sum / jnp.maximum(tokens, 1.0)
            objective = objective + ptx_weight * metrics["ptx_loss"]
            max_logits = jnp.maximum(max_logits, ptx_aux["max_logits"])
            if counts is not None:
                counts = counts + ptx_aux["expert_counts"]
        return objective, (metrics, max_logits, counts)

    return loss_fn


def make_rl_step(graphdef, cfg, tx: optax.GradientTransformation, lr_schedule, *, loss: str = "k2",
                 tau: float = 0.01, clip_eps: float = DEFAULT_CLIP_EPS, ptx_weight: float = 0.0,
                 qk_clip_tau: float | None = None, router_bias_update_rate: float = 1e-3):
    """-> step(state: TrainState, batch) -> (state, metrics): one gradient step of `make_rl_loss`'s objective,
    then the training step's update (apply_update: optimizer, QK-Clip with qk_clip_tau when not None, router
    bias); a step whose loss, gradient norm or attention logits are not finite is skipped.
    metrics: loss, policy_loss, kl_to_old, entropy, [ptx_loss], grad_norm, lr, max_attention_logit,
    [clipped_head_share], skipped, nonfinite_streak."""
    grad_fn = jax.value_and_grad(make_rl_loss(graphdef, cfg, loss=loss, tau=tau, clip_eps=clip_eps,
                                              ptx_weight=ptx_weight), has_aux=True)

    def step(state: TrainState, batch: dict):
        missing = [key for key in ROLLOUT_KEYS if key not in batch]
        if missing:
            raise ValueError(f"the rollout batch lacks {missing}")
        on_shards = param_constraint(nnx.merge(graphdef, state.params), cfg, state.params)
        (objective, (metrics, max_logits, counts)), grads = grad_fn(state.params, batch)
        grads = on_shards(grads)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(objective) & jnp.isfinite(grad_norm) & jnp.all(jnp.isfinite(max_logits))
        new_state, clipped = apply_update(tx, cfg, state, grads, max_logits, counts, finite,
                                          qk_clip_tau=qk_clip_tau, router_bias_update_rate=router_bias_update_rate)
        metrics.update(loss=objective, grad_norm=grad_norm, lr=lr_schedule(state.step),
                       max_attention_logit=jnp.max(max_logits), skipped=(~finite).astype(jnp.int32),
                       nonfinite_streak=new_state.nonfinite_streak)
        if qk_clip_tau is not None:
            metrics["clipped_head_share"] = clipped
        return new_state, metrics

    return step
