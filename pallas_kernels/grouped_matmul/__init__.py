"""Grouped (ragged) expert matmul with a custom VJP and per-platform kernels.

    gmm(lhs [m, k], rhs [num_local, k, n], group_sizes int32 [num_groups])
      -> [m, n]

Rows of lhs are sorted by group: global group g owns rows
[sum(group_sizes[:g]), sum(group_sizes[:g+1])). rhs holds the weights of the
local window of groups [group_offset, group_offset + num_local) (the whole
group_sizes when group_offset is None, which then requires
num_groups == num_local). Row r of local group l gives lhs[r] @ rhs[l]; rows
of groups outside the window and rows past sum(group_sizes) give zeros, and
get zero gradient. See `groups.py` for the exact rules.

Backends: "xla" (`lax.ragged_dot`), "tpu" (Mosaic TPU kernels), "gpu"
(Mosaic GPU kernels, sm_90, bf16/f16 only), "auto" (tpu on TPU, gpu on an
sm_90 GPU for 16-bit inputs, else xla). `interpret=True` (or an `InterpretParams` / `InterpretGPUParams`
object) runs the chosen kernel in Pallas interpret mode on any platform.
`warp_specialized=True` makes the GPU kernels default to `gpu.WS_TILING` (a producer and two consumer
warpgroups; not yet timed on hardware); it has no effect on the other backends.
"""
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul import gpu
from pallas_kernels.grouped_matmul import groups as groups_lib
from pallas_kernels.grouped_matmul import reference
from pallas_kernels.grouped_matmul import tpu

__all__ = ["gmm", "tgmm"]

_BACKENDS = ("auto", "tpu", "gpu", "xla")


def _resolve_backend(backend: str, dtype) -> str:
  if backend not in _BACKENDS:
    raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
  if backend != "auto":
    return backend
  platform = jax.default_backend()
  if platform == "tpu":
    return "tpu"
  if platform in ("gpu", "cuda"):
    capability = getattr(jax.devices()[0], "compute_capability", "")
    if str(capability) == "9.0" and jnp.dtype(dtype).itemsize == 2:
      return "gpu"
  return "xla"


def _impls(backend: str, interpret, tiling):
  """(gmm_fn, tgmm_fn) with the reference.gmm_xla / tgmm_xla signatures."""
  if backend == "xla":
    return reference.gmm_xla, reference.tgmm_xla
  kernels = tpu if backend == "tpu" else gpu
  kw = dict(interpret=interpret, tiling=tiling)
  return (functools.partial(kernels.gmm, **kw),
          functools.partial(kernels.tgmm, **kw))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _gmm(lhs, rhs, group_sizes, group_offset, transpose_rhs, out_dtype,
         backend, interpret, tiling):
  gmm_fn, _ = _impls(backend, interpret, tiling)
  return gmm_fn(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs,
                group_offset=group_offset, preferred_element_type=out_dtype)


def _gmm_fwd(lhs, rhs, group_sizes, group_offset, transpose_rhs, out_dtype,
             backend, interpret, tiling):
  out = _gmm(lhs, rhs, group_sizes, group_offset, transpose_rhs, out_dtype,
             backend, interpret, tiling)
  return out, (lhs, rhs, group_sizes, group_offset)


def _gmm_bwd(transpose_rhs, out_dtype, backend, interpret, tiling, res, dout):
  lhs, rhs, group_sizes, group_offset = res
  gmm_fn, tgmm_fn = _impls(backend, interpret, tiling)
  dout = dout.astype(lhs.dtype)
  dlhs = gmm_fn(dout, rhs, group_sizes, transpose_rhs=not transpose_rhs,
                group_offset=group_offset, preferred_element_type=lhs.dtype)
  a, b = (dout, lhs) if transpose_rhs else (lhs, dout)
  drhs = tgmm_fn(a, b, group_sizes, rhs.shape[0], group_offset=group_offset,
                 preferred_element_type=rhs.dtype)
  return dlhs, drhs, None, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def _tiling(backend: str, tiling, warp_specialized: bool):
  if tiling is not None:
    return tuple(tiling)
  if backend == "gpu" and warp_specialized:
    return gpu.WS_TILING
  return None


def gmm(lhs, rhs, group_sizes, *, transpose_rhs: bool = False,
        group_offset=None, preferred_element_type=None, backend: str = "auto",
        interpret=None, tiling: tuple[int, ...] | None = None,
        warp_specialized: bool = False):
  """Grouped matmul, differentiable in lhs and rhs.

  Args:
    lhs: [m, k], rows sorted by group.
    rhs: [num_local, k, n], or [num_local, n, k] if transpose_rhs.
    group_sizes: int32 [num_groups], rows per global group.
    transpose_rhs: read rhs as [num_local, n, k].
    group_offset: None, or int32 scalar (may be traced): rhs holds global
      groups [group_offset, group_offset + num_local) of group_sizes.
    preferred_element_type: output dtype (accumulation is always f32);
      None -> the promoted dtype of lhs and rhs.
    backend: "auto" | "tpu" | "gpu" | "xla".
    interpret: None/False for native; True or an interpret-params object runs
      the chosen kernel in Pallas interpret mode.
    tiling: kernel tile sizes (tm, tk, tn), on GPU also (tm, tk, tn, 2) for
      the warp-specialised kernels; None -> per-backend defaults.
    warp_specialized: GPU only, tiling None -> gpu.WS_TILING.

  Returns:
    [m, n]; zero rows outside the local window and past sum(group_sizes).
    The gradient is dlhs = gmm(dout, rhs^T) and drhs = tgmm(lhs, dout), both
    through the same backend; group_sizes and group_offset get no gradient.
  """
  groups_lib.check_args(lhs, rhs, group_sizes, group_offset, transpose_rhs)
  dtype = jnp.result_type(lhs, rhs)
  out_dtype = jnp.dtype(preferred_element_type or dtype)
  if group_offset is not None:
    group_offset = jnp.asarray(group_offset, jnp.int32)
  backend = _resolve_backend(backend, dtype)
  return _gmm(lhs.astype(dtype), rhs.astype(dtype),
              group_sizes.astype(jnp.int32), group_offset, transpose_rhs,
              out_dtype, backend, interpret,
              _tiling(backend, tiling, warp_specialized))


def tgmm(lhs, rhs, group_sizes, num_local: int, *, group_offset=None,
         preferred_element_type=None, backend: str = "auto", interpret=None,
         tiling: tuple[int, ...] | None = None, warp_specialized: bool = False):
  """Per-group lhs^T @ rhs: lhs [m, k], rhs [m, n] -> [num_local, k, n].

  out[l] sums over the rows of local group l (zero for empty groups); the
  group semantics are those of `gmm`. Not differentiable (it is gmm's
  weight gradient).
  """
  dtype = jnp.result_type(lhs, rhs)
  backend = _resolve_backend(backend, dtype)
  _, tgmm_fn = _impls(backend, interpret,
                      _tiling(backend, tiling, warp_specialized))
  return tgmm_fn(lhs.astype(dtype), rhs.astype(dtype),
                 group_sizes.astype(jnp.int32), num_local,
                 group_offset=group_offset,
                 preferred_element_type=preferred_element_type)
