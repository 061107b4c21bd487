"""Fine-grained Mixture of Experts with the DeepSeek-V3 sigmoid router (aux-loss-free balancing).

Router (fp32):  s = sigmoid(x W_gate)                        [T, E]
  selection:    top-k of s + b (b = e_score_correction_bias, no gradient); with n_group > 1 only the topk_group
                groups with the largest sum of their top-2 biased scores are eligible
  weights:      g = s[selected] (unbiased), / sum(g) if norm_topk_prob, * routed_scaling_factor
Output:         y = sum_k g_k Expert_{e_k}(x) + SharedExperts(x)

Routing, dispatch, the routed experts and combine run in one explicit `shard_map` island over the mesh (the
partitioner would replicate `top_k` and the sorts over the global token list): every device routes only its
own tokens (the batch is split over data x fsdp x expert; tokens are replicated over `tensor`, whose devices
split the experts' FFN columns and psum the output). Dispatch (ModelConfig.moe_impl, kimi_jax/model/dispatch.py):
"ragged_dot" (dropless: sort assignments by expert, grouped matmul with jax.lax.ragged_dot), "capacity" (each
expert gets ceil(capacity_factor * T_loc * k / E) slots of the device's T_loc tokens, overflow dropped), "pallas"
(dropless, the Pallas grouped matmul). With a mesh whose `expert` axis is > 1 (and ModelConfig.expert_parallel)
the routed experts run expert-parallel, see kimi_jax/model/expert_parallel.py. Dropped assignments (capacity
dispatch, or an expert-parallel buffer sized by expert_parallel_capacity_factor) are reported as
aux["dropped_fraction"].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from kimi_jax import sharding
from kimi_jax.config import ModelConfig
from kimi_jax.model import kernels
from kimi_jax.model.dispatch import capacity_moe, dropless_moe
from kimi_jax.model.expert_parallel import expert_parallel_experts
from kimi_jax.model.layers import MLP, make_param


def route(cfg: ModelConfig, router_logits: jax.Array, bias: jax.Array):
    """router_logits fp32 [T, E], bias fp32 [E] -> (topk_idx int32 [T, k], topk_weights fp32 [T, k], scores [T, E])."""
    scores = jax.nn.sigmoid(router_logits.astype(jnp.float32))
    choice = scores + jax.lax.stop_gradient(bias.astype(jnp.float32))
    if cfg.n_group > 1:
        t, e = choice.shape
        grouped = choice.reshape(t, cfg.n_group, e // cfg.n_group)
        group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)               # [T, n_group]
        _, group_idx = jax.lax.top_k(group_scores, cfg.topk_group)
        group_mask = jnp.zeros_like(group_scores, bool).at[jnp.arange(t)[:, None], group_idx].set(True)
        choice = jnp.where(jnp.repeat(group_mask, e // cfg.n_group, axis=1), choice, -jnp.inf)
    _, topk_idx = jax.lax.top_k(choice, cfg.num_experts_per_tok)
    weights = jnp.take_along_axis(scores, topk_idx, axis=-1)
    if cfg.norm_topk_prob:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return topk_idx.astype(jnp.int32), weights * cfg.routed_scaling_factor, scores


def sequence_balance_loss(scores: jax.Array, topk_idx: jax.Array, valid: jax.Array, top_k: int) -> jax.Array:
    """DeepSeek-V3 sequence-wise balance loss sum_i f_i P_i, averaged over rows (multiply by alpha outside).

    scores fp32 [b, s, E] (sigmoid), topk_idx [b, s, k], valid bool [b, s] (non-padding tokens).
    f_i = E / (k * S) * #tokens choosing i,  P_i = mean_t s_{t,i} / sum_j s_{t,j}, over each row's valid tokens.
    """
    e = scores.shape[-1]
    n = jnp.maximum(jnp.sum(valid, axis=1, keepdims=True), 1).astype(jnp.float32)       # [b, 1]
    chosen = jnp.sum(jax.nn.one_hot(topk_idx, e, dtype=jnp.float32), axis=2) * valid[..., None]
    f = chosen.sum(axis=1) * e / (top_k * n)
    p = (scores / jnp.sum(scores, -1, keepdims=True) * valid[..., None]).sum(axis=1) / n
    return jnp.mean(jnp.sum(f * p, axis=-1))


def update_router_bias(bias: jax.Array, expert_counts: jax.Array, update_rate: float) -> jax.Array:
    """Aux-loss-free balancing: bias_e += u * sign(mean_load - load_e) (per layer). bias/expert_counts [..., E]."""
    load = expert_counts.astype(jnp.float32)
    return bias + update_rate * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)


class Router(nnx.Module):
    """HF `mlp.gate`: weight [E, hidden] (stored as kernel [hidden, E]) and e_score_correction_bias [E]."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, *, stack=()):
        self.kernel = make_param(rngs, cfg, (cfg.hidden_size, cfg.n_routed_experts), ("embed", "router"), stack)
        self.e_score_correction_bias = make_param(None, cfg, (cfg.n_routed_experts,), ("router",), stack,
                                                  init="zeros", dtype=jnp.float32)


