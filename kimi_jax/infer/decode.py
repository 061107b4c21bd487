"""Prefill and one-token decode over the compressed MLA cache, and the recompute reference.

Prefill runs the model's own decoder layers over the right-padded prompts (the usual, non-absorbed MLA) and keeps
each layer's c_kv and k_rope. Decode runs one token per sequence with kv_b_proj absorbed (DeepSeek-V2 sec. 2.1.2):
with kv_b_proj's kernel viewed as W [kv_lora_rank, heads, nope + v] = [W_UK | W_UV] per head,

    q_latent[h] = W_UK[:, h, :] q_nope[h]                                [b, h, kv_lora_rank]
    s[h, t]     = softmax_scale * (q_latent[h] . c_kv[t] + q_rope[h] . k_rope[t]),   t < length
    o_latent[h] = sum_t softmax(s[h])_t c_kv[t]                          [b, h, kv_lora_rank]
    o[h]        = W_UV[:, h, :]^T o_latent[h]                            [b, h, v_head_dim]  -> o_proj

which equals q_nope . k_nope + q_rope . k_rope with k_nope = c_kv W_UK and v = c_kv W_UV, without ever building
k_nope or v. The attention over the cache is `mla_decode` (the Pallas kernel's signature); mla_decode_xla is the
plain XLA version. The recompute reference runs the full forward over the whole sequence for each new token.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.experimental.pallas.fuser  # noqa: F401  (registers jax config states at import, not mid-trace)
import jax.numpy as jnp
from flax import nnx

from kimi_jax import sharding
from kimi_jax.infer.cache import KVCache, LayerCache, layer_stacks
from kimi_jax.model.moe import MoE
from kimi_jax.model.rope import rope_cos_sin
from pallas_kernels.mla_attention import mla_decode

DECODE_IMPLS = ("xla", "pallas")


def mla_decode_xla(q_latent, q_rope, c_kv, k_rope, lengths, *, sm_scale: float):
    """Absorbed MLA attention of one query per sequence over its cache (logits and softmax in fp32).

    q_latent [b, h, c], q_rope [b, h, dr], c_kv [b, n, c], k_rope [b, n, dr], lengths int32 [b] (entries t <
    lengths[b] are attended) -> o_latent [b, h, c] in q_latent.dtype; a sequence of length 0 gets zeros.
    """
    f32 = jnp.float32
    logits = (jnp.einsum("bhc,bnc->bhn", q_latent, c_kv, preferred_element_type=f32)
              + jnp.einsum("bhd,bnd->bhn", q_rope, k_rope, preferred_element_type=f32)) * sm_scale
    valid = (jnp.arange(c_kv.shape[1])[None, :] < lengths[:, None])[:, None, :]       # [b, 1, n]
    logits = jnp.where(valid, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    probs = jnp.exp(logits - jnp.where(valid.any(-1, keepdims=True), row_max, 0.0))
    probs = probs / jnp.maximum(jnp.sum(probs, axis=-1, keepdims=True), jnp.finfo(f32).tiny)
    o = jnp.einsum("bhn,bnc->bhc", probs.astype(c_kv.dtype), c_kv, preferred_element_type=f32)
    return o.astype(q_latent.dtype)


@dataclasses.dataclass(frozen=True)
class DecodeAttention:
    """The attention over the cache used by decode_step: impl "xla" (mla_decode_xla) or "pallas"
    (pallas_kernels.mla_attention.mla_decode with `backend`, `interpret` and `warp_specialized`). Hashable (a jit
    static)."""

    impl: str = "xla"
    backend: str = "auto"
    interpret: bool | None = None
    warp_specialized: bool = False

    def __post_init__(self):
        if self.impl not in DECODE_IMPLS:
            raise ValueError(f"decode_impl must be one of {DECODE_IMPLS}, got {self.impl!r}")

    def __call__(self, q_latent, q_rope, c_kv, k_rope, lengths, *, sm_scale: float):
        """Shapes as mla_decode_xla."""
        if self.impl == "xla":
            return mla_decode_xla(q_latent, q_rope, c_kv, k_rope, lengths, sm_scale=sm_scale)
        return mla_decode(q_latent, q_rope, c_kv, k_rope, lengths, sm_scale=sm_scale, backend=self.backend,
                          interpret=self.interpret, warp_specialized=self.warp_specialized)


def absorbed_attention(attn, q_nope, q_rope, c_kv, k_rope, lengths, attend: DecodeAttention):
    """attn: an MLA module (one layer); q_nope [b, h, dn], q_rope [b, h, dr] (rotated), c_kv [b, n, c],
    k_rope [b, n, dr], lengths [b] -> o [b, h, v_head_dim] (before o_proj)."""
    w_uk, w_uv = absorbed_weights(attn, q_nope.dtype)
    q_latent = jnp.einsum("bhd,chd->bhc", q_nope, w_uk)
    o_latent = attend(q_latent, q_rope, c_kv, k_rope, lengths, sm_scale=attn.cfg.softmax_scale)
    return jnp.einsum("bhc,chd->bhd", o_latent.astype(q_nope.dtype), w_uv)


def absorbed_weights(attn, dtype):
    """kv_b_proj's kernel split per head: (W_UK [kv_lora_rank, h, nope], W_UV [kv_lora_rank, h, v_head_dim])."""
    cfg = attn.cfg
    w = attn.kv_b_proj.kernel[...].astype(dtype)
    w = w.reshape(cfg.kv_lora_rank, cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim)
    return w[..., :cfg.qk_nope_head_dim], w[..., cfg.qk_nope_head_dim:]


