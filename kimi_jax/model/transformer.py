"""The decoder: embed_tokens -> dense layers -> MoE layers -> norm -> lm_head.

Layers of each kind are stacked (every parameter has a leading "layers" axis) and run with `jax.lax.scan`, so
compile time does not grow with depth. Each decoder layer is pre-norm:
    h = x + MLA(input_layernorm(x));  y = h + FFN(post_attention_layernorm(h))   (FFN = MLP or MoE)
The parameter tree, its HF tensor names and logical axes are listed in docs/parameters.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kimi_jax import sharding
from kimi_jax.config import ModelConfig
from kimi_jax.model.layers import MLP, RMSNorm, make_param
from kimi_jax.model.mla import MLA
from kimi_jax.model.moe import MoE
from kimi_jax.model.rope import rope_cos_sin

REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class DecoderLayer(nnx.Module):
    """One (stacked) decoder layer; `moe` chooses MoE or the dense MLP."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, *, moe: bool, stack=(), mesh=None):
        self.mesh = mesh
        self.input_layernorm = RMSNorm(cfg, cfg.hidden_size, stack=stack)
        self.self_attn = MLA(cfg, rngs, stack=stack, mesh=mesh)
        self.post_attention_layernorm = RMSNorm(cfg, cfg.hidden_size, stack=stack)
        self.mlp = MoE(cfg, rngs, stack=stack, mesh=mesh) if moe else MLP(cfg, rngs, cfg.intermediate_size,
                                                                          stack=stack)

    def __call__(self, x, cos, sin, segment_ids):
        """x [b, s, hidden] -> (y [b, s, hidden], aux dict of this layer)."""
        attn, max_logits = self.self_attn(self.input_layernorm(x), cos, sin, segment_ids)
        h = sharding.constrain(x + attn, ("batch", "seq", "act_embed"), self.mesh)
        normed = self.post_attention_layernorm(h)
        if isinstance(self.mlp, MoE):
            ffn, aux = self.mlp(normed, segment_ids)
        else:
            ffn, aux = self.mlp(normed), {}
        y = sharding.constrain(h + ffn, ("batch", "seq", "act_embed"), self.mesh)
        return y, dict(aux, max_logits=max_logits)


def scan_layers(layers: DecoderLayer, x, cos, sin, segment_ids, cfg: ModelConfig, mesh=None):
    """Run stacked layers over x with lax.scan; returns (x, aux stacked over layers).

    On a mesh, each layer's parameter slice is pinned to its own (FSDP-sharded) layout inside the loop body, so
    the all-gather of a layer's weights happens in its iteration and the gradients are reduce-scattered there,
    instead of XLA gathering the whole stack before the loop (and all-reducing whole stacked gradients).
    """
    graphdef, state = nnx.split(layers)
    slices = None if mesh is None else sharding.layer_slice_shardings(state, mesh, sharding.rules_for(cfg))

    def body(carry, layer_state):
        if slices is not None:
            layer_state = jax.tree.map(
                lambda v, s: v.replace(jax.lax.with_sharding_constraint(sharding.value_of(v), s)), layer_state,
                slices, is_leaf=lambda v: isinstance(v, nnx.Variable))
        return nnx.merge(graphdef, layer_state)(carry, cos, sin, segment_ids)

    if cfg.remat_policy != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
    return jax.lax.scan(body, x, state)


class Embed(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, mesh=None):
        self.mesh = mesh
        self.embedding = make_param(rngs, cfg, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"))

    def __call__(self, ids):
        """ids int [b, s] -> [b, s, hidden]; the table's fsdp shards are gathered first (as FSDP does)."""
        table = sharding.constrain(self.embedding[...], ("vocab", None), self.mesh)
        return jnp.take(table, ids, axis=0)


class LMHead(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.kernel = make_param(rngs, cfg, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"))


class Transformer(nnx.Module):
    """Kimi K2 / DeepSeek-V3 decoder. `model(input_ids)` -> fp32 logits; `model.forward` also returns aux."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, mesh=None):
        self.cfg, self.mesh = cfg, mesh
        self.embed_tokens = Embed(cfg, rngs, mesh)
        if cfg.num_dense_layers:
            self.dense_layers = DecoderLayer(cfg, rngs, moe=False, stack=(cfg.num_dense_layers,), mesh=mesh)
        if cfg.num_moe_layers:
            self.moe_layers = DecoderLayer(cfg, rngs, moe=True, stack=(cfg.num_moe_layers,), mesh=mesh)
        self.norm = RMSNorm(cfg, cfg.hidden_size)
        if not cfg.tie_word_embeddings:
            self.lm_head = LMHead(cfg, rngs)

    def __call__(self, input_ids: jax.Array, positions=None, segment_ids=None) -> jax.Array:
        """input_ids int32 [b, s] -> logits fp32 [b, s, vocab]."""
        return self.forward(input_ids, positions, segment_ids)[0]

    def hidden_states(self, input_ids, positions=None, segment_ids=None):
        """Final-normed hidden states [b, s, hidden] (compute dtype) and aux (see forward)."""
        cfg = self.cfg
        b, s = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        if segment_ids is None:
            segment_ids = jnp.ones((b, s), jnp.int32)
        if self.mesh is not None and b % sharding.batch_divisor(self.mesh):
            raise ValueError(f"batch size {b} is not divisible by the mesh's batch split "
                             f"{sharding.batch_divisor(self.mesh)} (data x fsdp x expert)")
        dtype = jnp.dtype(cfg.dtype)
        x = sharding.constrain(self.embed_tokens(input_ids).astype(dtype), ("batch", "seq", "act_embed"),
                               self.mesh)
        cos, sin = rope_cos_sin(cfg, positions)
        max_logits, aux = [], {}
        if cfg.num_dense_layers:
            x, dense_aux = scan_layers(self.dense_layers, x, cos, sin, segment_ids, cfg, self.mesh)
            max_logits.append(dense_aux["max_logits"])
        if cfg.num_moe_layers:
            x, moe_aux = scan_layers(self.moe_layers, x, cos, sin, segment_ids, cfg, self.mesh)
            max_logits.append(moe_aux["max_logits"])
            aux = {k: moe_aux[k] for k in ("expert_counts", "balance_loss", "dropped_fraction")}
        aux["max_logits"] = jnp.concatenate(max_logits, axis=0)
        return self.norm(x), aux

    def forward(self, input_ids, positions=None, segment_ids=None):
        """input_ids int32 [b, s]; positions int32 [b, s] (default arange); segment_ids int32 [b, s]
        (packed sequences; 0 = padding; default all 1) -> (logits fp32 [b, s, vocab], aux) with
        aux["max_logits"] fp32 [num_hidden_layers, heads], aux["expert_counts"] int32 [num_moe_layers, E],
        aux["balance_loss"] fp32 [num_moe_layers] (sequence-wise balance loss, unweighted),
        aux["dropped_fraction"] fp32 [num_moe_layers] (share of expert assignments dropped by a capacity)."""
        x, aux = self.hidden_states(input_ids, positions, segment_ids)
        return self.logits(x), aux

    def logits(self, x):
        """hidden [..., hidden] -> fp32 logits [..., vocab]."""
        kernel = (self.embed_tokens.embedding[...].T if self.cfg.tie_word_embeddings
                  else self.lm_head.kernel[...])
        return jnp.dot(x, kernel.astype(x.dtype), preferred_element_type=jnp.float32)
