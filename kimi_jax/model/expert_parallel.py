"""Expert parallelism: routed experts split over the mesh's `expert` axis, tokens exchanged with all-to-all.

These functions run inside the MoE `shard_map` island (kimi_jax/model/moe.py): each device holds T_loc tokens
(the batch is split over data x fsdp x expert), already routed, and E_loc = E / EP experts (EP = size of
`expert`; expert FFN columns may be split over `tensor`).

"all_to_all" (runs everywhere, XLA:CPU included): each device packs its token copies into a send buffer
[EP, C, hidden] (C slots per destination device), exchanges it with `jax.lax.all_to_all`, runs its local
experts on what it received (sorted by local expert, grouped matmul), sends results back with a second
all_to_all and combines. With ModelConfig.expert_parallel_capacity_factor = f, C = ceil(f * T_loc * k / EP)
and overflow is dropped (counted); None gives the dropless worst case C = T_loc * min(k, E_loc).

"ragged_all_to_all" (TPU/GPU): the same exchange with `jax.lax.ragged_all_to_all`, sending only the rows each
device needs; the receive buffer has ceil(f * T_loc * k) rows (a receiver keeps rows in source order until
full), or T_loc * k * EP when dropless. XLA:CPU has no ragged-all-to-all, so on CPU meshes the same call is
emulated with an all_gather (`gathered_ragged_all_to_all`); that keeps the offset bookkeeping tested here. The
choice follows the platform of the mesh's devices, not the host's.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kimi_jax.config import ModelConfig
from kimi_jax.model.dispatch import expert_ffn, rank_within_group


def expert_parallel_experts(cfg: ModelConfig, ep: int, platform: str, x, idx, wts, w):
    """Inside shard_map: local tokens x [T_loc, hidden] routed to idx/wts [T_loc, k] (global expert ids), local
    expert weights w = (gate [E_loc, hidden, F], up, down [E_loc, F, hidden]) -> (routed output [T_loc, hidden],
    number of dropped assignments int32 [] of this device's tokens)."""
    n_local = cfg.n_routed_experts // ep
    if cfg.expert_parallel_impl == "all_to_all":
        return _all_to_all_body(cfg, ep, n_local, x, idx, wts, w)
    return _ragged_body(cfg, ep, n_local, x, idx, wts, w, ragged_exchange(platform))


def _local_experts(x, local_expert, n_local, w, cfg):
    """Rows x [R, hidden] each for local expert local_expert [R] (n_local = no expert) -> [R, hidden]."""
    order = jnp.argsort(local_expert, stable=True)
    sizes = jnp.bincount(local_expert, length=n_local + 1)[:n_local].astype(jnp.int32)
    y_sorted = expert_ffn(x[order], *w, sizes, "pallas" if cfg.moe_impl == "pallas" else "ragged_dot", cfg)
    return jnp.zeros_like(y_sorted).at[order].set(y_sorted)


def _all_to_all_body(cfg, ep, n_local, x, idx, wts, w):
    t, k = idx.shape
    if cfg.expert_parallel_capacity_factor is None:
        capacity = t * min(k, n_local)
    else:
        capacity = max(1, math.ceil(cfg.expert_parallel_capacity_factor * t * k / ep))
    flat = idx.reshape(-1)
    dest = flat // n_local
    slot = rank_within_group(dest, ep, sort_key=flat)                                   # by expert, then token
    keep = slot < capacity
    slot_w = jnp.where(keep, slot, capacity)                                            # out of range = dropped
    send_x = jnp.zeros((ep, capacity, x.shape[-1]), x.dtype).at[dest, slot_w].set(jnp.repeat(x, k, 0),
                                                                                    mode="drop")
    send_e = jnp.full((ep, capacity), n_local, jnp.int32).at[dest, slot_w].set(flat % n_local, mode="drop")
    recv_x = jax.lax.all_to_all(send_x, "expert", 0, 0, tiled=True)
    recv_e = jax.lax.all_to_all(send_e, "expert", 0, 0, tiled=True)
    y = _local_experts(recv_x.reshape(ep * capacity, -1), recv_e.reshape(-1), n_local, w, cfg)
    back = jax.lax.all_to_all(y.reshape(ep, capacity, -1), "expert", 0, 0, tiled=True)
    out = jnp.where(keep[:, None], back[dest, jnp.minimum(slot, capacity - 1)], 0).reshape(t, k, -1)
    return jnp.einsum("tkh,tk->th", out, wts.astype(out.dtype)), jnp.sum(~keep).astype(jnp.int32)


def _ragged_body(cfg, ep, n_local, x, idx, wts, w, exchange):
    t, k = idx.shape
    if cfg.expert_parallel_capacity_factor is None:
        recv_rows = t * k * ep
    else:
        recv_rows = max(1, math.ceil(cfg.expert_parallel_capacity_factor * t * k))
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    dest_sorted = flat[order] // n_local
    sizes = jax.lax.all_gather(jnp.bincount(dest_sorted, length=ep).astype(jnp.int32), "expert")  # [src, dst]
    # receivers keep rows in source order until their buffer is full (all of them when dropless)
    at_dst = jnp.cumsum(sizes, axis=0) - sizes                                          # offset at dst, [src, dst]
    kept = jnp.clip(recv_rows - at_dst, 0, sizes)
    at_src = jnp.cumsum(sizes, axis=1) - sizes                                          # offset at src, [src, dst]
    me = jax.lax.axis_index("expert")
    rank_in_dest = jnp.arange(t * k) - at_src[me][dest_sorted]
    sent = rank_in_dest < kept[me][dest_sorted]                                          # sorted rows that travel
    x_sorted = jnp.repeat(x, k, 0)[order]
    e_sorted = (flat[order] % n_local).astype(jnp.int32)
    recv_x = exchange(x_sorted, jnp.zeros((recv_rows, x.shape[-1]), x.dtype), at_src[me], kept[me],
                      at_dst[me], kept[:, me])
    recv_e = exchange(e_sorted, jnp.full((recv_rows,), n_local, jnp.int32), at_src[me], kept[me], at_dst[me],
                      kept[:, me])
    y = _local_experts(recv_x, recv_e, n_local, w, cfg)
    back = exchange(y, jnp.zeros_like(x_sorted), at_dst[:, me], kept[:, me], at_src[:, me], kept[me])
    back = jnp.where(sent[:, None], back, 0)
    out = jnp.zeros_like(back).at[order].set(back).reshape(t, k, -1)
    return jnp.einsum("tkh,tk->th", out, wts.astype(out.dtype)), jnp.sum(~sent).astype(jnp.int32)


def ragged_exchange(platform: str):
    """The ragged exchange for the mesh devices' platform (XLA:CPU lacks ragged-all-to-all)."""
    return gathered_ragged_all_to_all if platform == "cpu" else ragged_all_to_all


def ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes):
    return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                                     axis_name="expert")


def gathered_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes):
    """jax.lax.ragged_all_to_all over "expert" built from all_gather (for backends without the collective).

    Device d receives from every source s the rows operand_s[input_offsets_s[d] : + send_sizes_s[d]] at
    output[output_offsets_s[d] :]. recv_sizes is implied by the senders' send_sizes.
    """
    del recv_sizes
    me = jax.lax.axis_index("expert")
    operands = jax.lax.all_gather(operand, "expert")
    in_off, sizes, out_off = (jax.lax.all_gather(a, "expert")[:, me] for a in (input_offsets, send_sizes,
                                                                            output_offsets))
    rows = jnp.arange(operand.shape[0])
    for src in range(operands.shape[0]):
        take = jnp.take(operands[src], jnp.minimum(in_off[src] + rows, operand.shape[0] - 1), axis=0)
        target = jnp.where(rows < sizes[src], out_off[src] + rows, output.shape[0])
        output = output.at[target].set(take, mode="drop")
    return output
