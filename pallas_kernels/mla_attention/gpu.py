"""MLA flash attention for GPU (Pallas Mosaic GPU, sm_90): forward with lse and row maxima, backward.

By default one warpgroup per CTA works on a 64-row tile; K/V (or Q/dO in the dk/dv kernel) stream through
SMEM with a TMA pipeline (`plgpu.emit_pipeline`) and every product is a wgmma into fp32 registers. With
`consumers=2` every kernel is warp-specialised (`pipelined`): a producer warpgroup issues the TMA loads and
two consumer warpgroups each own one row tile of the CTA, so one's softmax overlaps the other's wgmma.
Probabilities and logit gradients are staged through SMEM as wgmma A operands (the Mosaic GPU interpreter,
which the CPU tests use, runs SMEM operands only). Tensors keep the public layout [b, s, h, d]: TMA reads
strided [rows, d] tiles of one head directly. The logits are q_nope k_nope^T + q_rope k_rope^T with the
shared k_rope [b, s, dr] read once per tile (never broadcast over heads); dk_rope is produced per head and
summed over heads outside the kernel.
The softmax runs in base 2 (exp2) with the scale folded into the logits. Inputs must be bf16 or f16.
"""
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mla_attention import common

BLOCK_Q = 64
BLOCK_K = 128
# Warp-specialised forward (consumers=2): 64 rows per consumer, 64-key blocks, 3 stages at K2 dims.
# It passes the interpret-mode tests and lowers for sm_90 but has not been timed on hardware;
# bench_mla_attention.py times it beside the one-warpgroup default.
WS_BLOCKS = (64, 64)
SMEM_BYTES = 227 * 1024
DQ_BLOCKS = (64, 64)  # (query rows, key rows) of the dq kernel
DKV_BLOCKS = (64, 64)  # (query rows, key rows) of the dk/dv kernel
MAX_CONCURRENT_STEPS = 2
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
ROWS = plgpu.Layout.WGMMA.reduce(1)  # a vector along the rows of a wgmma tile
COLS = plgpu.Layout.WGMMA.reduce(0)  # a vector along the columns


def interpret_arg(interpret):
  return plgpu.InterpretGPUParams() if interpret else None


