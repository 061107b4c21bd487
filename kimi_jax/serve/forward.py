"""The engine's compiled programs: a token block through the model over the paged cache, per-row sampling.

`paged_forward` runs s tokens of each of b sequences (s = 1: decode; s = prefill_chunk: a chunk of a prompt)
through the decoder layers with kv_b_proj absorbed (kimi_jax/infer/decode.py gives the algebra): each layer
projects the tokens, writes their c_kv / k_rope into the sequence's pages, then attends causally by position
over the pages. Decode attention is the paged Pallas kernel (`mla_decode_paged`) when the engine asks for it,
else `paged_attention_xla`; prefill chunks always take the XLA path.

Shapes are fixed per (batch bucket, table-width bucket), so a stream of mixed requests compiles a bounded set of
programs; `trace_count()` counts the traces (one per compilation) of the programs here.
"""

from __future__ import annotations

import collections
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from kimi_jax import sharding
from kimi_jax.infer.cache import layer_stacks
from kimi_jax.infer.decode import DecodeAttention, absorbed_weights, ffn
from kimi_jax.model.rope import rope_cos_sin
from kimi_jax.serve.paged_cache import PagePool, paged_attention_xla
from pallas_kernels.mla_attention import mla_decode_paged

NUM_TOP_LOGPROBS = 5           # alternatives returned per sampled token (OpenAI `top_logprobs` up to this)

_TRACES: collections.Counter = collections.Counter()


def trace_count(name: str | None = None) -> int:
    """Traces so far of one program ("decode", "decode_masked", "prefill", "copy_pages") or of all of them."""
    return sum(_TRACES.values()) if name is None else _TRACES[name]


class RowSampling(NamedTuple):
    """Per-row sampling parameters, arrays of [b]: temperature fp32 (0 = greedy), top_k int32 (0 = off), top_p
    fp32 (1 = off), seed int32 and counter int32 (the row's draw is keyed by fold_in(PRNGKey(seed), counter))."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    seed: jax.Array
    counter: jax.Array


def filter_rows(logits: jax.Array, params: RowSampling) -> jax.Array:
    """logits [b, vocab] -> fp32 logits / temperature with each row's top-k then top-p filter (as
    kimi_jax.infer.sampling.filter_logits, ties kept); rows with temperature 0 are only cast."""
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    scaled = logits / jnp.where(params.temperature <= 0, 1.0, params.temperature)[:, None]
    ordered = -jnp.sort(-scaled, axis=-1)                                               # descending
    kth = jnp.take_along_axis(ordered, jnp.clip(params.top_k - 1, 0, vocab - 1)[:, None], axis=-1)
    kth = jnp.where(params.top_k[:, None] > 0, kth, -jnp.inf)
    ordered = jnp.where(ordered < kth, -jnp.inf, ordered)
    probs = jax.nn.softmax(ordered, axis=-1)
    kept = jnp.sum(jnp.cumsum(probs, axis=-1) - probs < params.top_p[:, None], axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(ordered, jnp.maximum(kept, 1) - 1, axis=-1)
    threshold = jnp.where(params.top_p[:, None] < 1, jnp.maximum(threshold, kth), kth)
    return jnp.where(scaled < threshold, -jnp.inf, scaled)


def sample_rows(logits: jax.Array, params: RowSampling) -> jax.Array:
    """logits [b, vocab] -> int32 tokens [b]: argmax where temperature is 0, else a draw from filter_rows keyed by
    fold_in(PRNGKey(seed), counter) (so a row's draw does not depend on the other rows)."""
    keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.PRNGKey(s), c))(params.seed, params.counter)
    drawn = jax.vmap(jax.random.categorical)(keys, filter_rows(logits, params))
    return jnp.where(params.temperature <= 0, jnp.argmax(logits, axis=-1), drawn).astype(jnp.int32)


def _attend(attn, q_nope, q_rope, c_pages, r_pages, table, positions, attend: DecodeAttention):
    """One layer's absorbed attention: q_nope [b, s, h, dn], q_rope [b, s, h, dr] -> o [b, s, h, v_head_dim]."""
    cfg = attn.cfg
    w_uk, w_uv = absorbed_weights(attn, q_nope.dtype)
    q_latent = jnp.einsum("bshd,chd->bshc", q_nope, w_uk)
    if attend.impl == "pallas" and q_latent.shape[1] == 1:
        o_latent = mla_decode_paged(q_latent[:, 0], q_rope[:, 0], c_pages, r_pages, table, positions[:, 0] + 1,
                                    sm_scale=cfg.softmax_scale, backend=attend.backend, interpret=attend.interpret,
                                    warp_specialized=attend.warp_specialized)[:, None]
    else:
        o_latent = paged_attention_xla(q_latent, q_rope, c_pages, r_pages, table, positions,
                                       sm_scale=cfg.softmax_scale)
    return jnp.einsum("bshc,chd->bshd", o_latent.astype(q_nope.dtype), w_uv)


