"""Token dispatch to routed experts on one device: grouped SwiGLU, dropless and fixed-capacity dispatch.

These run on whatever tokens a device holds: the whole batch without a mesh, the device's own tokens inside the
MoE `shard_map` island (kimi_jax/model/moe.py), or the tokens received from other devices under expert
parallelism (kimi_jax/model/expert_parallel.py).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kimi_jax.config import ModelConfig
from pallas_kernels.grouped_matmul import gmm


def expert_ffn(x, gate_proj, up_proj, down_proj, group_sizes, impl: str, cfg: ModelConfig | None = None):
    """Grouped SwiGLU over rows sorted by expert. x [m, hidden]; gate/up [G, hidden, F]; down [G, F, hidden];
    group_sizes int32 [G] (rows past the sum come out as zeros) -> [m, hidden]. impl "pallas" uses the
    Pallas grouped matmul with cfg.pallas_backend / cfg.pallas_interpret (the model passes a cfg whose backend
    is resolved for its mesh's platform, see kimi_jax/model/kernels.py)."""
    if impl == "pallas":
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
    token order are dropped (contribute 0). Shapes as dropless_moe; returns (y [T, hidden], number of dropped
    assignments int32 [])."""
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
    return jnp.einsum("tkh,tk->th", y, topk_weights.astype(y.dtype)), jnp.sum(~keep).astype(jnp.int32)
