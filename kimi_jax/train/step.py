"""The train step: loss, gradient accumulation over microbatches, update, QK-Clip, router-bias update.

State is a plain pytree (TrainState) of pure-dict parameters so that optax, orbax and jit see ordinary arrays.
Per step:
  1. for each microbatch: forward (hidden states, max_logits, expert counts), masked next-token cross entropy
     (+ alpha * sequence-wise balance loss), gradients summed (token-weighted), max_logits MAX-reduced, counts
     summed. The cross entropy is chunked by default (kimi_jax/train/cross_entropy.py: the lm_head logits are
     computed `ce_chunk` tokens of each sequence at a time, never [b, s, vocab] at once); ce_chunk=None computes
     the full fp32 logits and `cross_entropy` below;
  2. grads /= tokens; if loss or gradient norm is not finite the step is skipped (state kept, counters bumped);
  3. optimizer update (gradient clipping inside), QK-Clip with the step's S_max (muonclip only), then the
     aux-loss-free router bias update b += u * sign(mean load - load).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from kimi_jax import sharding
from kimi_jax.model.moe import update_router_bias
from kimi_jax.optim import qk_clip
from kimi_jax.train.cross_entropy import DEFAULT_CHUNK_TOKENS, chunked_cross_entropy


class TrainState(NamedTuple):
    step: jax.Array                 # int32 []
    params: Any                     # pure dict of arrays (nnx.State.to_pure_dict of the model's Params)
    opt_state: Any
    nonfinite_streak: jax.Array     # int32 []: consecutive skipped steps
    nonfinite_total: jax.Array      # int32 []: all skipped steps


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits fp32 [b, s, V], targets int [b, s], mask [b, s] -> (sum of token losses, number of tokens)."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    return jnp.sum((logz - picked) * mask), jnp.sum(mask)


def split_microbatches(batch: dict, microbatches: int, mesh) -> dict:
    """[B, ...] arrays -> [microbatches, B / microbatches, ...]; microbatch m takes rows m, m + microbatches, ...,
    so every device's rows are spread evenly over the microbatches and each microbatch stays split over the
    batch axes like the batch (a contiguous split would hand each microbatch to a few devices)."""
    def split(x):
        x = jnp.swapaxes(x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]), 0, 1)
        if mesh is None:
            return x
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, sharding.batch_axes(mesh) or None)))
    return jax.tree.map(split, batch)


def param_constraint(model, cfg, params):
    """A function pinning a pytree shaped like `params` (the pure dict of `model`'s state: gradients) to the
    parameters' own shardings (identity without a mesh): each microbatch's gradients are reduce-scattered onto
    the parameter shards instead of all-reduced whole, and the accumulator lives on the shards."""
    if model.mesh is None:
        return lambda tree: tree
    state = nnx.state(model)
    shardings = sharding.state_shardings(state, model.mesh, sharding.rules_for(cfg))
    flat = [s for _, s in nnx.to_flat_state(shardings)]
    treedef = jax.tree.structure(params)
    shardings = jax.tree.unflatten(treedef, flat)
    return lambda tree: jax.tree.map(jax.lax.with_sharding_constraint, tree, shardings)


def make_train_step(graphdef, cfg, tx: optax.GradientTransformation, lr_schedule, *,
                    microbatches: int = 1, balance_loss_alpha: float = 0.0, router_bias_update_rate: float = 1e-3,
                    qk_clip_tau: float | None = None, ce_chunk: int | None = DEFAULT_CHUNK_TOKENS):
    """Returns step(state, batch) -> (state, metrics). batch: dict of [B, S] arrays (input_ids, targets,
    positions, segment_ids, loss_mask) with B divisible by `microbatches`.
    ce_chunk: tokens of each sequence per block of the chunked cross entropy (None: full logits)."""

    def micro_loss(params, micro):
        model = nnx.merge(graphdef, params)
        if ce_chunk is None:
            logits, aux = model.forward(micro["input_ids"], micro["positions"], micro["segment_ids"])
            ce_sum, n = cross_entropy(logits, micro["targets"], micro["loss_mask"])
        else:
            x, aux = model.hidden_states(micro["input_ids"], micro["positions"], micro["segment_ids"])
            kernel = (model.embed_tokens.embedding[...].T if cfg.tie_word_embeddings
                      else model.lm_head.kernel[...])
            ce_sum, n = chunked_cross_entropy(x, kernel, micro["targets"], micro["loss_mask"],
                                              chunk_tokens=ce_chunk, mesh=model.mesh)
        balance = jnp.sum(aux.get("balance_loss", jnp.zeros(())))
        objective = ce_sum + balance_loss_alpha * balance * jnp.maximum(n, 1.0)
        return objective, (ce_sum, n, aux)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def step(state: TrainState, batch: dict):
        model = nnx.merge(graphdef, state.params)         # trace time: the mesh and the parameters' axes
        split = split_microbatches(batch, microbatches, model.mesh)
        on_shards = param_constraint(model, cfg, state.params)

        def accumulate(carry, micro):
            grads, ce_sum, n, max_logits, counts, dropped = carry
            (_, (ce, tokens, aux)), g = grad_fn(state.params, micro)
            counts = counts + aux["expert_counts"] if "expert_counts" in aux else counts
            dropped = dropped + jnp.mean(aux["dropped_fraction"]) if "dropped_fraction" in aux else dropped
            return (on_shards(jax.tree.map(jnp.add, grads, on_shards(g))), ce_sum + ce, n + tokens,
                    jnp.maximum(max_logits, aux["max_logits"]), counts, dropped), None

        zeros = on_shards(jax.tree.map(jnp.zeros_like, state.params))
        n_moe = max(cfg.num_moe_layers, 0)
        init = (zeros, 0.0, 0.0, jnp.full((cfg.num_hidden_layers, cfg.num_attention_heads), -jnp.inf),
                jnp.zeros((n_moe, cfg.n_routed_experts), jnp.int32), 0.0)
        (grads, ce_sum, n, max_logits, counts, dropped), _ = jax.lax.scan(accumulate, init, split)
        n = jnp.maximum(n, 1.0)
        grads = jax.tree.map(lambda g: g / n, grads)
        loss = ce_sum / n
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.all(jnp.isfinite(max_logits))

        new_state, clipped = apply_update(tx, cfg, state, grads, max_logits, counts, finite, qk_clip_tau=qk_clip_tau,
                                          router_bias_update_rate=router_bias_update_rate)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_schedule(state.step),
                   "max_attention_logit": jnp.max(max_logits)}
        if qk_clip_tau is not None:
            metrics["clipped_head_share"] = clipped
        if n_moe:
            load = counts.astype(jnp.float32)
            metrics["expert_load_imbalance"] = jnp.mean(jnp.max(load, -1) / jnp.maximum(jnp.mean(load, -1), 1e-9))
            metrics["dropped_token_fraction"] = dropped / microbatches
        metrics.update(skipped=(~finite).astype(jnp.int32), nonfinite_streak=new_state.nonfinite_streak,
                       tokens=n)
        return new_state, metrics

    return step


def apply_update(tx: optax.GradientTransformation, cfg, state: TrainState, grads, max_logits: jax.Array,
                 counts: jax.Array, finite: jax.Array, *, qk_clip_tau: float | None,
                 router_bias_update_rate: float) -> tuple[TrainState, jax.Array]:
    """The update that ends a step (shared by the pre-training and RL steps) -> (new state, clipped head share).

    When `finite`: optimizer update (gradient clipping inside), QK-Clip with the step's S_max = max_logits
    [layers, heads] (qk_clip_tau not None: MuonClip), then the router bias update from counts
    [moe layers, experts] (MoE models). Otherwise the parameters and optimizer state are kept (a skipped step).
    The step counter and the non-finite counters advance either way."""
    n_moe = max(cfg.num_moe_layers, 0)

    def update(operands):
        params, opt_state, grads, max_logits, counts = operands
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        clipped = jnp.zeros(())
        if qk_clip_tau is not None:
            params, clip_stats = qk_clip(params, max_logits, qk_clip_tau, config=cfg, check_finite=False)
            clipped = clip_stats["clipped_fraction"]
        if n_moe:
            gate = params["moe_layers"]["mlp"]["gate"]
            gate["e_score_correction_bias"] = update_router_bias(gate["e_score_correction_bias"], counts,
                                                                 router_bias_update_rate)
        return params, opt_state, clipped

    def skip(operands):
        return operands[0], operands[1], jnp.zeros(())

    # a cond, not a select between old and new trees: the update runs in place on the donated state, and the
    # old and new parameters and optimizer state are never held at once
    params, opt_state, clipped = jax.lax.cond(finite, update, skip,
                                              (state.params, state.opt_state, grads, max_logits, counts))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                      nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
                      nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32)), clipped
