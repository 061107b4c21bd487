"""Mosaic GPU MLA kernels: interpret mode (plgpu.InterpretGPUParams) vs the reference, and CUDA lowering.

The GPU kernels take bf16/f16 (wgmma); they are compared with the fp32 reference on the same bf16 values.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mla_attention import gpu, gpu_backward, gpu_decode, mla_attention, mla_decode, mla_decode_paged
from pallas_kernels.mla_attention import reference

SCALE = 0.2


def _bf16(key, *shape):
  return jax.random.normal(key, shape, jnp.float32).astype(jnp.bfloat16)


def _f32(args):
  return [a.astype(jnp.float32) for a in args]


def _max_rel(got, want):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  return float(np.max(np.abs(got - want)) / (np.max(np.abs(want)) + 1e-6))


@pytest.mark.parametrize("causal,packed", [(True, True), (False, False)])
def test_gpu_attention_forward_and_backward(causal, packed):
  """s = 130 pads to 192 (three 64-row tiles); the packed row ends with padding (segment 0)."""
  b, s, h, dn, dr, dv = 1, 130, 2, 64, 32, 64
  ks = jax.random.split(jax.random.PRNGKey(0), 7)
  args = [_bf16(ks[0], b, s, h, dn), _bf16(ks[1], b, s, h, dr), _bf16(ks[2], b, s, h, dn),
          _bf16(ks[3], b, s, dr), _bf16(ks[4], b, s, h, dv)]
  seg = jnp.asarray([[1] * 40 + [2] * 85 + [0] * 5], jnp.int32) if packed else None
  do = jax.random.normal(ks[5], (b, s, h, dv))
  dlse = jax.random.normal(ks[6], (b, h, s))
  ref = lambda *a: reference.mla_attention_reference(*a, sm_scale=SCALE, segment_ids=seg,
                                                     causal=causal)[:2]
  (o_ref, lse_ref), vjp = jax.vjp(ref, *_f32(args))
  o, lse, max_logits = mla_attention(*args, sm_scale=SCALE, segment_ids=seg, causal=causal,
                                     backend="gpu", interpret=True)
  assert _max_rel(o, o_ref) < 1e-2
  np.testing.assert_allclose(lse, lse_ref, atol=2e-2)
  _, _, m_ref = reference.mla_attention_reference(*_f32(args), sm_scale=SCALE, segment_ids=seg,
                                                  causal=causal)
  np.testing.assert_allclose(max_logits, m_ref, atol=2e-2)
  grads = gpu_backward.attention_backward(*args, seg, o_ref.astype(jnp.bfloat16), lse_ref,
                                 do.astype(jnp.bfloat16), dlse, sm_scale=SCALE, causal=causal,
                                 interpret=True)
  want = vjp((do.astype(jnp.bfloat16).astype(jnp.float32), dlse))
  for name, g, w in zip(["q_nope", "q_rope", "k_nope", "k_rope", "v"], grads, want):
    assert _max_rel(g, w) < 2e-2, name


@pytest.mark.parametrize("causal,packed,races", [(True, True, True), (False, False, False),
                                                 (True, False, False)])
def test_gpu_warp_specialised_forward(causal, packed, races):
  """Two consumer warpgroups of 64 rows: s = 130 pads to 256 (two 128-row CTAs, the second mostly
  padding), so a consumer sees fully masked rows and causal steps past its own rows."""
  b, s, h, dn, dr, dv = 1, 130, 2, 64, 32, 64
  ks = jax.random.split(jax.random.PRNGKey(3), 5)
  args = [_bf16(ks[0], b, s, h, dn), _bf16(ks[1], b, s, h, dr), _bf16(ks[2], b, s, h, dn),
          _bf16(ks[3], b, s, dr), _bf16(ks[4], b, s, h, dv)]
  seg = jnp.asarray([[1] * 40 + [2] * 85 + [0] * 5], jnp.int32) if packed else None
  o_ref, lse_ref, m_ref = reference.mla_attention_reference(*_f32(args), sm_scale=SCALE,
                                                            segment_ids=seg, causal=causal)
  interpret = plgpu.InterpretGPUParams(detect_races=True) if races else True
  o, lse, max_logits = gpu.attention_forward(*args, seg, sm_scale=SCALE, causal=causal,
                                             interpret=interpret, consumers=2, block_q=64,
                                             block_k=64)
  assert _max_rel(o, o_ref) < 1e-2
  np.testing.assert_allclose(lse, lse_ref, atol=2e-2)
  np.testing.assert_allclose(max_logits, m_ref, atol=2e-2)
  with pytest.raises(ValueError, match="consumers must be 1 or 2"):
    gpu.attention_forward(*args, seg, sm_scale=SCALE, causal=causal, consumers=3)


def test_gpu_attention_rejects_fp32():
  x = jnp.zeros((1, 64, 1, 64), jnp.float32)
  with pytest.raises(NotImplementedError, match="bf16"):
    mla_attention(x, x, x, x[:, :, 0], x, sm_scale=SCALE, backend="gpu", interpret=True)


@pytest.mark.parametrize("consumers", [1, 2])
@pytest.mark.parametrize("n,num_splits", [(50, 1), (200, 2)])
def test_gpu_decode_contiguous(n, num_splits, consumers):
  """consumers=2 is the warp-specialised kernel, run under the race-detecting interpreter (it
  also rejects barrier misuse, e.g. consumer 1 reading p without waiting for p_ready)."""
  b, h, c, dr = 3, 2, 64, 16
  ks = jax.random.split(jax.random.PRNGKey(1), 4)
  args = [_bf16(ks[0], b, h, c), _bf16(ks[1], b, h, dr), _bf16(ks[2], b, n, c),
          _bf16(ks[3], b, n, dr)]
  lengths = jnp.asarray([n, 17, 0], jnp.int32)
  interpret = plgpu.InterpretGPUParams(detect_races=True) if consumers == 2 else True
  got = gpu_decode.decode(*args, lengths, sm_scale=SCALE, num_splits=num_splits,
                          interpret=interpret, c_tile=32, consumers=consumers)
  want = reference.mla_decode_reference(*_f32(args), lengths, sm_scale=SCALE)
  assert _max_rel(got, want) < 1e-2
  np.testing.assert_array_equal(np.asarray(got[2], np.float32), 0.0)


@pytest.mark.parametrize("consumers", [1, 2])
def test_gpu_decode_paged_k2_latent(consumers):
  """K2 latent width 512 + 64, pages of 64 tokens, split on."""
  b, h, c, dr, page, num_pages = 2, 4, 512, 64, 64, 6
  ks = jax.random.split(jax.random.PRNGKey(2), 4)
  ql, qr = _bf16(ks[0], b, h, c), _bf16(ks[1], b, h, dr)
  pages_c, pages_r = _bf16(ks[2], num_pages, page, c), _bf16(ks[3], num_pages, page, dr)
  table = jnp.asarray([[4, 1, 3], [0, 5, 2]], jnp.int32)
  lengths = jnp.asarray([150, 64], jnp.int32)
  got = gpu_decode.decode_paged(ql, qr, pages_c, pages_r, table, lengths, sm_scale=SCALE,
                                interpret=True, num_splits=2, consumers=consumers)
  if consumers == 1:  # the public entry point runs the default kernel
    np.testing.assert_array_equal(
        got, mla_decode_paged(ql, qr, pages_c, pages_r, table, lengths, sm_scale=SCALE,
                              backend="gpu", interpret=True, num_splits=2))
  want = reference.mla_decode_paged_reference(*_f32([ql, qr, pages_c, pages_r]), table, lengths,
                                              sm_scale=SCALE)
  assert _max_rel(got, want) < 1e-2


def _lowers_for_cuda(fn, *args):
  text = jax.export.export(jax.jit(fn), platforms=["cuda"])(*args).mlir_module()
  assert "mosaic_gpu" in text


@pytest.mark.parametrize("packed", [True, False])
def test_gpu_training_kernels_lower_for_cuda(packed):
  """Mosaic GPU lowering (layouts, wgmma shapes, SMEM budget) at K2 head dims."""
  sd = lambda *shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt)
  b, s, h = 1, 512, 2
  args = [sd(b, s, h, 128), sd(b, s, h, 64), sd(b, s, h, 128), sd(b, s, 64), sd(b, s, h, 128)]
  seg = sd(b, s, dt=jnp.int32) if packed else None

  def train(qn, qr, kn, kr, v, seg):
    def loss(*a):
      o, lse, m = mla_attention(*a, sm_scale=0.13, segment_ids=seg, backend="gpu")
      return jnp.sum(o.astype(jnp.float32)) + jnp.sum(lse), m
    return jax.grad(loss, argnums=range(5), has_aux=True)(qn, qr, kn, kr, v)

  _lowers_for_cuda(train, *args, seg)


@pytest.mark.parametrize("packed", [True, False])
def test_gpu_warp_specialised_forward_lowers_for_cuda(packed):
  """The shipped WS_BLOCKS fit the SMEM budget (three pipeline stages) at K2 dims and 64 heads."""
  sd = lambda *shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt)
  b, s, h = 1, 4096, 64
  args = [sd(b, s, h, 128), sd(b, s, h, 64), sd(b, s, h, 128), sd(b, s, 64), sd(b, s, h, 128)]
  seg = sd(b, s, dt=jnp.int32) if packed else None
  block_q, block_k = gpu.WS_BLOCKS
  _lowers_for_cuda(lambda *a: gpu.attention_forward(*a, sm_scale=0.13, causal=True, consumers=2,
                                                    block_q=block_q, block_k=block_k),
                   *args, seg)
  with pytest.raises(ValueError, match="pipeline stages"):
    jax.eval_shape(lambda *a: gpu.attention_forward(*a, sm_scale=0.13, causal=True, consumers=2,
                                                    block_q=64, block_k=128), *args, seg)


def test_gpu_decode_kernels_lower_for_cuda():
  sd = lambda *shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt)
  b, h, c, dr = 4, 16, 512, 64
  lengths = sd(b, dt=jnp.int32)
  _lowers_for_cuda(lambda *a: mla_decode(*a, sm_scale=0.13, backend="gpu", num_splits=4),
                   sd(b, h, c), sd(b, h, dr), sd(b, 4096, c), sd(b, 4096, dr), lengths)
  _lowers_for_cuda(lambda *a: mla_decode_paged(*a, sm_scale=0.13, backend="gpu"),
                   sd(b, h, c), sd(b, h, dr), sd(256, 64, c), sd(256, 64, dr),
                   sd(b, 64, dt=jnp.int32), lengths)
  # The warp-specialised kernel at K2 width: three 32-token stages fit next to q.
  _lowers_for_cuda(lambda *a: gpu_decode.decode(*a, sm_scale=0.13, num_splits=4, consumers=2),
                   sd(b, 64, c), sd(b, 64, dr), sd(b, 4096, c), sd(b, 4096, dr), lengths)
  _lowers_for_cuda(lambda *a: gpu_decode.decode_paged(*a, sm_scale=0.13, consumers=2),
                   sd(b, h, c), sd(b, h, dr), sd(256, 64, c), sd(256, 64, dr),
                   sd(b, 64, dt=jnp.int32), lengths)
  with pytest.raises(ValueError, match="consumers must be 1 or 2"):
    jax.eval_shape(lambda *a: gpu_decode.decode(*a, sm_scale=0.13, consumers=4),
                   sd(b, h, c), sd(b, h, dr), sd(b, 4096, c), sd(b, 4096, dr), lengths)
