"""Mosaic GPU (sm_90, H100/H800) kernels: gmm and tgmm with wgmma and TMA.

Persistent kernels: one CTA per SM loops (`plgpu.nd_loop`) over its share of
the work; group metadata is computed outside the kernel (`groups.py`) and read
as scalars from GMEM, so nothing unrolls over groups in Python.

gmm: work = (item, n-tile); an item is an overlapping (group, m-tile) pair.
The k loop is a TMA/wgmma pipeline (`plgpu.emit_pipeline`) into a register
accumulator; the epilogue stores only the item's rows of the tile, as a
ladder of power-of-two TMA row stores, so items sharing a tile never race.
Rows outside the local window are items with compute=0: they store zeros.

tgmm: work = (local group, k-tile, n-tile) of the [num_local, k, n] output;
the pipeline walks the group's m-tiles and masks the rows of the first and
last tile that belong to other groups. Empty groups store zeros.

Warp-specialised variant (tiling = (tm, tk, tn, 2)): a producer warpgroup
issues the TMA loads and two consumer warpgroups each own one tn-column half
of a (tm, 2 tn) CTA tile (`plgpu.emit_pipeline_warp_specialized`, as in
jax's Hopper matmul example); the epilogue's TMA stores overlap the next
tile's main loop. tgmm splits its (tk, 2 tn) output tile the same way and
masks the foreign rows of each consumer's own rhs columns.

m, k and n are zero-padded to the tile sizes internally.
"""
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.grouped_matmul import groups as groups_lib
from pallas_kernels.grouped_matmul import reference

# (tm, tk, tn), from a sweep on H100 at K2 shapes (bench_grouped_matmul.py).
DEFAULT_TILING = (128, 64, 128)
DEFAULT_TGMM_TILING = (64, 128, 128)
# Warp-specialised candidate for gmm and tgmm (CTA tile 128 x 256, three
# pipeline stages). It passes the interpret-mode tests and lowers for sm_90
# at K2 shapes, but has not been timed on hardware: bench_grouped_matmul.py
# times it beside the defaults, which stay until it is measured faster.
WS_TILING = (128, 64, 128, 2)
MAX_CONCURRENT_STEPS = 4
SMEM_BYTES = 227 * 1024  # usable shared memory per CTA on H100


def _pipeline_depth(step_bytes: int, epilogue_bytes: int) -> int:
  """Pipeline stages that fit in shared memory next to the epilogue tile."""
  depth = min(MAX_CONCURRENT_STEPS,
              (SMEM_BYTES - epilogue_bytes - 1024) // step_bytes)
  if depth < 2:
    raise ValueError(
        f"GPU tiles too large: {step_bytes} B per pipeline step and "
        f"{epilogue_bytes} B of epilogue do not fit twice in shared memory")
  return depth


def _num_sms() -> int:
  device = jax.devices()[0]
  return getattr(device, "core_count", None) or 132


def _transforms(block_minor: int, dtype):
  swizzle = plgpu.find_swizzle(block_minor * jnp.dtype(dtype).itemsize * 8)
  return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
          plgpu.SwizzleTransform(swizzle))


def _check_dtypes(*arrays):
  for x in arrays:
    if jnp.dtype(x.dtype).itemsize != 2:
      raise NotImplementedError(
          f"GPU grouped matmul takes 16-bit inputs (bf16/f16), got "
          f"{jnp.dtype(x.dtype).name}: sm_90 wgmma has no transposed tf32 "
          f"operands; use backend='xla' for f32")


def _interpret_arg(interpret):
  if interpret is True:
    return plgpu.InterpretGPUParams()
  return interpret or None


def _parse_tiling(tiling, default):
  """(tm, tk, tn) or (tm, tk, tn, consumer_wgs) -> (tm, tk, tn, wgs).

  wgs = 1: one warpgroup loads and computes; 2: warp-specialised (one
  producer and two consumer warpgroups, each owning tn output columns).
  """
  tm, tk, tn, *rest = tiling or default
  wgs = rest[0] if rest else 1
  if len(rest) > 1 or wgs not in (1, 2):
    raise ValueError(f"GPU tiling must be (tm, tk, tn) or (tm, tk, tn, wgs) "
                     f"with wgs 1 or 2, got {tiling}")
  return tm, tk, tn, wgs


