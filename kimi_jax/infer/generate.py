"""Batched generation: prompts of different lengths, greedy / temperature / top-k / top-p, EOS per sequence.

Prompts are right-padded to the longest (padding after the prompt), so every sequence keeps positions 0, 1, ...
and its own length; each new token goes to position lengths[b]. The whole generation is one jitted function:
prefill, then a `lax.while_loop` of decode steps with fixed shapes (cache of prompt_len + max_new_tokens - 1
entries) that stops when every sequence has emitted EOS or max_new_tokens tokens. It compiles once per
(batch, padded prompt length, max_new_tokens, sampling and decode settings); nothing recompiles per token.

With a model on a mesh the batch is padded (copies of the last prompt) to a multiple of the mesh's batch split.
use_cache=False runs the reference instead: the full forward over the whole sequence for every new token.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kimi_jax import sharding
from kimi_jax.infer.decode import DecodeAttention, decode_step, prefill, recompute_logits
from kimi_jax.infer.sampling import SamplingParams, sample


class GenerateOutput(NamedTuple):
    """tokens int32 [b, max_new_tokens]: generated ids, pad_id after a sequence's EOS (and after an early stop);
    num_tokens int32 [b]: tokens generated per sequence, its EOS included;
    logits fp32 [b, max_new_tokens, vocab] or None: the model's logits each token was drawn from (before
    temperature and filtering); only [:num_tokens] of a row is meaningful."""

    tokens: np.ndarray
    num_tokens: np.ndarray
    logits: np.ndarray | None


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token lists -> (tokens int32 [b, longest], lengths int32 [b])."""
    if not prompts:
        raise ValueError("generate needs at least one prompt")
    lengths = np.array([len(p) for p in prompts], np.int32)
    if lengths.min() == 0:
        raise ValueError(f"prompt {int(np.argmin(lengths))} is empty; every prompt needs at least one token")
    tokens = np.full((len(prompts), lengths.max()), pad_id, np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = prompt
    return tokens, lengths


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             sampling: SamplingParams = SamplingParams(), key: jax.Array | None = None, eos_id: int | None = None,
             pad_id: int = 0, use_cache: bool = True, decode_impl: str = "xla", decode_backend: str | None = None,
             decode_interpret: bool | None = None, return_logits: bool = False) -> GenerateOutput:
    """Sample up to `max_new_tokens` tokens after each prompt (lists of token ids, any lengths >= 1).

    key: PRNG key for sampling (required unless greedy). eos_id: stop a sequence after it emits this id (None:
    always max_new_tokens). decode_impl "xla" | "pallas" picks the attention over the cache; decode_backend and
    decode_interpret go to the Pallas kernel (None: the model's cfg.pallas_backend / cfg.pallas_interpret).
    use_cache=False: the recompute reference.
    """
    cfg = model.cfg
    tokens, lengths = pad_prompts(prompts, pad_id)
    _check_request(cfg, tokens, max_new_tokens, eos_id, pad_id)
    if key is None:
        if not sampling.greedy:
            raise ValueError(f"sampling with temperature {sampling.temperature} needs a PRNG key")
        key = jax.random.PRNGKey(0)
    b = tokens.shape[0]
    extra = -b % sharding.batch_divisor(model.mesh)      # rows the mesh needs: copies of the last prompt, done at once
    tokens = np.concatenate([tokens, tokens[-1:].repeat(extra, axis=0)])
    lengths = np.concatenate([lengths, lengths[-1:].repeat(extra)])
    done = np.arange(b + extra) >= b
    attend = DecodeAttention(decode_impl, cfg.pallas_backend if decode_backend is None else decode_backend,
                             (cfg.pallas_interpret or None) if decode_interpret is None else decode_interpret,
                             cfg.pallas_warp_specialized)
    graphdef, state = nnx.split(model)
    out_tokens, num_tokens, logits = _generate(
        graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(done), key,
        jnp.int32(-1 if eos_id is None else eos_id), jnp.int32(pad_id), max_new_tokens=max_new_tokens,
        sampling=sampling, use_cache=use_cache, attend=attend, return_logits=return_logits)
    return GenerateOutput(np.asarray(out_tokens)[:b], np.asarray(num_tokens)[:b],
                          None if logits is None else np.asarray(logits)[:b])


def _check_request(cfg, tokens, max_new_tokens, eos_id, pad_id):
    """Errors naming the argument that does not fit the model."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    for name, ids in (("prompt token", tokens), ("eos_id", eos_id), ("pad_id", pad_id)):
        if ids is not None and (np.min(ids) < 0 or np.max(ids) >= cfg.vocab_size):
            raise ValueError(f"{name} ids must be in [0, vocab_size={cfg.vocab_size}), got range "
                             f"[{np.min(ids)}, {np.max(ids)}]")
    total = tokens.shape[1] + max_new_tokens - 1
    if total > cfg.max_position_embeddings:
        raise ValueError(f"longest prompt ({tokens.shape[1]}) + max_new_tokens ({max_new_tokens}) - 1 = {total} "
                         f"exceeds max_position_embeddings ({cfg.max_position_embeddings})")


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling", "use_cache", "attend",
                                             "return_logits"))
def _generate(graphdef, state, tokens, lengths, done, key, eos_id, pad_id, *, max_new_tokens, sampling, use_cache,
              attend, return_logits):
    """tokens int32 [b, s] right-padded, lengths int32 [b], done bool [b] (rows not to generate for), eos_id
    int32 [] (-1: none), pad_id int32 [] -> (tokens [b, n], num_tokens [b], logits or None)."""
    model = nnx.merge(graphdef, state)
    b, s = tokens.shape
    n = max_new_tokens
    rows = jnp.arange(b)
    if use_cache:
        logits, context = prefill(model, tokens, lengths, s + n - 1)

        def advance(cache, tok):
            return decode_step(model, tok, cache, attend)
    else:
        context = (jnp.pad(tokens, ((0, 0), (0, n - 1)), constant_values=pad_id), lengths)
        logits = recompute_logits(model, *context)

        def advance(context, tok):
            buffer, lens = context
            buffer = buffer.at[rows, lens].set(tok)
            return recompute_logits(model, buffer, lens + 1), (buffer, lens + 1)

    def emit(i, logits, key, out, out_logits, done, count):
        key, sub = jax.random.split(key)
        tok = jnp.where(done, pad_id, sample(sub, logits, sampling))
        out = out.at[:, i].set(tok)
        if return_logits:
            out_logits = out_logits.at[:, i].set(logits)
        count = count + (~done).astype(jnp.int32)
        done = done | (tok == eos_id)
        return tok, key, out, out_logits, done, count

    out = jnp.full((b, n), pad_id, jnp.int32)
    out_logits = jnp.zeros((b, n, logits.shape[-1]), jnp.float32) if return_logits else None
    first = emit(0, logits, key, out, out_logits, done, jnp.zeros((b,), jnp.int32))

    def cond(carry):
        i, _, _, _, _, _, done, _ = carry
        return (i < n) & ~jnp.all(done)

    def body(carry):
        i, context, tok, key, out, out_logits, done, count = carry
        logits, context = advance(context, tok)
        return (i + 1, context, *emit(i, logits, key, out, out_logits, done, count))

    carry = jax.lax.while_loop(cond, body, (jnp.int32(1), context, *first))
    _, _, _, _, out, out_logits, _, count = carry
    return out, count, out_logits
