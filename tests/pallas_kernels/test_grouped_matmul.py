"""gmm / tgmm: every backend against the jnp loop reference, forward and grads.

Tolerances (max |a - b| <= tol * max |b|, plus rtol=tol elementwise):
fp32 1e-5, bf16 2e-2 (kernels accumulate in f32; bf16 rounds inputs, the
output and, in the backward, the cotangent).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.grouped_matmul import gmm, groups, reference, tgmm

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}

# name -> (m, k, n, group_sizes, num_local, group_offset, transpose_rhs)
CASES = {
    "ragged_with_empty": (37, 20, 24, [5, 0, 12, 0, 3, 11], 6, None, False),
    "one_group": (24, 20, 24, [0, 24, 0], 3, None, False),
    "last_group": (24, 20, 24, [0, 0, 0, 24], 4, None, False),
    "rows_past_sum": (40, 20, 24, [7, 0, 9], 3, None, False),
    "odd_multi_tile": (45, 136, 140, [9, 20, 0, 13], 4, None, False),
    "transpose_rhs": (37, 20, 24, [5, 0, 12, 3, 11, 6], 6, None, True),
    "window": (37, 20, 24, [4, 6, 0, 9, 5, 3, 7, 1], 3, 2, False),
    "window_first": (37, 20, 24, [4, 6, 0, 9, 5, 3, 7, 1], 3, 0, True),
    "window_last": (37, 20, 24, [4, 6, 0, 9, 5, 3, 7, 1], 3, 5, False),
}

# backend name -> gmm / tgmm keyword arguments
BACKENDS = {
    "xla": dict(backend="xla"),
    "tpu": dict(backend="tpu", interpret=True, tiling=(16, 128, 128)),
    "gpu": dict(backend="gpu", interpret=True, tiling=(64, 64, 32)),
    # warp-specialised: a producer and two consumer warpgroups (tn each)
    "gpu_ws": dict(backend="gpu", interpret=True, tiling=(64, 64, 32, 2)),
}


def _inputs(case, dtype, seed=0):
  m, k, n, sizes, num_local, offset, transpose = CASES[case]
  keys = jax.random.split(jax.random.key(seed), 3)
  lhs = jax.random.normal(keys[0], (m, k), jnp.float32).astype(dtype)
  shape = (num_local, n, k) if transpose else (num_local, k, n)
  rhs = jax.random.normal(keys[1], shape, jnp.float32).astype(dtype)
  dout = jax.random.normal(keys[2], (m, n), jnp.float32).astype(dtype)
  kw = dict(transpose_rhs=transpose,
            group_offset=None if offset is None else jnp.int32(offset))
  return lhs, rhs, jnp.asarray(sizes, jnp.int32), dout, kw


def _assert_close(actual, expected, dtype):
  actual = np.asarray(actual, np.float32)
  expected = np.asarray(expected, np.float32)
  tol = TOL[dtype]
  scale = max(np.abs(expected).max(), 1.0)
  np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale)


def _check_forward_and_grads(case, dtype, backend_kw):
  lhs, rhs, sizes, dout, kw = _inputs(case, dtype)

  def loss(fn, lhs, rhs):
    out = fn(lhs, rhs, sizes, **kw)
    return jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32)), out

  kernel = functools.partial(gmm, **backend_kw)
  (_, out), grads = jax.value_and_grad(
      functools.partial(loss, kernel), (0, 1), has_aux=True)(lhs, rhs)
  # The reference runs in f32 on the same (possibly bf16-rounded) inputs.
  f32 = lambda x: x.astype(jnp.float32)
  (_, ref_out), ref_grads = jax.value_and_grad(
      functools.partial(loss, reference.gmm_reference), (0, 1),
      has_aux=True)(f32(lhs), f32(rhs))

  assert out.dtype == dtype and out.shape == ref_out.shape
  assert grads[0].dtype == dtype and grads[1].dtype == dtype
  _assert_close(out, ref_out, dtype)
  _assert_close(grads[0], ref_grads[0], dtype)
  _assert_close(grads[1], ref_grads[1], dtype)
  return out, grads


@pytest.mark.parametrize("backend", ["tpu", "xla"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_gmm_fp32_matches_reference(backend, case):
  _check_forward_and_grads(case, jnp.float32, BACKENDS[backend])


@pytest.mark.parametrize("backend", ["gpu", "gpu_ws"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_gmm_gpu_bf16_matches_reference(backend, case):
  _check_forward_and_grads(case, jnp.bfloat16, BACKENDS[backend])


@pytest.mark.parametrize("backend", ["tpu", "xla"])
@pytest.mark.parametrize("case", ["ragged_with_empty", "window",
                                  "transpose_rhs", "odd_multi_tile"])
def test_gmm_bf16_matches_reference(backend, case):
  _check_forward_and_grads(case, jnp.bfloat16, BACKENDS[backend])


def test_gpu_kernels_reject_fp32_clearly():
  lhs, rhs, sizes, _, _ = _inputs("one_group", jnp.float32)
  with pytest.raises(NotImplementedError, match="16-bit inputs"):
    gmm(lhs, rhs, sizes, **BACKENDS["gpu"])


def test_rows_outside_window_are_zero_with_zero_grad():
  lhs, rhs, sizes, dout, kw = _inputs("window", jnp.float32)
  out, (dlhs, _) = _check_forward_and_grads("window", jnp.float32,
                                            BACKENDS["tpu"])
  # Window = global groups 2..4 = rows [10, 24) of the 37 rows.
  outside = np.r_[0:10, 24:37]
  assert np.all(np.asarray(out)[outside] == 0)
  assert np.all(np.asarray(dlhs)[outside] == 0)
  assert np.abs(np.asarray(out)[10:24]).min() > 0


def test_tpu_kernels_with_race_detecting_interpreter():
  params = pltpu.InterpretParams(detect_races=True)
  _check_forward_and_grads(
      "odd_multi_tile", jnp.float32,
      dict(backend="tpu", interpret=params, tiling=(8, 128, 128)))
  _check_forward_and_grads(
      "window", jnp.bfloat16,
      dict(backend="tpu", interpret=params, tiling=(16, 128, 128)))


@pytest.mark.parametrize("tiling", [(64, 64, 32), (64, 64, 32, 2)])
def test_gpu_kernels_with_race_detecting_interpreter(tiling):
  # Two simulated SMs share the items of one output tile (ragged groups);
  # with warp specialisation two consumers also share each pipeline slot.
  params = plgpu.InterpretGPUParams(detect_races=True)
  _check_forward_and_grads(
      "ragged_with_empty", jnp.bfloat16,
      dict(backend="gpu", interpret=params, tiling=tiling))


@pytest.mark.parametrize("backend,dtype", [("xla", jnp.float32),
                                           ("tpu", jnp.float32),
                                           ("gpu", jnp.bfloat16),
                                           ("gpu_ws", jnp.bfloat16)])
def test_tgmm_writes_zeros_for_empty_groups(backend, dtype):
  lhs, _, sizes, dout, _ = _inputs("ragged_with_empty", dtype)
  out = tgmm(lhs, dout, sizes, 6, **BACKENDS[backend])
  f32 = lambda x: np.asarray(x, np.float32)
  _assert_close(out, reference.tgmm_reference(f32(lhs), f32(dout), sizes, 6),
                dtype)
  assert np.all(f32(out)[[1, 3]] == 0)
  # Independent check of one group: rows [5, 17) are group 2.
  _assert_close(out[2], f32(lhs)[5:17].T @ f32(dout)[5:17], dtype)


def test_reference_matches_closed_form():
  lhs = np.arange(12, dtype=np.float32).reshape(6, 2)
  rhs = np.stack([np.eye(2), 2 * np.eye(2), 3 * np.eye(2)]).astype(np.float32)
  sizes = jnp.array([2, 0, 3], jnp.int32)  # row 5 is past the sum
  expected = np.concatenate([lhs[:2], 3 * lhs[2:5], 0 * lhs[5:]])
  np.testing.assert_array_equal(
      reference.gmm_reference(lhs, rhs, sizes), expected)
  np.testing.assert_array_equal(reference.gmm_xla(lhs, rhs, sizes), expected)


@pytest.mark.parametrize("builder,extra", [(groups.gmm_metadata, 1),
                                           (groups.tgmm_metadata, -1)])
def test_metadata_covers_rows(builder, extra):
  tm, m_padded = 8, 48
  rng = np.random.default_rng(0)
  for _ in range(20):
    sizes = rng.integers(0, 12, size=7) * (rng.random(7) > 0.3)
    offset = int(rng.integers(0, 3))
    starts, ends = groups.window_bounds(jnp.asarray(sizes, jnp.int32),
                                        offset, 5, 45)
    meta = jax.tree.map(np.asarray, builder(starts, ends, m_padded, tm))
    assert meta.group.shape == (m_padded // tm + 5 + extra,)
    assert np.all(np.diff(meta.tile) >= 0)  # output tiles visited in order
    covered = np.zeros(m_padded, int)
    for t, lo, hi in zip(meta.tile, meta.row_start, meta.row_end):
      rows = np.arange(t * tm, (t + 1) * tm)
      covered[rows[(rows >= lo) & (rows < hi)]] += 1
    if builder is groups.gmm_metadata:
      assert np.all(covered == 1)  # every output row written exactly once
    else:
      window = np.zeros(m_padded, int)
      window[int(starts[0]):int(ends[-1])] = 1
      np.testing.assert_array_equal(covered, window)
      assert set(meta.group) == set(range(5))  # empty groups visited too


def test_bad_shapes_raise_clear_errors():
  lhs = jnp.zeros((8, 4))
  with pytest.raises(ValueError, match="contracting dims differ"):
    gmm(lhs, jnp.zeros((2, 5, 3)), jnp.array([4, 4]), backend="xla")
  with pytest.raises(ValueError, match="pass group_offset"):
    gmm(lhs, jnp.zeros((2, 4, 3)), jnp.array([4, 2, 2]), backend="xla")
  with pytest.raises(ValueError, match="backend must be one of"):
    gmm(lhs, jnp.zeros((2, 4, 3)), jnp.array([4, 4]), backend="cuda")
  bf16 = jnp.zeros((8, 4), jnp.bfloat16)
  with pytest.raises(ValueError, match="wgs 1 or 2"):
    gmm(bf16, jnp.zeros((2, 4, 3), jnp.bfloat16), jnp.array([4, 4]),
        **dict(BACKENDS["gpu"], tiling=(64, 64, 32, 3)))
