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
ratio against pi_old is no longer 0.

Microbatching (`microbatches` M > 1): the forward and backward run over M groups of P / M whole prompts (prompt m,
m + M, ... in group m, so each group stays spread over the batch-sharded devices), gradients summed, so at most
[N / M, T, vocab] logits are live at once. Both losses are means over samples of per-sample terms whose group
statistics (rbar, GRPO's mean and std) come from the rewards of one prompt, so the mean of the M groups' losses is
the full batch's loss exactly; the logged entropy is re-weighted by each group's response tokens. The PTX batch is
one more forward and backward beside them.
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
            _, (metrics["ptx_loss"], ptx_max_logits, ptx_counts) = ptx_terms(model, batch["ptx"])
            objective = objective + ptx_weight * metrics["ptx_loss"]
            max_logits = jnp.maximum(max_logits, ptx_max_logits)
            if counts is not None:
                counts = counts + ptx_counts
        return objective, (metrics, max_logits, counts)

    return loss_fn


def ptx_terms(model, ptx: dict):
    """The PTX batch's (token count, (mean next-token loss over loss_mask, max_logits, expert counts or None))."""
    logits, aux = model.forward(ptx["input_ids"], ptx["positions"], ptx["segment_ids"])
    ce_sum, tokens = cross_entropy(logits, ptx["targets"], ptx["loss_mask"])
    return tokens, (ce_sum / jnp.maximum(tokens, 1.0), aux["max_logits"], aux.get("expert_counts"))


def split_prompts(batch: dict, microbatches: int) -> dict:
    """Rollout arrays [N = P*K, ...] and rewards [P, K] -> [M, N / M, ...] and [M, P / M, K]: group m holds prompts
    m, m + M, ... (all K samples of each)."""
    p, k = batch["rewards"].shape

    out = {}
    for key in ROLLOUT_KEYS:
        x = batch[key]
        if key == "rewards":
            out[key] = jnp.swapaxes(x.reshape(p // microbatches, microbatches, k), 0, 1)
        else:
            x = x.reshape(p // microbatches, microbatches, k, *x.shape[1:])
            out[key] = jnp.swapaxes(x, 0, 1).reshape(microbatches, (p // microbatches) * k, *x.shape[3:])
    return out


def make_rl_step(graphdef, cfg, tx: optax.GradientTransformation, lr_schedule, *, loss: str = "k2",
                 tau: float = 0.01, clip_eps: float = DEFAULT_CLIP_EPS, ptx_weight: float = 0.0,
                 qk_clip_tau: float | None = None, router_bias_update_rate: float = 1e-3, microbatches: int = 1):
    """-> step(state: TrainState, batch) -> (state, metrics): one gradient step of `make_rl_loss`'s objective
    (accumulated over `microbatches` groups of whole prompts when > 1: the same step, less memory),
    then the training step's update (apply_update: optimizer, QK-Clip with qk_clip_tau when not None, router
    bias); a step whose loss, gradient norm or attention logits are not finite is skipped.
    metrics: loss, policy_loss, kl_to_old, entropy, [ptx_loss], grad_norm, lr, max_attention_logit,
    [clipped_head_share], skipped, nonfinite_streak."""
    if not isinstance(microbatches, int) or microbatches < 1:
        raise ValueError(f"config.rl.microbatches must be an integer >= 1, got {microbatches!r}")
    loss_fn = make_rl_loss(graphdef, cfg, loss=loss, tau=tau, clip_eps=clip_eps, ptx_weight=ptx_weight)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def accumulated(params, batch, on_shards):
        """The full batch's (objective, (metrics, max_logits, counts)), grads over `microbatches` prompt groups."""
        p = batch["rewards"].shape[0]
        if p % microbatches:
            raise ValueError(f"config.rl.microbatches ({microbatches}) must divide the prompts per rollout batch "
                             f"(config.prompts.per_step = {p})")
        rl_grad = jax.value_and_grad(make_rl_loss(graphdef, cfg, loss=loss, tau=tau, clip_eps=clip_eps),
                                     has_aux=True)

        def body(carry, micro):
            grads, objective, entropy_sum, tokens, kl, max_logits, counts = carry
            (obj, (metrics, s_max, c)), g = rl_grad(params, micro)
            n = jnp.sum(micro["mask"])
            carry = (on_shards(jax.tree.map(jnp.add, grads, on_shards(g))), objective + obj,
                     entropy_sum + metrics["entropy"] * n, tokens + n, kl + metrics["kl_to_old"],
                     jnp.maximum(max_logits, s_max), counts if c is None else counts + c)
            return carry, None

        zeros = on_shards(jax.tree.map(jnp.zeros_like, params))
        n_moe = max(cfg.num_moe_layers, 0)
        init = (zeros, 0.0, 0.0, 0.0, 0.0, jnp.full((cfg.num_hidden_layers, cfg.num_attention_heads), -jnp.inf),
                jnp.zeros((n_moe, cfg.n_routed_experts), jnp.int32))
        (grads, objective, entropy_sum, tokens, kl, max_logits, counts), _ = jax.lax.scan(
            body, init, split_prompts(batch, microbatches))
        scale = 1.0 / microbatches
        grads = jax.tree.map(lambda g: g * scale, grads)
        metrics = {"policy_loss": objective * scale, "kl_to_old": kl * scale,
                   "entropy": entropy_sum / jnp.maximum(tokens, 1.0)}
        objective = objective * scale
        if "ptx" in batch:
            def ptx_objective(params):
                _, (ptx_loss, s_max, c) = ptx_terms(nnx.merge(graphdef, params), batch["ptx"])
                return ptx_weight * ptx_loss, (ptx_loss, s_max, c)
            (ptx_obj, (ptx_loss, s_max, c)), g = jax.value_and_grad(ptx_objective, has_aux=True)(params)
            grads = on_shards(jax.tree.map(jnp.add, grads, g))
            objective, metrics["ptx_loss"] = objective + ptx_obj, ptx_loss
            max_logits = jnp.maximum(max_logits, s_max)
            counts = counts + c if c is not None else counts
        return (objective, (metrics, max_logits, counts if n_moe else None)), grads

    def step(state: TrainState, batch: dict):
        missing = [key for key in ROLLOUT_KEYS if key not in batch]
        if missing:
            raise ValueError(f"the rollout batch lacks {missing}")
        on_shards = param_constraint(nnx.merge(graphdef, state.params), cfg, state.params)
        if microbatches == 1:
            (objective, (metrics, max_logits, counts)), grads = grad_fn(state.params, batch)
        else:
            (objective, (metrics, max_logits, counts)), grads = accumulated(state.params, batch, on_shards)
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
