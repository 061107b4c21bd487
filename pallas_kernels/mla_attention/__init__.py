"""MLA attention: training flash attention and absorbed-MLA decode, with backend dispatch.

Entry points (stable):
  mla_attention(q_nope [b,s,h,dn], q_rope [b,s,h,dr], k_nope [b,s,h,dn], k_rope [b,s,dr], v [b,s,h,dv], *,
                sm_scale, segment_ids=None, causal=True, backend="auto", interpret=None,
                warp_specialized=False)
      -> (o [b,s,h,dv], lse [b,h,s] fp32, max_logits [h] fp32)
  mla_decode(q_latent [b,h,c], q_rope [b,h,dr], c_kv [b,n,c], k_rope [b,n,dr], lengths [b], *, sm_scale,
             backend="auto", interpret=None, num_splits=None, warp_specialized=False) -> o_latent [b,h,c]
  mla_decode_paged(q_latent [b,h,c], q_rope [b,h,dr], c_kv_pages [p,page,c], k_rope_pages [p,page,dr],
                   block_table [b,max_pages], lengths [b], *, sm_scale, backend="auto", interpret=None,
                   num_splits=None, warp_specialized=False) -> o_latent [b,h,c]

Semantics (see reference.py): causal means key index <= query index; segment_ids int32 [b,s] restrict
attention to equal ids, id 0 marks padding; a query row with no valid key (padding) gets o = 0, lse = 0;
max_logits is the fp32 max of the scaled logits over the valid pairs of the whole batch (-inf for a head
without one) and carries no gradient; o and lse are differentiable in all five inputs. RoPE is applied by
the caller. Decode: positions t < lengths[b] are valid; a sequence of length 0 gets zeros.

backend: "xla" (the jnp reference), "tpu" (Pallas Mosaic TPU), "gpu" (Pallas Mosaic GPU, sm_90; bf16/f16
inputs; paged decode needs pages of a multiple of 64 tokens), or "auto" (tpu on TPU, gpu on GPU for
16-bit inputs, xla otherwise). interpret=True runs the chosen kernel in its interpret
mode on any platform (pltpu.InterpretParams / plgpu.InterpretGPUParams). warp_specialized=True picks the
GPU kernels with a producer and two consumer warpgroups (`consumers=2` in gpu.py / gpu_decode.py; not yet
timed on hardware); it has no effect on the other backends.
"""
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.mla_attention import common, gpu, gpu_backward, gpu_decode, reference, tpu, tpu_decode

BACKENDS = ("auto", "xla", "tpu", "gpu")
_FORWARD = {"tpu": tpu.attention_forward, "gpu": gpu.attention_forward}
_BACKWARD = {"tpu": tpu.attention_backward, "gpu": gpu_backward.attention_backward}
_DECODE = {"tpu": tpu_decode, "gpu": gpu_decode}


def resolve_backend(backend, dtype=None):
  """Maps "auto" onto the default device's platform; validates the name.

  "auto" on GPU with inputs that are not 16-bit picks "xla" (the GPU kernels are bf16/f16 wgmma only).
  """
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  if backend != "auto":
    return backend
  platform = jax.default_backend()
  if platform == "gpu" and dtype is not None and jnp.dtype(dtype).itemsize != 2:
    return "xla"
  return platform if platform in ("tpu", "gpu") else "xla"


def _gpu_options(backend, warp_specialized):
  """Keyword arguments of the GPU kernels for the warp-specialised variant (none elsewhere)."""
  return dict(consumers=2) if backend == "gpu" and warp_specialized else {}


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def _flash(q_nope, q_rope, k_nope, k_rope, v, segment_ids, sm_scale, causal, backend, interpret,
           warp_specialized):
  return _FORWARD[backend](q_nope, q_rope, k_nope, k_rope, v, segment_ids, sm_scale=sm_scale,
                                 causal=causal, interpret=interpret,
                                 **_gpu_options(backend, warp_specialized))


