"""Every TPU kernel configuration we ship lowers for TPU (Mosaic's block-shape
and layout rules), and every GPU one for sm_90 (Mosaic GPU's layout and
shared-memory limits), checked on CPU through jax.export."""
import functools

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.grouped_matmul import gpu, tpu

S = jax.ShapeDtypeStruct


def _lowers(fn, *args, platform="tpu"):
  exported = jax.export.export(jax.jit(fn), platforms=[platform])(*args)
  marker = "tpu_custom_call" if platform == "tpu" else "mosaic_gpu"
  assert marker in exported.mlir_module()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("m,k,n,groups", [
    (16384, 7168, 2048, 48),   # K2 gate/up projection, 48 local experts
    (16384, 2048, 7168, 384),  # K2 down projection, all experts
    (1000, 300, 500, 5),       # nothing divides the default tiles
])
def test_tpu_kernels_lower(dtype, m, k, n, groups):
  sizes = S((2 * groups,), jnp.int32)
  offset = jnp.int32(groups)
  for transpose_rhs in (False, True):
    rhs = S((groups, n, k) if transpose_rhs else (groups, k, n), dtype)
    _lowers(functools.partial(tpu.gmm, transpose_rhs=transpose_rhs,
                              group_offset=offset),
            S((m, k), dtype), rhs, sizes)
  _lowers(lambda x, y, s: tpu.tgmm(x, y, s, groups, group_offset=offset),
          S((m, k), dtype), S((m, n), dtype), sizes)


def test_tpu_small_test_tiling_lowers():
  sizes = S((4,), jnp.int32)
  _lowers(functools.partial(tpu.gmm, tiling=(16, 128, 128)),
          S((45, 136), jnp.bfloat16), S((4, 136, 140), jnp.bfloat16), sizes)
  _lowers(lambda x, y, s: tpu.tgmm(x, y, s, 4, tiling=(8, 128, 128)),
          S((45, 136), jnp.float32), S((45, 140), jnp.float32), sizes)


@pytest.mark.parametrize("tiling", [None, gpu.WS_TILING])
@pytest.mark.parametrize("m,k,n,groups", [
    (16384, 7168, 2048, 48),   # K2 gate/up projection, 48 local experts
    (16384, 2048, 7168, 384),  # K2 down projection, all experts
])
def test_gpu_kernels_lower_for_sm90(tiling, m, k, n, groups):
  dtype = jnp.bfloat16
  sizes = S((2 * groups,), jnp.int32)
  offset = jnp.int32(groups)
  lower = functools.partial(_lowers, platform="cuda")
  for transpose_rhs in (False, True):
    rhs = S((groups, n, k) if transpose_rhs else (groups, k, n), dtype)
    lower(functools.partial(gpu.gmm, transpose_rhs=transpose_rhs,
                            group_offset=offset, tiling=tiling),
          S((m, k), dtype), rhs, sizes)
  lower(lambda x, y, s: gpu.tgmm(x, y, s, groups, group_offset=offset,
                                 tiling=tiling),
        S((m, k), dtype), S((m, n), dtype), sizes)
