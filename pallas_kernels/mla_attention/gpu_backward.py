"""Mosaic GPU backward kernels of MLA flash attention: dq (per query tile) and dk/dv (per key tile).

`attention_backward` (the entry point) pads the inputs to the blocks; lse2 = lse * log2(e) and
delta = rowsum(o * do) - dlse are fp32 [b, h, s]. With t = logits * log2(e) and p = exp2(t - lse2):
ds = p * (do v^T - delta) * sm_scale, dq = ds k, dk = ds^T q, dv = p^T do. dk_rope is returned per head
(fp32 [b, s, h, dr]) and summed over heads by the caller.
"""
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mla_attention import common
from pallas_kernels.mla_attention.gpu import (COLS, DKV_BLOCKS, DQ_BLOCKS, LOG2E, ROWS,
                                              check_consumers, check_dtypes, consumer_index,
                                              key_blocks, load_tiles, per_consumer, pipelined,
                                              prepare, query_tile_logits, run_kernel,
                                              scoped_per_consumer, stage, tile_spec, valid_tile,
                                              wgmma_tile)


def _zeros(shape):
  return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)


def _dq(qn, qr, kn, kr, v, seg, do, lse2, delta, *, sm_scale, causal, block_q, block_k, consumers,
        interpret):
  b, s, h, dn = qn.shape
  dr, dv = qr.shape[-1], v.shape[-1]
  dtype = qn.dtype
  itemsize = jnp.dtype(dtype).itemsize
  scale2 = sm_scale * LOG2E
  has_seg = seg is not None
  cta_q = consumers * block_q

  def body(*refs):
    seg_g, *refs = refs if has_seg else (None, *refs)
    qn_g, qr_g, kn_g, kr_g, v_g, do_g, lse_g, delta_g, dqn_g, dqr_g = refs
    bi, hi, qi = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q")

    def scoped(qn_s, qr_s, do_s, ds_s, segq_s, stat_s, barrier):
      wg = consumer_index(consumers)
      q0 = qi * cta_q + wg * block_q
      rows = pl.ds(q0, block_q)
      qn_s, qr_s, do_s, ds_s, segq_s, stat_s = (
          x.at[wg] for x in (qn_s, qr_s, do_s, ds_s, segq_s, stat_s))

      def step(idx, kn_s, kr_s, v_s, *rest):
        *segk, (dqn, dqr) = rest
        t = query_tile_logits(qn_s, qr_s, kn_s, kr_s, segq_s if has_seg else None,
                              segk[0] if has_seg else None, q0, idx[0] * block_k, scale2=scale2,
                              causal=causal)
        lse = plgpu.load(stat_s.at[0], layout=ROWS)
        delta = plgpu.load(stat_s.at[1], layout=ROWS)
        p = jnp.exp2(t - lax.broadcast_in_dim(lse, t.shape, [0]))
        dp = wgmma_tile((block_q, block_k), (do_s, v_s.T))
        ds = p * (dp - lax.broadcast_in_dim(delta, t.shape, [0])) * sm_scale
        stage(ds_s, ds)
        return dqn + wgmma_tile(dqn.shape, (ds_s, kn_s)), dqr + wgmma_tile(dqr.shape, (ds_s, kr_s))

      def consumer(run_pipeline):
        copies = [(qn_g.at[bi, rows, hi], qn_s), (qr_g.at[bi, rows, hi], qr_s),
                  (do_g.at[bi, rows, hi], do_s), (lse_g.at[bi, hi, rows], stat_s.at[0]),
                  (delta_g.at[bi, hi, rows], stat_s.at[1])]
        if has_seg:
          copies.append((seg_g.at[bi, rows], segq_s))
        load_tiles(copies, barrier.at[wg])
        dqn, dqr = run_pipeline((_zeros((block_q, dn)), _zeros((block_q, dr))))
        qn_s[...] = dqn.astype(dtype)
        qr_s[...] = dqr.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(qn_s, dqn_g.at[bi, rows, hi])
        plgpu.copy_smem_to_gmem(qr_s, dqr_g.at[bi, rows, hi])
        plgpu.wait_smem_to_gmem(0)

      in_specs, operands = key_blocks(seg_g, kn_g, kr_g, v_g, bi, hi, block_k)
      steps = lax.div(qi * cta_q + cta_q + block_k - 1, block_k) if causal else s // block_k
      pipelined(step, consumer, in_specs=in_specs, operands=operands, steps=steps,
                consumers=consumers,
                fixed_bytes=consumers * (block_q * (dn + dr + dv + block_k) * itemsize
                                         + 3 * block_q * 4),
                what=f"dq (block_q={block_q}, block_k={block_k})")

    scoped_per_consumer(scoped, consumers, per_consumer(consumers, (block_q, dn), dtype),
                        per_consumer(consumers, (block_q, dr), dtype),
                        per_consumer(consumers, (block_q, dv), dtype),
                        per_consumer(consumers, (block_q, block_k), dtype),
                        per_consumer(consumers, (block_q,), jnp.int32, swizzled=False),
                        per_consumer(consumers, (2, block_q), jnp.float32, swizzled=False),
                        plgpu.Barrier(num_arrivals=1, num_barriers=consumers))

  out_type = (jax.ShapeDtypeStruct(qn.shape, dtype), jax.ShapeDtypeStruct(qr.shape, dtype))
  args = ([seg] if has_seg else []) + [qn, qr, kn, kr, v, do, lse2, delta]
  return run_kernel(body, out_type, (b, h, s // cta_q), ("batch", "heads", "q"), interpret, *args,
                    consumers=consumers)


def _dkv(qn, qr, kn, kr, v, seg, do, stats, *, sm_scale, causal, block_q, block_k, consumers,
         interpret):
  """stats fp32 [b, h, 2 or 3, s]: lse2, delta and, with segment ids, the ids as floats (one TMA
  block per query step instead of three)."""
  b, s, h, dn = qn.shape
  dr, dv = qr.shape[-1], v.shape[-1]
  dtype = qn.dtype
  itemsize = jnp.dtype(dtype).itemsize
  scale2 = sm_scale * LOG2E
  has_seg = seg is not None
  num_q = s // block_q
  num_stats = stats.shape[2]
  cta_k = consumers * block_k

  def body(*refs):
    seg_g, *refs = refs if has_seg else (None, *refs)
    qn_g, qr_g, kn_g, kr_g, v_g, do_g, stats_g, dkn_g, dkr_g, dv_g = refs
    bi, hi, ki = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("k")
    # Causal: query blocks before the CTA's first key hold no valid pair.
    first = lax.div(ki * cta_k, block_q) if causal else 0

    def scoped(kn_s, kr_s, v_s, stage_s, segk_s, dkr_s, barrier):
      wg = consumer_index(consumers)
      k0 = ki * cta_k + wg * block_k
      rows = pl.ds(k0, block_k)
      kn_s, kr_s, v_s, stage_s, segk_s, dkr_s = (
          x.at[wg] for x in (kn_s, kr_s, v_s, stage_s, segk_s, dkr_s))

      def step(idx, qn_s, qr_s, do_s, stats_s, carry):
        dkn, dkr, dvv = carry
        i = first + idx[0]
        t = wgmma_tile((block_k, block_q), (kn_s, qn_s.T), (kr_s, qr_s.T)) * scale2
        seg_k = plgpu.load(segk_s, layout=ROWS) if has_seg else None
        seg_q = plgpu.load(stats_s.at[2], layout=COLS).astype(jnp.int32) if has_seg else None
        valid = valid_tile((block_k, block_q), k0, i * block_q, causal, seg_k, seg_q, False)
        if valid is not None:
          t = jnp.where(valid, t, common.MASK_VALUE)
        lse = plgpu.load(stats_s.at[0], layout=COLS)
        delta = plgpu.load(stats_s.at[1], layout=COLS)
        p_t = jnp.exp2(t - lax.broadcast_in_dim(lse, t.shape, [1]))
        dvv = dvv + wgmma_tile(dvv.shape, (stage(stage_s, p_t), do_s))
        dp_t = wgmma_tile((block_k, block_q), (v_s, do_s.T))
        ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta, t.shape, [1])) * sm_scale
        stage(stage_s, ds_t)  # p_t's wgmma has completed: wgmma_tile waits for its accumulator.
        return (dkn + wgmma_tile(dkn.shape, (stage_s, qn_s)),
                dkr + wgmma_tile(dkr.shape, (stage_s, qr_s)), dvv)

      def consumer(run_pipeline):
        copies = [(kn_g.at[bi, rows, hi], kn_s), (kr_g.at[bi, rows], kr_s),
                  (v_g.at[bi, rows, hi], v_s)]
        if has_seg:
          copies.append((seg_g.at[bi, rows], segk_s))
        load_tiles(copies, barrier.at[wg])
        dkn, dkr, dvv = run_pipeline(
            (_zeros((block_k, dn)), _zeros((block_k, dr)), _zeros((block_k, dv))))
        kn_s[...] = dkn.astype(dtype)
        v_s[...] = dvv.astype(dtype)
        dkr_s[...] = dkr
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(kn_s, dkn_g.at[bi, rows, hi])
        plgpu.copy_smem_to_gmem(v_s, dv_g.at[bi, rows, hi])
        plgpu.copy_smem_to_gmem(dkr_s, dkr_g.at[bi, rows, hi])
        plgpu.wait_smem_to_gmem(0)

      index = lambda i: (first + i, 0)
      in_specs = [tile_spec((block_q, dn), index, dtype), tile_spec((block_q, dr), index, dtype),
                  tile_spec((block_q, dv), index, dtype),
                  plgpu.BlockSpec((num_stats, block_q), lambda i: (0, first + i))]
      operands = [qn_g.at[bi, :, hi], qr_g.at[bi, :, hi], do_g.at[bi, :, hi], stats_g.at[bi, hi]]
      pipelined(step, consumer, in_specs=in_specs, operands=operands, steps=num_q - first,
                consumers=consumers,
                fixed_bytes=consumers * (block_k * (dn + dr + dv + block_q) * itemsize
                                         + block_k * (4 + dr * 4)),
                what=f"dk/dv (block_q={block_q}, block_k={block_k})")

    scoped_per_consumer(scoped, consumers, per_consumer(consumers, (block_k, dn), dtype),
                        per_consumer(consumers, (block_k, dr), dtype),
                        per_consumer(consumers, (block_k, dv), dtype),
                        per_consumer(consumers, (block_k, block_q), dtype),
                        per_consumer(consumers, (block_k,), jnp.int32, swizzled=False),
                        per_consumer(consumers, (block_k, dr), jnp.float32),
                        plgpu.Barrier(num_arrivals=1, num_barriers=consumers))

  out_type = (jax.ShapeDtypeStruct(kn.shape, dtype),
              jax.ShapeDtypeStruct((b, s, h, dr), jnp.float32),
              jax.ShapeDtypeStruct(v.shape, dtype))
  args = ([seg] if has_seg else []) + [qn, qr, kn, kr, v, do, stats]
  return run_kernel(body, out_type, (b, h, s // cta_k), ("batch", "heads", "k"), interpret, *args,
                    consumers=consumers)


def backward(qn, qr, kn, kr, v, seg, do, lse2, delta, *, dq_blocks, dkv_blocks, consumers=1, **kw):
  """Returns (dq_nope, dq_rope, dk_nope, dk_rope per head fp32 [b, s, h, dr], dv), all padded.

  dq_blocks / dkv_blocks: (query rows, key rows) per step of each kernel; consumers = 2 runs both
  kernels warp-specialised (the CTA tile is then 2 x the query rows of dq, 2 x the key rows of dk/dv).
  """
  dqn, dqr = _dq(qn, qr, kn, kr, v, seg, do, lse2, delta, block_q=dq_blocks[0],
                 block_k=dq_blocks[1], consumers=consumers, **kw)
  stats = [lse2, delta]
  if seg is not None:
    stats.append(jnp.broadcast_to(seg[:, None, :], lse2.shape).astype(jnp.float32))
  dkn, dkr_heads, dvv = _dkv(qn, qr, kn, kr, v, seg, do, jnp.stack(stats, axis=2),
                             block_q=dkv_blocks[0], block_k=dkv_blocks[1], consumers=consumers, **kw)
  return dqn, dqr, dkn, dkr_heads, dvv


def attention_backward(q_nope, q_rope, k_nope, k_rope, v, segment_ids, o, lse, do, dlse, *, sm_scale,
                       causal, interpret=False, dq_blocks=DQ_BLOCKS, dkv_blocks=DKV_BLOCKS,
                       consumers=1):
  """Flash backward. o/do [b,s,h,dv], lse/dlse [b,h,s]; returns (dq_nope, dq_rope, dk_nope, dk_rope, dv).

  consumers=2 runs both kernels warp-specialised (each consumer warpgroup owns one block of rows).
  """
  check_dtypes(q_nope, q_rope, k_nope, k_rope, v)
  check_consumers(consumers, "backward")
  s = q_nope.shape[1]
  padded, padded_args, seg = prepare(q_nope, q_rope, k_nope, k_rope, v, segment_ids,
                                      consumers * dq_blocks[0], dq_blocks[1], dkv_blocks[0],
                                      consumers * dkv_blocks[1])
  delta = jnp.einsum("bshd,bshd->bhs", o.astype(jnp.float32), do.astype(jnp.float32)) - dlse
  rows = lambda x: common.pad_seq(x.astype(jnp.float32), padded, axis=2)
  # Base-2 statistics: p = exp2(t - lse2) with t = logits * log2(e).
  lse2 = rows(lse) * LOG2E
  do_p = common.pad_seq(do.astype(q_nope.dtype), padded, axis=1)
  grads = backward(*padded_args, seg, do_p, lse2, rows(delta), sm_scale=sm_scale,
                                causal=causal, dq_blocks=dq_blocks, dkv_blocks=dkv_blocks,
                                consumers=consumers, interpret=interpret)
  dqn, dqr, dkn, dkr_heads, dvv = grads
  dkr = jnp.sum(dkr_heads[:, :s], axis=2).astype(k_rope.dtype)
  return dqn[:, :s], dqr[:, :s], dkn[:, :s], dkr, dvv[:, :s]