def _run_kernel(body, out_type, interpret, *args, wgs=1):
  interpret = _interpret_arg(interpret)
  num_sms = 2 if interpret else _num_sms()
  threads = {} if wgs == 1 else dict(num_threads=wgs + 1, thread_name="wg")
  return plgpu.kernel(
      body,
      out_type=out_type,
      grid=(num_sms,),
      grid_names=("sm",),
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=interpret,
      **threads,
  )(*args)


def _ws_pipeline(in_specs, grid, wgs, depth):
  """Returns make(body, compute_context) -> a warp-specialised pipeline."""
  return lambda body, context: plgpu.emit_pipeline_warp_specialized(
      body, grid=grid, memory_registers=40, in_specs=in_specs, wg_axis="wg",
      num_compute_wgs=wgs, max_concurrent_steps=depth,
      compute_context=context)


def _ignore(*_, **__):
  return None


def _accumulating_consumer(acc_shape, finish):
  """compute_context of a warp-specialised pipeline whose carry is an fp32
  accumulator: runs the pipeline into a fresh one, then finish(its value)."""
  def consumer(run_pipeline):
    def scope(acc_ref):
      run_pipeline(acc_ref)
      return acc_ref[...]
    finish(pl.run_scoped(scope, plgpu.ACC(acc_shape, jnp.float32)))
  return consumer


def _issue_row_stores(acc, o_smem, out_gmem, row0, size, tile_row0, col0):
  """Writes acc [tm, tn] to o_smem and issues the TMA stores of its rows
  [row0, row0 + size) (global rows; the tile starts at tile_row0).

  TMA boxes have static shapes, so the dynamic row count is written as a
  ladder of power-of-two row stores (0 < size <= tm). Does not wait.
  """
  tm, tn = o_smem.shape
  o_smem[...] = acc.astype(o_smem.dtype)
  plgpu.commit_smem()
  offset = row0 - tile_row0
  for p in (1 << e for e in reversed(range(int(math.log2(tm)) + 1))):
    @pl.when(size & p != 0)
    def _():
      plgpu.copy_smem_to_gmem(
          o_smem.at[pl.ds(offset, p)],
          out_gmem.at[pl.ds(tile_row0 + offset, p), pl.ds(col0, tn)])
    offset = offset + (size & p)


