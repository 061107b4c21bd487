"""Fine-grained Mixture of Experts with the DeepSeek-V3 sigmoid router (aux-loss-free balancing).

Router (fp32):  s = sigmoid(x W_gate)                        [T, E]
  selection:    top-k of s + b (b = e_score_correction_bias, no gradient); with n_group > 1 only the topk_group
                groups with the largest sum of their top-2 biased scores are eligible
  weights:      g = s[selected] (unbiased), / sum(g) if norm_topk_prob, * routed_scaling_factor
Output:         y = sum_k g_k Expert_{e_k}(x) + SharedExperts(x)

Dispatch implementations (ModelConfig.moe_impl): "ragged_dot" (dropless: sort assignments by expert, grouped
matmul with jax.lax.ragged_dot), "capacity" (each expert gets ceil(capacity_factor * T * k / E) slots, overflow
dropped), "pallas" (dropless, the Pallas grouped matmul). With a mesh whose `expert` axis is > 1 (and
ModelConfig.expert_parallel) the routed experts run expert-parallel, see kimi_jax/model/expert_parallel.py.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from kimi_jax import sharding
from kimi_jax.config import ModelConfig
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


def expert_ffn(x, gate_proj, up_proj, down_proj, group_sizes, impl: str, cfg: ModelConfig | None = None):
    """Grouped SwiGLU over rows sorted by expert. x [m, hidden]; gate/up [G, hidden, F]; down [G, F, hidden];
    group_sizes int32 [G] (rows past the sum come out as zeros) -> [m, hidden]. impl "pallas" uses the
    Pallas grouped matmul with cfg.pallas_backend / cfg.pallas_interpret."""
    if impl == "pallas":
        from pallas_kernels.grouped_matmul import gmm
        mm = lambda a, w: gmm(a, w, group_sizes, preferred_element_type=x.dtype, backend=cfg.pallas_backend,
                              interpret=cfg.pallas_interpret or None,
                              warp_specialized=cfg.pallas_warp_specialized)
    else:
        mm = lambda a, w: jax.lax.ragged_dot(a, w, group_sizes, preferred_element_type=x.dtype)
    h = jax.nn.silu(mm(x, gate_proj)) * mm(x, up_proj)
    out = mm(h, down_proj)
    valid = jnp.arange(x.shape[0]) < jnp.sum(group_sizes)
    return jnp.where(valid[:, None], out, 0)


def dropless_moe(x, topk_idx, topk_weights, w, n_experts: int, impl: str, cfg: ModelConfig | None = None):
    """Sort assignments by expert, grouped matmul, unsort, weighted sum.

    x [T, hidden]; topk_idx/topk_weights [T, k]; w = (gate [E,hidden,F], up, down [E,F,hidden]) -> [T, hidden].
    """
    t, k = topk_idx.shape
    flat = topk_idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=n_experts).astype(jnp.int32)
    y_sorted = expert_ffn(x[order // k], *w, group_sizes, impl, cfg)
    y = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(t, k, -1)
    return jnp.einsum("tkh,tk->th", y, topk_weights.astype(y.dtype))


def rank_within_group(group: jax.Array, n_groups: int, sort_key: jax.Array | None = None) -> jax.Array:
    """For each element of group int [N], its position among the elements of the same group, those ordered by
    a stable sort of sort_key (default: group itself, i.e. index order within the group) -> int [N]."""
    order = jnp.argsort(group if sort_key is None else sort_key, stable=True)
    counts = jnp.bincount(group, length=n_groups)
    starts = jnp.cumsum(counts) - counts
    return jnp.zeros_like(group).at[order].set(jnp.arange(group.shape[0], dtype=group.dtype) - starts[group[order]])


def capacity_moe(x, topk_idx, topk_weights, w, n_experts: int, capacity_factor: float):
    """Fixed-capacity dispatch: C = ceil(capacity_factor * T * k / E) slots per expert; assignments past C in
    token order are dropped (contribute 0). Shapes as dropless_moe."""
    t, k = topk_idx.shape
    capacity = max(1, math.ceil(capacity_factor * t * k / n_experts))
    flat = topk_idx.reshape(-1)
    slot = rank_within_group(flat, n_experts)                                          # [T*k] slot in its expert
    keep = slot < capacity
    tokens = jnp.repeat(x, k, axis=0)
    buf = jnp.zeros((n_experts, capacity, x.shape[-1]), x.dtype)
    buf = buf.at[flat, jnp.where(keep, slot, capacity)].set(tokens, mode="drop")
    gate, up, down = w
    h = jax.nn.silu(jnp.einsum("ech,ehf->ecf", buf, gate)) * jnp.einsum("ech,ehf->ecf", buf, up)
    out = jnp.einsum("ecf,efh->ech", h, down)
    y = jnp.where(keep[:, None], out[flat, jnp.minimum(slot, capacity - 1)], 0).reshape(t, k, -1)
    return jnp.einsum("tkh,tk->th", y, topk_weights.astype(y.dtype))


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
        """x [b, s, hidden] -> (y [b, s, hidden], aux {expert_counts int32 [E], balance_loss fp32 []})."""
        cfg = self.cfg
        b, s, hdim = x.shape
        tokens = x.reshape(b * s, hdim)
        router_logits = jnp.dot(tokens.astype(jnp.float32), self.gate.kernel[...].astype(jnp.float32))
        topk_idx, topk_weights, scores = route(cfg, router_logits, self.gate.e_score_correction_bias[...])
        w = tuple(p[...].astype(x.dtype) for p in (self.experts.gate_proj, self.experts.up_proj,
                                                     self.experts.down_proj))
        if cfg.expert_parallel and sharding.axis_size(self.mesh, "expert") > 1:
            from kimi_jax.model.expert_parallel import expert_parallel_moe
            y = expert_parallel_moe(cfg, self.mesh, tokens, topk_idx, topk_weights, w)
        elif cfg.moe_impl == "capacity":
            y = capacity_moe(tokens, topk_idx, topk_weights, w, cfg.n_routed_experts, cfg.capacity_factor)
        else:
            y = dropless_moe(tokens, topk_idx, topk_weights, w, cfg.n_routed_experts, cfg.moe_impl, cfg)
        y = y.reshape(b, s, hdim).astype(x.dtype)
        if cfg.n_shared_experts:
            y = y + self.shared_experts(x)
        valid = segment_ids != 0
        counts = jnp.bincount(jnp.where(valid.reshape(-1, 1), topk_idx, cfg.n_routed_experts).reshape(-1),
                              length=cfg.n_routed_experts + 1)[:-1].astype(jnp.int32)
        balance = sequence_balance_loss(scores.reshape(b, s, -1), topk_idx.reshape(b, s, -1), valid,
                                        cfg.num_experts_per_tok)
        return y, {"expert_counts": counts, "balance_loss": balance}