def _flash_fwd(q_nope, q_rope, k_nope, k_rope, v, segment_ids, sm_scale, causal, backend, interpret,
               warp_specialized):
  out = _flash(q_nope, q_rope, k_nope, k_rope, v, segment_ids, sm_scale, causal, backend, interpret,
               warp_specialized)
  o, lse, _ = out
  return out, (q_nope, q_rope, k_nope, k_rope, v, segment_ids, o, lse)


def _flash_bwd(sm_scale, causal, backend, interpret, warp_specialized, residuals, cotangents):
  q_nope, q_rope, k_nope, k_rope, v, segment_ids, o, lse = residuals
  do, dlse, _ = cotangents  # max_logits is not differentiable.
  grads = _BACKWARD[backend](q_nope, q_rope, k_nope, k_rope, v, segment_ids, o, lse, do, dlse,
                                   sm_scale=sm_scale, causal=causal, interpret=interpret,
                                   **_gpu_options(backend, warp_specialized))
  return (*grads, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def mla_attention(q_nope, q_rope, k_nope, k_rope, v, *, sm_scale, segment_ids=None, causal=True,
                  backend="auto", interpret=None, warp_specialized=False):
  """MLA training attention; see the module docstring for shapes and semantics."""
  common.check_attention_shapes(q_nope, q_rope, k_nope, k_rope, v, segment_ids)
  sm_scale = float(sm_scale)
  backend = resolve_backend(backend, q_nope.dtype)
  if backend == "xla":
    return reference.mla_attention_reference(q_nope, q_rope, k_nope, k_rope, v, sm_scale=sm_scale,
                                             segment_ids=segment_ids, causal=causal)
  return _flash(q_nope, q_rope, k_nope, k_rope, v, segment_ids, sm_scale, bool(causal), backend,
                bool(interpret), bool(warp_specialized))


def mla_decode(q_latent, q_rope, c_kv, k_rope, lengths, *, sm_scale, backend="auto", interpret=None,
               num_splits=None, warp_specialized=False):
  """Absorbed-MLA decode over a contiguous latent cache; num_splits=None picks a split-KV count."""
  common.check_decode_shapes(q_latent, q_rope, c_kv, k_rope, lengths)
  backend = resolve_backend(backend, c_kv.dtype)
  if backend == "xla":
    return reference.mla_decode_reference(q_latent, q_rope, c_kv, k_rope, lengths,
                                          sm_scale=float(sm_scale))
  return _DECODE[backend].decode(q_latent, q_rope, c_kv, k_rope, lengths, sm_scale=float(sm_scale),
                       num_splits=num_splits, interpret=bool(interpret),
                       **_gpu_options(backend, warp_specialized))


def mla_decode_paged(q_latent, q_rope, c_kv_pages, k_rope_pages, block_table, lengths, *, sm_scale,
                     backend="auto", interpret=None, num_splits=None, warp_specialized=False):
  """Absorbed-MLA decode over a paged latent cache (pages of `c_kv_pages.shape[1]` tokens).

  block_table[b, i] is the page holding positions [i*page, (i+1)*page) of sequence b; entries past
  ceil(lengths[b] / page) are not read.
  """
  common.check_paged_shapes(q_latent, q_rope, c_kv_pages, k_rope_pages, block_table, lengths)
  backend = resolve_backend(backend, c_kv_pages.dtype)
  if backend == "xla":
    return reference.mla_decode_paged_reference(q_latent, q_rope, c_kv_pages, k_rope_pages,
                                                block_table, lengths, sm_scale=float(sm_scale))
  return _DECODE[backend].decode_paged(q_latent, q_rope, c_kv_pages, k_rope_pages, block_table, lengths,
                             sm_scale=float(sm_scale), num_splits=num_splits,
                             interpret=bool(interpret), **_gpu_options(backend, warp_specialized))