def _store_rows(acc, out_gmem, row0, size, tile_row0, col0, tm, tn):
  """_issue_row_stores from a scoped SMEM tile, waiting for the stores."""
  @functools.partial(pl.run_scoped,
                     o_smem=plgpu.SMEM((tm, tn), out_gmem.dtype))
  def _(o_smem):
    _issue_row_stores(acc, o_smem, out_gmem, row0, size, tile_row0, col0)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def gmm(lhs, rhs, group_sizes, *, transpose_rhs=False, group_offset=None,
        preferred_element_type=None, interpret=None, tiling=None):
  """lhs [m, k] x rhs [num_local, k, n] (or [num_local, n, k]) -> [m, n].

  Semantics of `reference.gmm_reference`; tiling = (tm, tk, tn[, wgs]) with
  tm a multiple of 64 and a power of two, tn a multiple of 8 (the CTA tile
  is tm x wgs * tn). bf16/f16 only.
  """
  m, k, n, num_local = groups_lib.check_args(
      lhs, rhs, group_sizes, group_offset, transpose_rhs)
  _check_dtypes(lhs, rhs)
  out_dtype = reference.result_dtype(preferred_element_type, lhs, rhs)
  tm, tk, tn, wgs = _parse_tiling(tiling, DEFAULT_TILING)
  cta_tn = wgs * tn
  mp, kp, np_ = (groups_lib.round_up(m, tm), groups_lib.round_up(k, tk),
                 groups_lib.round_up(n, cta_tn))
  lhs = groups_lib.pad_to(lhs, (mp, kp))
  rhs = groups_lib.pad_to(
      rhs, (num_local, np_, kp) if transpose_rhs else (num_local, kp, np_))
  starts, ends = groups_lib.window_bounds(group_sizes, group_offset,
                                          num_local, m)
  meta = groups_lib.gmm_metadata(starts, ends, mp, tm)
  num_items, grid_n, grid_k = meta.group.shape[0], np_ // cta_tn, kp // tk
  in_transforms = _transforms(tk, lhs.dtype)
  rhs_block = (cta_tn, tk) if transpose_rhs else (tk, cta_tn)
  rhs_transforms = _transforms(tk if transpose_rhs else tn, rhs.dtype)
  depth = _pipeline_depth((tm * tk + tk * cta_tn) * lhs.dtype.itemsize,
                          wgs * tm * tn * jnp.dtype(out_dtype).itemsize)

  def item_rows(tile_ref, start_ref, end_ref, i):
    """Item i's tile start row and its rows [row0, row0 + size) inside that tile."""
    tile_row0 = tile_ref[i] * tm
    row0 = jnp.maximum(start_ref[i], tile_row0)
    return tile_row0, row0, jnp.minimum(end_ref[i], tile_row0 + tm) - row0

  def wg_columns(rhs_smem, wg):
    """The tn columns of the rhs block that consumer `wg` multiplies."""
    if transpose_rhs:
      return rhs_smem.at[pl.ds(wg * tn, tn)].T
    return rhs_smem.at[:, pl.ds(wg * tn, tn)]

  def body(group_ref, tile_ref, start_ref, end_ref, compute_ref, lhs_gmem,
           rhs_gmem, out_gmem):
    @plgpu.nd_loop((num_items, grid_n), collective_axes="sm")
    def _(loop_info):
      i, ni = loop_info.index
      tile_row0, row0, size = item_rows(tile_ref, start_ref, end_ref, i)

      def matmul(acc_ref):
        def step(_, lhs_smem, rhs_smem):
          plgpu.wgmma(acc_ref, lhs_smem,
                      rhs_smem.T if transpose_rhs else rhs_smem)

        @pl.when(compute_ref[i] == 1)
        def _():
          plgpu.emit_pipeline(
              step,
              grid=(grid_k,),
              in_specs=[
                  plgpu.BlockSpec((tm, tk), lambda kk: (tile_ref[i], kk),
                                  transforms=in_transforms, delay_release=1),
                  plgpu.BlockSpec(
                      rhs_block,
                      (lambda kk: (ni, kk)) if transpose_rhs else
                      (lambda kk: (kk, ni)),
                      transforms=rhs_transforms, delay_release=1),
              ],
              max_concurrent_steps=depth,
          )(lhs_gmem, rhs_gmem.at[group_ref[i]])
        return acc_ref[...]

      @pl.when(size > 0)
      def _():
        acc = pl.run_scoped(matmul, plgpu.ACC((tm, tn), jnp.float32))
        _store_rows(acc, out_gmem, row0, size, tile_row0, ni * tn, tm, tn)

  def ws_body(group_ref, tile_ref, start_ref, end_ref, compute_ref, lhs_gmem,
              rhs_gmem, out_gmem):
    pipeline = _ws_pipeline(
        [plgpu.BlockSpec((tm, tk), lambda kk: (0, kk), transforms=in_transforms),
         plgpu.BlockSpec(rhs_block,
                         (lambda kk: (0, kk)) if transpose_rhs else
                         (lambda kk: (kk, 0)),
                         transforms=rhs_transforms)],
        (grid_k,), wgs, depth)
    # Block views: the pipeline's allocations only depend on their shapes.
    lhs_view = lambda row0: lhs_gmem.at[pl.ds(row0, tm)]
    rhs_view = lambda g, ni: (rhs_gmem.at[g, pl.ds(ni * cta_tn, cta_tn)]
                              if transpose_rhs else
                              rhs_gmem.at[g, :, pl.ds(ni * cta_tn, cta_tn)])

    @functools.partial(
        pl.run_scoped,
        allocations=pipeline(_ignore, _ignore).get_allocations(
            lhs_view(0), rhs_view(0, 0)),
        o_smem=plgpu.SMEM((wgs, tm, tn), out_dtype),
        collective_axes="wg")
    def _(allocations, o_smem):
      wg = lax.axis_index("wg")

      @plgpu.nd_loop((num_items, grid_n), collective_axes="sm")
      def _(loop_info):
        i, ni = loop_info.index
        tile_row0, row0, size = item_rows(tile_ref, start_ref, end_ref, i)

        def store(acc):
          # The previous item's stores must have read o_smem[wg].
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          _issue_row_stores(acc, o_smem.at[wg], out_gmem, row0, size,
                            tile_row0, ni * cta_tn + wg * tn)

        def step(_, lhs_smem, rhs_smem, acc_ref):
          plgpu.wgmma(acc_ref, lhs_smem, wg_columns(rhs_smem, wg))
          plgpu.wgmma_wait(0)
          return acc_ref

        @pl.when((size > 0) & (compute_ref[i] == 1))
        def _():
          pipeline(step, _accumulating_consumer((tm, tn), store))(
              lhs_view(tile_row0), rhs_view(group_ref[i], ni),
              allocations=allocations)

        @pl.when((size > 0) & (compute_ref[i] == 0) & (wg < wgs))
        def _():
          store(plgpu.layout_cast(jnp.zeros((tm, tn), jnp.float32),
                                  plgpu.Layout.WGMMA))

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  out = _run_kernel(ws_body if wgs > 1 else body,
                    jax.ShapeDtypeStruct((mp, np_), out_dtype),
                    interpret, *meta, lhs, rhs, wgs=wgs)
  return out[:m, :n]


