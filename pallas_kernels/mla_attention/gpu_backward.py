"""Mosaic GPU backward kernels of MLA flash attention: dq (per query tile) and dk/dv (per key tile).

Inputs are padded to the blocks by `gpu.attention_backward`; lse2 = lse * log2(e) and
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
from pallas_kernels.mla_attention.gpu import (COLS, LOG2E, MAX_CONCURRENT_STEPS, ROWS, key_blocks,
                                              run_kernel, stage, tile_spec, transforms, valid_tile,
                                              wgmma_tile)


def _smem(shape, dtype):
  return plgpu.SMEM(shape, dtype, transforms=transforms(shape[-1], dtype))


def _zeros(shape):
  return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)


def _dq(qn, qr, kn, kr, v, seg, do, lse2, delta, *, sm_scale, causal, block_q, block_k, interpret):
  b, s, h, dn = qn.shape
  dr, dv = qr.shape[-1], v.shape[-1]
  dtype = qn.dtype
  scale2 = sm_scale * LOG2E
  has_seg = seg is not None

  def body(*refs):
    if has_seg:
      seg_g, *refs = refs
    qn_g, qr_g, kn_g, kr_g, v_g, do_g, lse_g, delta_g, dqn_g, dqr_g = refs
    bi, hi, qi = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q")
    q0 = qi * block_q
    rows = pl.ds(q0, block_q)

    def scoped(qn_s, qr_s, do_s, ds_s, segq_s, stat_s, barrier):
      copies = [(qn_g.at[bi, rows, hi], qn_s), (qr_g.at[bi, rows, hi], qr_s),
                (do_g.at[bi, rows, hi], do_s), (lse_g.at[bi, hi, rows], stat_s.at[0]),
                (delta_g.at[bi, hi, rows], stat_s.at[1])]
      if has_seg:
        copies.append((seg_g.at[bi, rows], segq_s))
      for src, dst in copies:
        plgpu.copy_gmem_to_smem(src, dst, barrier)
        plgpu.barrier_wait(barrier)
      lse = plgpu.load(stat_s.at[0], layout=ROWS)
      delta = plgpu.load(stat_s.at[1], layout=ROWS)
      seg_q = plgpu.load(segq_s, layout=ROWS) if has_seg else None

      def step(idx, kn_s, kr_s, v_s, *rest):
        *segk, (dqn, dqr) = rest
        j = idx[0]
        t = wgmma_tile((block_q, block_k), (qn_s, kn_s.T), (qr_s, kr_s.T)) * scale2
        seg_k = plgpu.load(segk[0], layout=COLS) if has_seg else None
        valid = valid_tile((block_q, block_k), q0, j * block_k, causal, seg_q, seg_k, True)
        if valid is not None:
          t = jnp.where(valid, t, common.MASK_VALUE)
        p = jnp.exp2(t - lax.broadcast_in_dim(lse, t.shape, [0]))
        dp = wgmma_tile((block_q, block_k), (do_s, v_s.T))
        ds = p * (dp - lax.broadcast_in_dim(delta, t.shape, [0])) * sm_scale
        stage(ds_s, ds)
        return dqn + wgmma_tile(dqn.shape, (ds_s, kn_s)), dqr + wgmma_tile(dqr.shape, (ds_s, kr_s))

      in_specs, operands = key_blocks(seg_g if has_seg else None, kn_g, kr_g, v_g, bi, hi, block_k)
      steps = lax.div(q0 + block_q + block_k - 1, block_k) if causal else s // block_k
      dqn, dqr = plgpu.emit_pipeline(
          step, grid=(steps,), in_specs=in_specs, max_concurrent_steps=MAX_CONCURRENT_STEPS,
          init_carry=(_zeros((block_q, dn)), _zeros((block_q, dr))))(*operands)
      qn_s[...] = dqn.astype(dtype)
      qr_s[...] = dqr.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(qn_s, dqn_g.at[bi, rows, hi])
      plgpu.copy_smem_to_gmem(qr_s, dqr_g.at[bi, rows, hi])
      plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(scoped, _smem((block_q, dn), dtype), _smem((block_q, dr), dtype),
                  _smem((block_q, dv), dtype), _smem((block_q, block_k), dtype),
                  plgpu.SMEM((block_q,), jnp.int32), plgpu.SMEM((2, block_q), jnp.float32),
                  plgpu.Barrier(num_arrivals=1))

  out_type = (jax.ShapeDtypeStruct(qn.shape, dtype), jax.ShapeDtypeStruct(qr.shape, dtype))
  args = ([seg] if has_seg else []) + [qn, qr, kn, kr, v, do, lse2, delta]
  return run_kernel(body, out_type, (b, h, s // block_q), ("batch", "heads", "q"), interpret, *args)


def _dkv(qn, qr, kn, kr, v, seg, do, lse2, delta, *, sm_scale, causal, block_q, block_k, interpret):
  b, s, h, dn = qn.shape
  dr, dv = qr.shape[-1], v.shape[-1]
  dtype = qn.dtype
  scale2 = sm_scale * LOG2E
  has_seg = seg is not None
  num_q = s // block_q

  def body(*refs):
    if has_seg:
      seg_g, *refs = refs
    qn_g, qr_g, kn_g, kr_g, v_g, do_g, lse_g, delta_g, dkn_g, dkr_g, dv_g = refs
    bi, hi, ki = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("k")
    k0 = ki * block_k
    rows = pl.ds(k0, block_k)

    def scoped(kn_s, kr_s, v_s, stage_s, segk_s, barrier):
      copies = [(kn_g.at[bi, rows, hi], kn_s), (kr_g.at[bi, rows], kr_s),
                (v_g.at[bi, rows, hi], v_s)]
      if has_seg:
        copies.append((seg_g.at[bi, rows], segk_s))
      for src, dst in copies:
        plgpu.copy_gmem_to_smem(src, dst, barrier)
        plgpu.barrier_wait(barrier)
      seg_k = plgpu.load(segk_s, layout=ROWS) if has_seg else None
      first = lax.div(k0, block_q) if causal else 0

      def step(idx, qn_s, qr_s, do_s, lse_s, delta_s, *rest):
        *segq, (dkn, dkr, dvv) = rest
        i = first + idx[0]
        t = wgmma_tile((block_k, block_q), (kn_s, qn_s.T), (kr_s, qr_s.T)) * scale2
        seg_q = plgpu.load(segq[0], layout=COLS) if has_seg else None
        valid = valid_tile((block_k, block_q), k0, i * block_q, causal, seg_k, seg_q, False)
        if valid is not None:
          t = jnp.where(valid, t, common.MASK_VALUE)
        lse = plgpu.load(lse_s, layout=COLS)
        delta = plgpu.load(delta_s, layout=COLS)
        p_t = jnp.exp2(t - lax.broadcast_in_dim(lse, t.shape, [1]))
        dvv = dvv + wgmma_tile(dvv.shape, (stage(stage_s, p_t), do_s))
        dp_t = wgmma_tile((block_k, block_q), (v_s, do_s.T))
        ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta, t.shape, [1])) * sm_scale
        stage(stage_s, ds_t)  # p_t's wgmma has completed: wgmma_tile waits for its accumulator.
        return (dkn + wgmma_tile(dkn.shape, (stage_s, qn_s)),
                dkr + wgmma_tile(dkr.shape, (stage_s, qr_s)), dvv)

      index = lambda i: (first + i, 0)
      in_specs = [tile_spec((block_q, dn), index, dtype), tile_spec((block_q, dr), index, dtype),
                  tile_spec((block_q, dv), index, dtype),
                  plgpu.BlockSpec((block_q,), lambda i: (first + i,)),
                  plgpu.BlockSpec((block_q,), lambda i: (first + i,))]
      operands = [qn_g.at[bi, :, hi], qr_g.at[bi, :, hi], do_g.at[bi, :, hi], lse_g.at[bi, hi],
                  delta_g.at[bi, hi]]
      if has_seg:
        in_specs.append(plgpu.BlockSpec((block_q,), lambda i: (first + i,)))
        operands.append(seg_g.at[bi])
      init = (_zeros((block_k, dn)), _zeros((block_k, dr)), _zeros((block_k, dv)))
      dkn, dkr, dvv = plgpu.emit_pipeline(
          step, grid=(num_q - first,), in_specs=in_specs,
          max_concurrent_steps=MAX_CONCURRENT_STEPS, init_carry=init)(*operands)

      def write(dkr_s):  # Allocated after the pipeline, in the SMEM its buffers used.
        kn_s[...] = dkn.astype(dtype)
        v_s[...] = dvv.astype(dtype)
        dkr_s[...] = dkr
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(kn_s, dkn_g.at[bi, rows, hi])
        plgpu.copy_smem_to_gmem(v_s, dv_g.at[bi, rows, hi])
        plgpu.copy_smem_to_gmem(dkr_s, dkr_g.at[bi, rows, hi])
        plgpu.wait_smem_to_gmem(0)
      pl.run_scoped(write, _smem((block_k, dr), jnp.float32))

    pl.run_scoped(scoped, _smem((block_k, dn), dtype), _smem((block_k, dr), dtype),
                  _smem((block_k, dv), dtype), _smem((block_k, block_q), dtype),
                  plgpu.SMEM((block_k,), jnp.int32), plgpu.Barrier(num_arrivals=1))

  out_type = (jax.ShapeDtypeStruct(kn.shape, dtype),
              jax.ShapeDtypeStruct((b, s, h, dr), jnp.float32),
              jax.ShapeDtypeStruct(v.shape, dtype))
  args = ([seg] if has_seg else []) + [qn, qr, kn, kr, v, do, lse2, delta]
  return run_kernel(body, out_type, (b, h, s // block_k), ("batch", "heads", "k"), interpret, *args)


def backward(qn, qr, kn, kr, v, seg, do, lse2, delta, *, dq_blocks, dkv_blocks, **kw):
  """Returns (dq_nope, dq_rope, dk_nope, dk_rope per head fp32 [b, s, h, dr], dv), all padded.

  dq_blocks / dkv_blocks: (query rows, key rows) per step of each kernel.
  """
  args = (qn, qr, kn, kr, v, seg, do, lse2, delta)
  dqn, dqr = _dq(*args, block_q=dq_blocks[0], block_k=dq_blocks[1], **kw)
  dkn, dkr_heads, dvv = _dkv(*args, block_q=dkv_blocks[0], block_k=dkv_blocks[1], **kw)
  return dqn, dqr, dkn, dkr_heads, dvv