def transforms(minor, dtype):
  """SMEM tiling + swizzle for a tile whose minor dimension holds `minor` elements of `dtype`."""
  itemsize = jnp.dtype(dtype).itemsize
  swizzle = plgpu.find_swizzle(minor * itemsize * 8)
  return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def check_dtypes(*arrays):
  for x in arrays:
    if jnp.dtype(x.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
      raise NotImplementedError(
          f"the gpu backend takes bf16 or f16 inputs (wgmma), got {x.dtype}; use backend='xla'")


def tile_spec(block, index_map, dtype):
  return plgpu.BlockSpec(block, index_map, transforms=transforms(block[-1], dtype))


def wgmma_tile(acc_shape, *pairs):
  """sum_i a_i @ b_i into a fresh fp32 accumulator."""
  def body(acc_ref):
    for a, b in pairs:
      plgpu.wgmma(acc_ref, a, b)
    return acc_ref[...]
  return pl.run_scoped(body, plgpu.ACC(acc_shape, jnp.float32))


def stage(smem, value):
  """Stores a register tile into SMEM so that it can be a wgmma operand."""
  smem[...] = value.astype(smem.dtype)
  plgpu.commit_smem()
  return smem


def valid_tile(shape, row0, col0, causal, row_seg, col_seg, rows_are_queries):
  """Boolean validity of a [rows, cols] tile of (query, key) pairs, or None if all are valid."""
  valid = None
  if causal:
    r = row0 + plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
    c = col0 + plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
    valid = (c <= r) if rows_are_queries else (r <= c)
  if row_seg is not None:
    rs = lax.broadcast_in_dim(row_seg, shape, [0])
    cs = lax.broadcast_in_dim(col_seg, shape, [1])
    same = (rs == cs) & ((rs if rows_are_queries else cs) != 0)
    valid = same if valid is None else valid & same
  return valid


def check_consumers(consumers, what):
  if consumers not in (1, 2):
    raise ValueError(f"gpu {what} consumers must be 1 or 2, got {consumers}")


def run_kernel(body, out_type, grid, grid_names, interpret, *args, consumers=1):
  """plgpu.kernel over `grid`; with 2 consumers, three warpgroups per CTA named "wg" (the last loads)."""
  extra = {} if consumers == 1 else dict(num_threads=consumers + 1, thread_name="wg")
  return plgpu.kernel(body, out_type=out_type, grid=grid, grid_names=grid_names,
                      compiler_params=plgpu.CompilerParams(approx_math=True),
                      interpret=interpret_arg(interpret), **extra)(*args)


def key_blocks(seg_g, kn_g, kr_g, v_g, bi, hi, block_k):
  """Block specs and operands streaming block_k keys of (batch bi, head hi): k_nope, the shared
  k_rope, v, and the key segment ids when seg_g is not None."""
  dtype = kn_g.dtype
  in_specs = [tile_spec((block_k, kn_g.shape[-1]), lambda j: (j, 0), dtype),
              tile_spec((block_k, kr_g.shape[-1]), lambda j: (j, 0), dtype),
              tile_spec((block_k, v_g.shape[-1]), lambda j: (j, 0), dtype)]
  operands = [kn_g.at[bi, :, hi], kr_g.at[bi], v_g.at[bi, :, hi]]
  if seg_g is not None:
    in_specs.append(plgpu.BlockSpec((block_k,), lambda j: (j,)))
    operands.append(seg_g.at[bi])
  return in_specs, operands


def load_tiles(copies, barrier):
  """Copies each (gmem source, smem destination) pair with TMA, one after the other."""
  for src, dst in copies:
    plgpu.copy_gmem_to_smem(src, dst, barrier)
    plgpu.barrier_wait(barrier)


def query_tile_logits(qn_s, qr_s, kn_s, kr_s, segq_s, segk_s, q0, k0, *, scale2, causal):
  """Base-2 logits [rows, keys] of the query rows [q0, ...) against the key block [k0, ...):
  q_nope k_nope^T + q_rope k_rope^T, times scale2, MASK_VALUE where causality or segments forbid.
  segq_s / segk_s: the blocks' segment ids in SMEM, or None without segments."""
  shape = (qn_s.shape[0], kn_s.shape[0])
  t = wgmma_tile(shape, (qn_s, kn_s.T), (qr_s, kr_s.T)) * scale2
  seg_q = None if segq_s is None else plgpu.load(segq_s, layout=ROWS)
  seg_k = None if segk_s is None else plgpu.load(segk_s, layout=COLS)
  valid = valid_tile(shape, q0, k0, causal, seg_q, seg_k, True)
  return t if valid is None else jnp.where(valid, t, common.MASK_VALUE)


def _online_softmax_step(t, carry, p_s, v_s):
  """One key block of the flash forward: t [rows, block_k] masked base-2 logits -> new (acc, m, l)."""
  acc, m, l = carry
  m_new = jnp.maximum(m, t.max(axis=1))
  alpha = jnp.exp2(m - m_new)
  p = jnp.exp2(t - lax.broadcast_in_dim(m_new, t.shape, [0]))
  l = l * alpha + p.sum(axis=1)
  pv = wgmma_tile(acc.shape, (stage(p_s, p), v_s))
  return acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv, m_new, l


def _initial_carry(rows, dv):
  return (plgpu.layout_cast(jnp.zeros((rows, dv), jnp.float32), plgpu.Layout.WGMMA),
          plgpu.layout_cast(jnp.full((rows,), common.MASK_VALUE, jnp.float32), ROWS),
          plgpu.layout_cast(jnp.zeros((rows,), jnp.float32), ROWS))


def _write_rows(carry, o_s, stat_s, o_g, lse_g, rmax_g, bi, hi, rows):
  """The normalised o, the natural-log lse and the row maxima of the final carry, through SMEM to GMEM."""
  acc, m, l = carry
  has_key = m > 0.5 * common.MASK_VALUE
  safe_l = jnp.where(has_key, l, 1.0)
  o = acc / lax.broadcast_in_dim(safe_l, acc.shape, [0])
  o_s[...] = jnp.where(lax.broadcast_in_dim(has_key, acc.shape, [0]), o, 0.0).astype(o_s.dtype)
  stat_s[0] = jnp.where(has_key, (m + jnp.log2(safe_l)) * LN2, 0.0)
  stat_s[1] = jnp.where(has_key, m * LN2, common.MASK_VALUE)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(o_s, o_g.at[bi, rows, hi])
  plgpu.copy_smem_to_gmem(stat_s.at[0], lse_g.at[bi, hi, rows])
  plgpu.copy_smem_to_gmem(stat_s.at[1], rmax_g.at[bi, hi, rows])
  plgpu.wait_smem_to_gmem(0)


def consumer_index(consumers):
  """This warpgroup's consumer index (0 without warp specialisation)."""
  return 0 if consumers == 1 else lax.axis_index("wg")


def per_consumer(consumers, shape, dtype, swizzled=True):
  """An SMEM buffer with one [*shape] slice per consumer warpgroup."""
  return plgpu.SMEM((consumers, *shape), dtype,
                    transforms=transforms(shape[-1], dtype) if swizzled else ())


def scoped_per_consumer(fn, consumers, *buffers):
  """pl.run_scoped over buffers shared by every warpgroup of the CTA."""
  return pl.run_scoped(fn, *buffers, **({} if consumers == 1 else dict(collective_axes="wg")))


def pipelined(step, consumer, *, in_specs, operands, steps, consumers, fixed_bytes, what):
  """Streams `operands` block by block through `step(idx, *blocks, carry) -> carry`.

  consumer(run) runs in every consumer warpgroup: it loads its own tiles, calls run(init_carry) for the
  final carry and writes its results. consumers = 1: one warpgroup loads and computes (a TMA pipeline,
  MAX_CONCURRENT_STEPS stages). consumers = 2: warp-specialised, a producer warpgroup issues the TMA
  loads for two consumers; as many stages as fit in SMEM next to `fixed_bytes` (at most 4).
  """
  if consumers == 1:
    return consumer(lambda init: plgpu.emit_pipeline(
        step, grid=(steps,), in_specs=in_specs, max_concurrent_steps=MAX_CONCURRENT_STEPS,
        init_carry=init)(*operands))
  stage_bytes = sum(math.prod(spec.block_shape) * op.dtype.itemsize
                    for spec, op in zip(in_specs, operands))
  depth = min(4, (SMEM_BYTES - fixed_bytes - 2048) // stage_bytes)
  if depth < 2:
    raise ValueError(f"gpu {what}: {consumers} consumers leave room for {depth} pipeline stages in "
                     f"shared memory; need 2 (use smaller blocks)")
  plgpu.emit_pipeline_warp_specialized(
      step, grid=(steps,), memory_registers=40, in_specs=in_specs, wg_axis="wg",
      num_compute_wgs=consumers, max_concurrent_steps=depth, compute_context=consumer)(*operands)


def _forward(qn, qr, kn, kr, v, seg, *, sm_scale, causal, block_q, block_k, consumers, interpret):
  """consumers = 1: one warpgroup per CTA loads and computes a block_q-row tile. consumers = 2:
  warp-specialised, a producer warpgroup streams the key blocks for two consumer warpgroups that
  each own block_q rows of a 2 * block_q-row tile (their softmax overlaps the other's wgmma)."""
  b, s, h, dn = qn.shape
  dr, dv = qr.shape[-1], v.shape[-1]
  dtype = qn.dtype
  scale2 = sm_scale * LOG2E
  num_k = s // block_k
  has_seg = seg is not None
  cta_q = consumers * block_q
  itemsize = jnp.dtype(dtype).itemsize

  def body(*refs):
    seg_g, *refs = refs if has_seg else (None, *refs)
    qn_g, qr_g, kn_g, kr_g, v_g, o_g, lse_g, rmax_g = refs
    bi, hi, qi = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q")
    steps = lax.div(qi * cta_q + cta_q + block_k - 1, block_k) if causal else num_k
    in_specs, operands = key_blocks(seg_g, kn_g, kr_g, v_g, bi, hi, block_k)

    def scoped(qn_s, qr_s, o_s, p_s, segq_s, stat_s, barrier):
      wg = consumer_index(consumers)
      q0 = qi * cta_q + wg * block_q
      rows = pl.ds(q0, block_q)
      qn_s, qr_s, o_s, p_s, segq_s, stat_s = (
          x.at[wg] for x in (qn_s, qr_s, o_s, p_s, segq_s, stat_s))

      def step(idx, kn_s, kr_s, v_s, *rest):
        *segk, carry = rest
        t = query_tile_logits(qn_s, qr_s, kn_s, kr_s, segq_s if has_seg else None,
                              segk[0] if has_seg else None, q0, idx[0] * block_k, scale2=scale2,
                              causal=causal)
        return _online_softmax_step(t, carry, p_s, v_s)

      def consumer(run_pipeline):
        copies = [(qn_g.at[bi, rows, hi], qn_s), (qr_g.at[bi, rows, hi], qr_s)]
        if has_seg:
          copies.append((seg_g.at[bi, rows], segq_s))
        load_tiles(copies, barrier.at[wg])
        carry = run_pipeline(_initial_carry(block_q, dv))
        _write_rows(carry, o_s, stat_s, o_g, lse_g, rmax_g, bi, hi, rows)

      pipelined(step, consumer,
                in_specs=in_specs, operands=operands, steps=steps, consumers=consumers,
                fixed_bytes=consumers * (block_q * (dn + dr + dv + block_k) * itemsize
                                         + 3 * block_q * 4),
                what=f"forward (block_q={block_q}, block_k={block_k})")

    scoped_per_consumer(scoped, consumers,
                        per_consumer(consumers, (block_q, dn), dtype),
                        per_consumer(consumers, (block_q, dr), dtype),
                        per_consumer(consumers, (block_q, dv), dtype),
                        per_consumer(consumers, (block_q, block_k), dtype),
                        per_consumer(consumers, (block_q,), jnp.int32, swizzled=False),
                        per_consumer(consumers, (2, block_q), jnp.float32, swizzled=False),
                        plgpu.Barrier(num_arrivals=1, num_barriers=consumers))

  out_type = (jax.ShapeDtypeStruct((b, s, h, dv), dtype),
              jax.ShapeDtypeStruct((b, h, s), jnp.float32),
              jax.ShapeDtypeStruct((b, h, s), jnp.float32))
  args = ([seg] if has_seg else []) + [qn, qr, kn, kr, v]
  return run_kernel(body, out_type, (b, h, s // cta_q), ("batch", "heads", "q"), interpret, *args,
                    consumers=consumers)


def prepare(q_nope, q_rope, k_nope, k_rope, v, segment_ids, *blocks):
  """Pads the sequence to a multiple of every block (all are powers of two, multiples of 64)."""
  for block in blocks:
    if block % 64 or block & (block - 1):
      raise ValueError(f"gpu attention blocks must be powers of two and multiples of 64, got {block}")
  b, s = q_nope.shape[:2]
  padded = common.round_up(s, max(blocks))
  pad = lambda x: common.pad_seq(x, padded, axis=1)
  seg = common.padded_segment_ids(segment_ids, b, s, padded)
  return padded, [pad(x) for x in (q_nope, q_rope, k_nope, k_rope, v)], seg


def attention_forward(q_nope, q_rope, k_nope, k_rope, v, segment_ids, *, sm_scale, causal,
                      interpret=False, block_q=None, block_k=None, consumers=1):
  """Flash forward. Shapes as in `mla_attention`; returns (o [b,s,h,dv], lse [b,h,s], max_logits [h]).

  consumers=2 runs the warp-specialised kernel (block_q rows per consumer warpgroup). Blocks default
  to (BLOCK_Q, BLOCK_K), or WS_BLOCKS when warp-specialised.
  """
  check_dtypes(q_nope, q_rope, k_nope, k_rope, v)
  check_consumers(consumers, "forward")
  default_q, default_k = WS_BLOCKS if consumers == 2 else (BLOCK_Q, BLOCK_K)
  block_q, block_k = block_q or default_q, block_k or default_k
  s = q_nope.shape[1]
  _, padded_args, seg = prepare(q_nope, q_rope, k_nope, k_rope, v, segment_ids,
                                 consumers * block_q, block_k)
  o, lse, row_max = _forward(*padded_args, seg, sm_scale=sm_scale, causal=causal, block_q=block_q,
                             block_k=block_k, consumers=consumers, interpret=interpret)
  return o[:, :s], lse[:, :, :s], common.finalize_max_logits(row_max[:, :, :s])