def _embed(model, tokens):
    """tokens int [b, s] -> [b, s, hidden] in the compute dtype."""
    x = model.embed_tokens(tokens).astype(jnp.dtype(model.cfg.dtype))
    return sharding.constrain(x, ("batch", "seq", "act_embed"), model.mesh)


def ffn(layer, h, segment_ids=None):
    """The layer's MLP or MoE on post_attention_layernorm(h); h [b, s, hidden]; segment_ids [b, s] (0: a padded
    token the MoE leaves out; default all ones)."""
    normed = layer.post_attention_layernorm(h)
    if isinstance(layer.mlp, MoE):
        segment_ids = jnp.ones(normed.shape[:2], jnp.int32) if segment_ids is None else segment_ids
        return layer.mlp(normed, segment_ids)[0]
    return layer.mlp(normed)


def _last_token(x, lengths):
    """x [b, s, d], lengths [b] -> x[b, lengths[b] - 1] [b, d]."""
    return jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)[:, 0]


def _prefill_stack(layers, x, cos, sin, segment_ids):
    """Scan the model's decoder layers; returns (x, (c_kv [L, b, s, c], k_rope [L, b, s, dr]))."""
    graphdef, state = nnx.split(layers)

    def body(x, layer_state):
        layer = nnx.merge(graphdef, layer_state)
        _, _, c_kv, k_rope = layer.self_attn.project(layer.input_layernorm(x), cos, sin)
        y, _ = layer(x, cos, sin, segment_ids)
        return y, (c_kv, k_rope)

    return jax.lax.scan(body, x, state)


def prefill(model, tokens: jax.Array, lengths: jax.Array, max_len: int):
    """Run right-padded prompts and fill a cache of `max_len` entries per sequence.

    tokens int32 [b, s] (sequence b's prompt is tokens[b, :lengths[b]], lengths >= 1), lengths int32 [b],
    max_len >= s -> (logits fp32 [b, vocab] for the token after each prompt, KVCache with lengths = lengths).
    """
    cfg = model.cfg
    b, s = tokens.shape
    if max_len < s:
        raise ValueError(f"cache max_len ({max_len}) is shorter than the padded prompts ({s})")
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    segment_ids = (positions < lengths[:, None]).astype(jnp.int32)
    cos, sin = rope_cos_sin(cfg, positions)
    x = _embed(model, tokens)
    layers = {}
    for name, _ in layer_stacks(cfg):
        x, (c_kv, k_rope) = _prefill_stack(getattr(model, name), x, cos, sin, segment_ids)
        pad = ((0, 0), (0, 0), (0, max_len - s), (0, 0))
        layers[name] = LayerCache(jnp.pad(c_kv, pad), jnp.pad(k_rope, pad))
    logits = model.logits(model.norm(_last_token(x, lengths)))
    return logits, KVCache(layers, lengths.astype(jnp.int32))


def _decode_stack(layers, x, cos, sin, cache: LayerCache, lengths, attend: DecodeAttention):
    """One token through a layer stack: writes its c_kv/k_rope at index lengths[b] of every layer's cache and
    attends over entries < lengths + 1. x [b, 1, hidden] -> (x, updated LayerCache)."""
    graphdef, state = nnx.split(layers)
    b = x.shape[0]
    rows = jnp.arange(b)

    def body(carry, xs):
        x, c_all, r_all = carry
        layer_state, i = xs
        layer = nnx.merge(graphdef, layer_state)
        attn = layer.self_attn
        q_nope, q_rope, c_kv, k_rope = attn.project(layer.input_layernorm(x), cos, sin)
        c_all = c_all.at[i, rows, lengths].set(c_kv[:, 0])
        r_all = r_all.at[i, rows, lengths].set(k_rope[:, 0])
        o = absorbed_attention(attn, q_nope[:, 0], q_rope[:, 0], c_all[i], r_all[i], lengths + 1, attend)
        h = sharding.constrain(x + attn.o_proj(o.reshape(b, 1, -1)), ("batch", "seq", "act_embed"), layer.mesh)
        y = sharding.constrain(h + ffn(layer, h), ("batch", "seq", "act_embed"), layer.mesh)
        return (y, c_all, r_all), None

    num_layers = cache.c_kv.shape[0]
    (x, c_all, r_all), _ = jax.lax.scan(body, (x, cache.c_kv, cache.k_rope), (state, jnp.arange(num_layers)))
    return x, LayerCache(c_all, r_all)


def decode_step(model, tokens: jax.Array, cache: KVCache, attend: DecodeAttention = DecodeAttention()):
    """One new token per sequence at position cache.lengths.

    tokens int32 [b] -> (logits fp32 [b, vocab] for the following token, cache with the token appended and
    lengths + 1). Needs cache.lengths < cache.max_len (writes past the end are dropped).
    """
    cfg = model.cfg
    cos, sin = rope_cos_sin(cfg, cache.lengths[:, None])
    x = _embed(model, tokens[:, None])
    layers = {}
    for name, _ in layer_stacks(cfg):
        x, layers[name] = _decode_stack(getattr(model, name), x, cos, sin, cache.layers[name], cache.lengths,
                                        attend)
    return model.logits(model.norm(x[:, 0])), KVCache(layers, cache.lengths + 1)


def recompute_logits(model, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
    """The reference: full forward over right-padded tokens int32 [b, t], lengths [b] -> fp32 logits [b, vocab]
    for the token after tokens[b, :lengths[b]] (padding is masked by segment id 0)."""
    positions = jnp.arange(tokens.shape[1])[None, :]
    segment_ids = (positions < lengths[:, None]).astype(jnp.int32)
    x, _ = model.hidden_states(tokens, segment_ids=segment_ids)
    return model.logits(_last_token(x, lengths))