def _stack(layers, x, cos, sin, pages, page_ids, offsets, table, positions, segment_ids, attend):
    """The tokens through one layer stack, writing every layer's pages. x [b, s, hidden] -> (x, pages)."""
    graphdef, state = nnx.split(layers)
    b, s, _ = x.shape

    def body(carry, xs):
        x, c_all, r_all = carry
        layer_state, i = xs
        layer = nnx.merge(graphdef, layer_state)
        attn = layer.self_attn
        q_nope, q_rope, c_kv, k_rope = attn.project(layer.input_layernorm(x), cos, sin)
        c_all = c_all.at[i, page_ids, offsets].set(c_kv.astype(c_all.dtype))
        r_all = r_all.at[i, page_ids, offsets].set(k_rope.astype(r_all.dtype))
        o = _attend(attn, q_nope, q_rope, c_all[i], r_all[i], table, positions, attend)
        h = sharding.constrain(x + attn.o_proj(o.reshape(b, s, -1)), ("batch", "seq", "act_embed"), layer.mesh)
        y = sharding.constrain(h + ffn(layer, h, segment_ids), ("batch", "seq", "act_embed"), layer.mesh)
        return (y, c_all, r_all), None

    c_all, r_all = pages
    (x, c_all, r_all), _ = jax.lax.scan(body, (x, c_all, r_all), (state, jnp.arange(c_all.shape[0])))
    return x, (c_all, r_all)


def paged_forward(model, pool: PagePool, tokens, positions, valid, table, attend: DecodeAttention):
    """tokens, positions int32 [b, s]; valid bool [b, s] (False: padding, written to the null page); table int32
    [b, M] -> (hidden after the final norm [b, s, hidden], updated pool)."""
    cfg = model.cfg
    page_size = next(iter(pool.pages.values()))[0].shape[2]
    page_ids = jnp.where(valid, jnp.take_along_axis(table, positions // page_size, axis=1), 0)
    offsets = jnp.where(valid, positions % page_size, 0)
    segment_ids = valid.astype(jnp.int32)
    cos, sin = rope_cos_sin(cfg, positions)
    x = sharding.constrain(model.embed_tokens(tokens).astype(jnp.dtype(cfg.dtype)), ("batch", "seq", "act_embed"),
                           model.mesh)
    pages = {}
    for name, _ in layer_stacks(cfg):
        x, pages[name] = _stack(getattr(model, name), x, cos, sin, pool.pages[name], page_ids, offsets, table,
                                positions, segment_ids, attend)
    return model.norm(x), PagePool(pages)


class DecodeOut(NamedTuple):
    """tokens int32 [b]; logprob fp32 [b] (log-softmax of the model's logits, before temperature and filters);
    top_ids int32 [b, NUM_TOP_LOGPROBS], top_logprobs fp32 [b, NUM_TOP_LOGPROBS]."""

    tokens: jax.Array
    logprob: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array


@functools.partial(jax.jit, static_argnames=("graphdef", "attend", "num_steps"), donate_argnames=("pool",))
def decode(graphdef, state, pool: PagePool, tokens, positions, remaining, table, params: RowSampling,
           attend: DecodeAttention, num_steps: int, mask=None):
    """num_steps decode steps in one program: step j feeds each row's token at positions + j and samples the next
    one (with counter + j); a row takes part in step j only while j < remaining[b] (tokens it may still make).

    tokens, positions, remaining int32 [b]; table [b, M] covering positions + num_steps - 1 -> (pool, DecodeOut
    with a leading [num_steps] axis). Tokens a row samples after its stop token are the host's to discard.
    mask: None, or bool [b, vocab] of the tokens each row may sample (constrained decoding, e.g.
    kimi_jax.serve.enforcer; every row needs one True); it applies at every step, so the engine passes it
    with num_steps=1. Sampling (greedy too) sees the masked logits; the returned logprobs are still the model's
    own. None and an array trace separate programs; the unconstrained one is unchanged.
    """
    _TRACES["decode" if mask is None else "decode_masked"] += 1
    model = nnx.merge(graphdef, state)

    def one(carry, j):
        pool, tokens = carry
        valid = j < remaining
        h, pool = paged_forward(model, pool, tokens[:, None], (positions + j)[:, None], valid[:, None], table,
                                attend)
        logits = model.logits(h[:, 0]).astype(jnp.float32)
        logprobs = jax.nn.log_softmax(logits, axis=-1)
        allowed = logits if mask is None else jnp.where(mask, logits, -jnp.inf)
        chosen = sample_rows(allowed, params._replace(counter=params.counter + j))
        top_logprobs, top_ids = jax.lax.top_k(logprobs, min(NUM_TOP_LOGPROBS, logits.shape[-1]))
        out = DecodeOut(chosen, jnp.take_along_axis(logprobs, chosen[:, None], axis=1)[:, 0],
                        top_ids.astype(jnp.int32), top_logprobs)
        return (pool, chosen), out

    (pool, _), out = jax.lax.scan(one, (pool, tokens), jnp.arange(num_steps))
    return pool, out


@functools.partial(jax.jit, static_argnames=("graphdef", "attend"), donate_argnames=("pool",))
def prefill(graphdef, state, pool: PagePool, tokens, positions, valid, table, attend: DecodeAttention):
    """Write a chunk of prompt tokens ([b, chunk] each, valid bool) into the pages -> pool (no logits: the last
    prompt token is fed by the first decode step of each sample)."""
    _TRACES["prefill"] += 1
    model = nnx.merge(graphdef, state)
    return paged_forward(model, pool, tokens, positions, valid, table, attend)[1]


@functools.partial(jax.jit, donate_argnames=("pool",))
def copy_pages(pool: PagePool, src, dst) -> PagePool:
    """pages[:, dst[i]] = pages[:, src[i]] in every layer stack (src, dst int32 [k]; null -> null is a no-op)."""
    _TRACES["copy_pages"] += 1
    return PagePool({name: (c.at[:, dst].set(c[:, src]), r.at[:, dst].set(r[:, src]))
                     for name, (c, r) in pool.pages.items()})