class Experts(nnx.Module):
    """Routed expert weights stacked over experts (HF mlp.experts.{e}.{gate,up,down}_proj)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, *, stack=()):
        e, h, f = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_proj = make_param(rngs, cfg, (e, h, f), ("experts", "embed", "expert_mlp"), stack)
        self.up_proj = make_param(rngs, cfg, (e, h, f), ("experts", "embed", "expert_mlp"), stack)
        self.down_proj = make_param(rngs, cfg, (e, f, h), ("experts", "expert_mlp", "embed"), stack)


class MoE(nnx.Module):
    """Router + routed experts + shared experts."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, *, stack=(), mesh=None):
        self.cfg, self.mesh = cfg, mesh
        self.gate = Router(cfg, rngs, stack=stack)
        self.experts = Experts(cfg, rngs, stack=stack)
        if cfg.n_shared_experts:
            self.shared_experts = MLP(cfg, rngs, cfg.shared_intermediate_size, stack=stack)

    def __call__(self, x: jax.Array, segment_ids: jax.Array):
        """x [b, s, hidden] -> (y [b, s, hidden], aux {expert_counts int32 [E], balance_loss fp32 [],
        dropped_fraction fp32 []})."""
        w = tuple(p[...].astype(x.dtype) for p in (self.experts.gate_proj, self.experts.up_proj,
                                                     self.experts.down_proj))
        y, aux = routed_experts(self.cfg, self.mesh, x, segment_ids, self.gate.kernel[...],
                                self.gate.e_score_correction_bias[...], w)
        if self.cfg.n_shared_experts:
            y = y + self.shared_experts(x)
        return y, aux


def routed_experts(cfg: ModelConfig, mesh, x, segment_ids, router_kernel, bias, w):
    """The shard_map island: route, dispatch, routed experts, combine, statistics.

    x [b, s, hidden] (batch split over data x fsdp x expert), segment_ids [b, s] (0 = padding), router_kernel
    [hidden, E], bias [E], w = (gate [E, hidden, F], up [E, hidden, F], down [E, F, hidden]) in x.dtype
    -> (y [b, s, hidden], aux). Inside, each device holds its own rows of x, the whole router, and the experts
    of its `expert` shard (all experts without expert parallelism), FFN columns split over `tensor`.
    """
    if mesh is None:
        return _local_moe(cfg, None, 1, x, segment_ids, router_kernel, bias, w)
    cfg = kernels.resolved(cfg, mesh)
    batch = sharding.batch_axes(mesh) or None
    ep = sharding.axis_size(mesh, "expert") if cfg.expert_parallel else 1
    experts = "expert" if ep > 1 else None
    tensor = "tensor" if sharding.axis_size(mesh, "tensor") > 1 else None
    body = functools.partial(_local_moe, cfg, mesh, ep)
    in_specs = (P(batch, None, None), P(batch, None), P(None, None), P(None),
                (P(experts, None, tensor), P(experts, None, tensor), P(experts, tensor, None)))
    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=(P(batch, None, None), P()),
                         check_vma=False)(x, segment_ids, router_kernel, bias, w)


def _local_moe(cfg: ModelConfig, mesh, ep: int, x, segment_ids, router_kernel, bias, w):
    """One device's share (the whole computation without a mesh); shapes as routed_experts, local."""
    b, s, hdim = x.shape
    tokens = x.reshape(b * s, hdim)
    router_logits = jnp.dot(tokens.astype(jnp.float32), router_kernel.astype(jnp.float32))
    topk_idx, topk_weights, scores = route(cfg, router_logits, bias)
    if ep > 1:
        y, dropped = expert_parallel_experts(cfg, ep, kernels.platform(mesh), tokens, topk_idx, topk_weights, w)
    elif cfg.moe_impl == "capacity":
        y, dropped = capacity_moe(tokens, topk_idx, topk_weights, w, cfg.n_routed_experts, cfg.capacity_factor)
    else:
        y = dropless_moe(tokens, topk_idx, topk_weights, w, cfg.n_routed_experts, cfg.moe_impl, cfg)
        dropped = jnp.zeros((), jnp.int32)
    valid = segment_ids != 0
    counts = jnp.bincount(jnp.where(valid.reshape(-1, 1), topk_idx, cfg.n_routed_experts).reshape(-1),
                          length=cfg.n_routed_experts + 1)[:-1].astype(jnp.int32)
    balance = b * sequence_balance_loss(scores.reshape(b, s, -1), topk_idx.reshape(b, s, -1), valid,
                                        cfg.num_experts_per_tok)                       # summed over rows
    stats = (counts, balance, dropped, jnp.asarray(b, jnp.float32))
    if mesh is not None:
        if sharding.axis_size(mesh, "tensor") > 1:
            y = jax.lax.psum(y, "tensor")
        batch_axes = sharding.batch_axes(mesh)
        stats = jax.lax.psum(stats, batch_axes) if batch_axes else stats
    counts, balance, dropped, rows = stats
    aux = {"expert_counts": counts, "balance_loss": balance / rows,
           "dropped_fraction": dropped.astype(jnp.float32) / (rows * s * cfg.num_experts_per_tok)}
    return y.reshape(b, s, hdim).astype(x.dtype), aux
