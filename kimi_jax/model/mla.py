"""Multi-head Latent Attention (DeepSeek-V2/V3, Kimi K2).

    c_q  = q_a_layernorm(x W_qa)            (or no q compression: q = x W_q)
    q    = c_q W_qb  -> per head [q_nope (dn), q_rope (dr)]
    [c_kv, k_rope] = x W_kva                 (c_kv: kv_lora_rank latent, k_rope: one rope key shared by all heads)
    c_kv = kv_a_layernorm(c_kv)
    [k_nope, v] = c_kv W_kvb                 per head
    RoPE on q_rope and k_rope (interleaved pairs, YaRN), logits = scale * (q_nope.k_nope + q_rope.k_rope)
    o = softmax(logits + mask) v ;  out = o W_o

The latent norms q_a_layernorm and kv_a_layernorm use eps = 1e-6 whatever rms_norm_eps says (as DeepSeek-V3's
reference code and HF DeepseekV3, which build them with the default eps; it matters for Moonlight, eps 1e-5).
Besides the output, attention returns max_logits [heads]: the per-head maximum of the scaled logits over the
valid (causal, same-segment, non-padding) pairs of the batch, which QK-Clip reads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from kimi_jax import sharding
from kimi_jax.config import ModelConfig
from kimi_jax.model import kernels
from kimi_jax.model.layers import Linear, RMSNorm
from kimi_jax.model.rope import apply_rope
from pallas_kernels.mla_attention import mla_attention

LATENT_NORM_EPS = 1e-6


def attention_mask(segment_ids: jax.Array) -> jax.Array:
    """segment_ids int [b, s] (0 = padding) -> bool [b, 1, s_q, s_k]: causal and same segment."""
    s = segment_ids.shape[1]
    causal = jnp.arange(s)[:, None] >= jnp.arange(s)[None, :]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal[None] & same)[:, None]


def mla_attention_xla(q_nope, q_rope, k_nope, k_rope, v, *, sm_scale: float, segment_ids=None):
    """Plain XLA MLA attention.

    q_nope/k_nope [b, s, h, dn], q_rope [b, s, h, dr], k_rope [b, s, dr] (shared by all heads), v [b, s, h, dv],
    segment_ids int [b, s] (0 = padding; None = one segment). Returns (o [b, s, h, dv] in v.dtype,
    max_logits fp32 [h]). Logits and softmax in fp32.
    """
    b, s = q_nope.shape[:2]
    if segment_ids is None:
        segment_ids = jnp.ones((b, s), jnp.int32)
    f32 = jnp.float32
    logits = (jnp.einsum("bqhd,bkhd->bhqk", q_nope, k_nope, preferred_element_type=f32)
              + jnp.einsum("bqhd,bkd->bhqk", q_rope, k_rope, preferred_element_type=f32)) * sm_scale
    mask = attention_mask(segment_ids)
    masked = jnp.where(mask, logits, -jnp.inf)
    real_query = (segment_ids != 0)[:, None, :, None]
    max_logits = jnp.max(jnp.where(real_query, masked, -jnp.inf), axis=(0, 2, 3))
    probs = jax.nn.softmax(masked, axis=-1)
    o = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, preferred_element_type=f32)
    return o.astype(v.dtype), jax.lax.stop_gradient(max_logits)


def pallas_attention(cfg: ModelConfig, mesh, q_nope, q_rope, k_nope, k_rope, v, segment_ids):
    """The Pallas flash kernel (backend from cfg, "auto" resolved for the mesh's platform) in a shard_map
    island: each device attends over its own batch rows and `tensor` shard of heads; the per-head max logits
    are pmax-reduced over the batch axes. Shapes as mla_attention_xla."""
    cfg = kernels.resolved(cfg, mesh)

    def local(q_nope, q_rope, k_nope, k_rope, v, segment_ids, batch_axes=()):
        o, _, max_logits = mla_attention(q_nope, q_rope, k_nope, k_rope, v, sm_scale=cfg.softmax_scale,
                                         segment_ids=segment_ids, backend=cfg.pallas_backend,
                                         interpret=cfg.pallas_interpret or None,
                                         warp_specialized=cfg.pallas_warp_specialized)
        max_logits = jax.lax.stop_gradient(max_logits)
        return o, jax.lax.pmax(max_logits, batch_axes) if batch_axes else max_logits

    if mesh is None:
        return local(q_nope, q_rope, k_nope, k_rope, v, segment_ids)
    batch_axes = sharding.batch_axes(mesh)
    batch = batch_axes or None
    heads = "tensor" if sharding.axis_size(mesh, "tensor") > 1 else None
    per_head = P(batch, None, heads, None)
    return jax.shard_map(lambda *a: local(*a, batch_axes=batch_axes), mesh=mesh,
                         in_specs=(per_head, per_head, per_head, P(batch, None, None), per_head, P(batch, None)),
                         out_specs=(per_head, P(heads)), check_vma=False)(
        q_nope, q_rope, k_nope, k_rope, v, segment_ids)


class MLA(nnx.Module):
    """The attention block (weights named as in the HF checkpoint)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, *, stack=(), mesh=None):
        self.cfg, self.mesh = cfg, mesh
        h, heads = cfg.hidden_size, cfg.num_attention_heads
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(cfg, rngs, h, heads * cfg.qk_head_dim, ("embed", "q_heads"), stack=stack)
        else:
            self.q_a_proj = Linear(cfg, rngs, h, cfg.q_lora_rank, ("embed", "q_lora"), stack=stack)
            self.q_a_layernorm = RMSNorm(cfg, cfg.q_lora_rank, stack=stack, eps=LATENT_NORM_EPS)
            self.q_b_proj = Linear(cfg, rngs, cfg.q_lora_rank, heads * cfg.qk_head_dim, ("q_lora", "q_heads"),
                                   stack=stack)
        self.kv_a_proj_with_mqa = Linear(cfg, rngs, h, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                                         ("embed", "kv_lora"), stack=stack)
        self.kv_a_layernorm = RMSNorm(cfg, cfg.kv_lora_rank, stack=stack, eps=LATENT_NORM_EPS)
        self.kv_b_proj = Linear(cfg, rngs, cfg.kv_lora_rank, heads * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                                ("kv_lora", "kv_heads"), stack=stack)
        self.o_proj = Linear(cfg, rngs, heads * cfg.v_head_dim, h, ("o_heads", "embed"), stack=stack)

    def project(self, x, cos, sin):
        """x [b, s, hidden] -> (q_nope [b,s,h,dn], q_rope [b,s,h,dr] rotated, c_kv [b,s,kv_lora] normed,
        k_rope [b,s,dr] rotated)."""
        cfg = self.cfg
        b, s, _ = x.shape
        q = self.q_proj(x) if cfg.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = sharding.constrain(q.reshape(b, s, cfg.num_attention_heads, cfg.qk_head_dim),
                               ("batch", "seq", "act_heads", None), self.mesh)
        q_nope, q_rope = q[..., :cfg.qk_nope_head_dim], q[..., cfg.qk_nope_head_dim:]
        kv = self.kv_a_proj_with_mqa(x)
        c_kv, k_rope = kv[..., :cfg.kv_lora_rank], kv[..., cfg.kv_lora_rank:]
        return q_nope, apply_rope(q_rope, cos, sin), self.kv_a_layernorm(c_kv), apply_rope(k_rope, cos, sin)

    def __call__(self, x, cos, sin, segment_ids):
        """x [b, s, hidden]; cos/sin [b, s, dr/2]; segment_ids [b, s] -> (out [b, s, hidden], max_logits [h])."""
        cfg = self.cfg
        b, s, _ = x.shape
        q_nope, q_rope, c_kv, k_rope = self.project(x, cos, sin)
        kv = self.kv_b_proj(c_kv).reshape(b, s, cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim)
        kv = sharding.constrain(kv, ("batch", "seq", "act_heads", None), self.mesh)
        k_nope, v = kv[..., :cfg.qk_nope_head_dim], kv[..., cfg.qk_nope_head_dim:]
        if cfg.attention_impl == "pallas":
            o, max_logits = pallas_attention(cfg, self.mesh, q_nope, q_rope, k_nope, k_rope, v, segment_ids)
        else:
            o, max_logits = mla_attention_xla(q_nope, q_rope, k_nope, k_rope, v, sm_scale=cfg.softmax_scale,
                                              segment_ids=segment_ids)
        o = sharding.constrain(o, ("batch", "seq", "act_heads", None), self.mesh)
        return self.o_proj(o.reshape(b, s, -1)), max_logits