def tgmm(lhs, rhs, group_sizes, num_local: int, *, group_offset=None,
         preferred_element_type=None, interpret=None, tiling=None):
  """lhs [m, k], rhs [m, n] -> [num_local, k, n], per-group lhs^T @ rhs.

  Semantics of `reference.tgmm_reference`; tiling = (tm, tk, tn[, wgs]): tm
  rows per pipeline step, tk a multiple of 64 (the wgmma M of the output
  tile), a CTA computes a (tk, wgs * tn) output tile. bf16/f16 only.
  """
  m, k = lhs.shape
  if rhs.ndim != 2 or rhs.shape[0] != m:
    raise ValueError(f"tgmm rhs must be [m={m}, n], got {rhs.shape}")
  n = rhs.shape[1]
  _check_dtypes(lhs, rhs)
  out_dtype = reference.result_dtype(preferred_element_type, lhs, rhs)
  tm, tk, tn, wgs = _parse_tiling(tiling, DEFAULT_TGMM_TILING)
  if tk % 64:
    raise ValueError(f"GPU tgmm tk={tk} must be a multiple of 64 (wgmma M)")
  cta_tn = wgs * tn
  mp, kp, np_ = (groups_lib.round_up(m, tm), groups_lib.round_up(k, tk),
                 groups_lib.round_up(n, cta_tn))
  lhs = groups_lib.pad_to(lhs, (mp, kp))
  rhs = groups_lib.pad_to(rhs, (mp, np_))
  starts, ends = groups_lib.window_bounds(group_sizes, group_offset,
                                          num_local, m)
  first_tile = starts // tm
  num_tiles = jnp.where(ends > starts, (ends - 1) // tm - first_tile + 1, 0)
  grid_k, grid_n = kp // tk, np_ // cta_tn
  lhs_transforms = _transforms(tk, lhs.dtype)
  rhs_transforms = _transforms(tn, rhs.dtype)
  out_transforms = _transforms(tn, out_dtype)
  depth = _pipeline_depth((tm * tk + tm * cta_tn) * lhs.dtype.itemsize,
                          wgs * tk * tn * jnp.dtype(out_dtype).itemsize)

  def row_mask(j, first, start, end, shape, dtype):
    """1 for the rows of tile first + j inside [start, end), else 0."""
    rows = (first + j) * tm + plgpu.layout_cast(
        lax.broadcasted_iota(jnp.int32, shape, 0), plgpu.Layout.WGMMA)
    return ((rows >= start) & (rows < end)).astype(dtype)

  def store(acc, o_smem, out_gmem, g, ki, col0):
    o_smem[...] = acc.astype(out_dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(
        o_smem, out_gmem.at[g, pl.ds(ki * tk, tk), pl.ds(col0, tn)])

  def body(start_ref, end_ref, first_ref, count_ref, lhs_gmem, rhs_gmem,
           out_gmem):
    @plgpu.nd_loop((num_local, grid_k, grid_n), collective_axes="sm")
    def _(loop_info):
      g, ki, ni = loop_info.index
      start, end, first, count = (start_ref[g], end_ref[g], first_ref[g],
                                  count_ref[g])

      def matmul(acc_ref):
        def step(idx, lhs_smem, rhs_smem):
          j = idx[0]

          @pl.when((j == 0) | (j == count - 1))
          def _():
            lhs_smem[...] = lhs_smem[...] * row_mask(
                j, first, start, end, (tm, tk), lhs_smem.dtype)
            plgpu.commit_smem()

          plgpu.wgmma(acc_ref, lhs_smem.T, rhs_smem)

        @pl.when(count > 0)
        def _():
          plgpu.emit_pipeline(
              step,
              grid=(count,),
              in_specs=[
                  plgpu.BlockSpec((tm, tk), lambda j: (first + j, ki),
                                  transforms=lhs_transforms, delay_release=1),
                  plgpu.BlockSpec((tm, tn), lambda j: (first + j, ni),
                                  transforms=rhs_transforms, delay_release=1),
              ],
              max_concurrent_steps=depth,
          )(lhs_gmem, rhs_gmem)
        return acc_ref[...]

      acc = pl.run_scoped(matmul, plgpu.ACC((tk, tn), jnp.float32))

      @functools.partial(pl.run_scoped,
                         o_smem=plgpu.SMEM((tk, tn), out_dtype,
                                           transforms=out_transforms))
      def _(o_smem):
        store(acc, o_smem, out_gmem, g, ki, ni * tn)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  def ws_body(start_ref, end_ref, first_ref, count_ref, lhs_gmem, rhs_gmem,
              out_gmem):
    def pipeline(first, count):
      return _ws_pipeline(
          [plgpu.BlockSpec((tm, tk), lambda j: (first + j, 0),
                           transforms=lhs_transforms),
           plgpu.BlockSpec((tm, cta_tn), lambda j: (first + j, 0),
                           transforms=rhs_transforms)],
          (count,), wgs, depth)
    lhs_view = lambda ki: lhs_gmem.at[:, pl.ds(ki * tk, tk)]
    rhs_view = lambda ni: rhs_gmem.at[:, pl.ds(ni * cta_tn, cta_tn)]

    @functools.partial(
        pl.run_scoped,
        # A static grid of `depth` steps allocates the same buffers as the
        # per-group dynamic grids below.
        allocations=pipeline(0, depth)(_ignore, _ignore).get_allocations(
            lhs_view(0), rhs_view(0)),
        o_smem=plgpu.SMEM((wgs, tk, tn), out_dtype, transforms=out_transforms),
        collective_axes="wg")
    def _(allocations, o_smem):
      wg = lax.axis_index("wg")

      @plgpu.nd_loop((num_local, grid_k, grid_n), collective_axes="sm")
      def _(loop_info):
        g, ki, ni = loop_info.index
        start, end, first, count = (start_ref[g], end_ref[g], first_ref[g],
                                    count_ref[g])

        def finish(acc):
          # The previous tile's store must have read o_smem[wg].
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          store(acc, o_smem.at[wg], out_gmem, g, ki, ni * cta_tn + wg * tn)

        def step(idx, lhs_smem, rhs_smem, acc_ref):
          j = idx[0]
          # Each consumer masks the foreign rows in its own columns only.
          cols = rhs_smem.at[:, pl.ds(wg * tn, tn)]

          @pl.when((j == 0) | (j == count - 1))
          def _():
            cols[...] = cols[...] * row_mask(j, first, start, end, (tm, tn),
                                             cols.dtype)
            plgpu.commit_smem()

          plgpu.wgmma(acc_ref, lhs_smem.T, cols)
          plgpu.wgmma_wait(0)
          return acc_ref

        @pl.when(count > 0)
        def _():
          consumer = _accumulating_consumer((tk, tn), finish)
          pipeline(first, count)(step, consumer)(
              lhs_view(ki), rhs_view(ni), allocations=allocations)

        @pl.when((count == 0) & (wg < wgs))
        def _():
          finish(plgpu.layout_cast(jnp.zeros((tk, tn), jnp.float32),
                                   plgpu.Layout.WGMMA))

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  out = _run_kernel(
      ws_body if wgs > 1 else body,
      jax.ShapeDtypeStruct((num_local, kp, np_), out_dtype), interpret,
      starts, ends, first_tile, num_tiles, lhs, rhs, wgs=wgs)
  return out[:, :k, :n]
