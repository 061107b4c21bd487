"""Absorbed-MLA decode over the latent cache for GPU (Pallas Mosaic GPU, sm_90): contiguous and paged.

A CTA owns 64 heads (heads are zero-padded to a multiple of 64, the wgmma M), one split of the sequence
and one `C_TILE`-column tile of the latent output (a [64, 512] fp32 accumulator would not fit one
warpgroup's registers). It streams BLOCK_N-token cache blocks through a two-stage TMA pipeline:
logits [64, BLOCK_N] = q_latent c_kv^T + q_rope k_rope^T over the full latent width, then
o_tile += p c_kv[:, tile]. The CTAs of the column tiles of one block are launched side by side, so
the repeated read of a cache block is served by L2. Per-split partials are merged by `combine_splits`.
SMEM holds q (64 x c) and two cache stages (BLOCK_N x c): at c = 512 that is just under the 227 KiB
of an H100. Cache rows at or past a sequence's length must hold finite values (their weight is 0).

Warp-specialised variant (`consumers=2`): one CTA per (head group, split, batch) reads each cache block
once. A producer warpgroup streams WS_BLOCK_N-token blocks; consumer 0 computes the logits and the
online softmax and hands p and the rescale factor to consumer 1 through SMEM (double-buffered, with
p_ready / p_free barriers); each consumer accumulates p c_kv for its half of the latent columns.
"""
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mla_attention import common
from pallas_kernels.mla_attention.gpu import (LOG2E, LN2, ROWS, check_consumers, check_dtypes,
                                              load_tiles, pipelined, run_kernel, stage, tile_spec,
                                              transforms, wgmma_tile)
from pallas_kernels.mla_attention.tpu_decode import combine_splits

HEADS = 64
BLOCK_N = 64
C_TILE = 256
MAX_CONCURRENT_STEPS = 2
MIN_BLOCKS_PER_SPLIT = 16
# Warp-specialised decode: 32-token blocks, output written in 64-column fp32 chunks; three pipeline
# stages fit next to q at latent 512 + 64. Passes the interpret-mode tests (race detection included)
# and lowers for sm_90, not yet timed on hardware: bench_mla_attention.py times it beside the default.
WS_BLOCK_N = 32
WS_OUT_CHUNK = 64


def default_num_splits(batch, num_blocks, head_groups, c_tiles, num_sms=132):
  """About one wave of CTAs, with at least MIN_BLOCKS_PER_SPLIT cache blocks per split.

  Measured on H100 (h=64, n=16384): the best split counts were 16, 8 and 2 for batch 1, 8 and 32.
  """
  by_sms = num_sms // (batch * head_groups * c_tiles)
  return int(max(1, min(by_sms, num_blocks // MIN_BLOCKS_PER_SPLIT)))


def _cache_blocks(table_g, c_g, kr_g, bi, first, blocks_per_page):
  """(block_index(j), c_kv source, k_rope source) for the j-th cache block of this split of sequence
  bi: contiguous when table_g is None, else through the page table."""
  if table_g is None:
    return (lambda j: first + j), c_g.at[bi], kr_g.at[bi]
  block_index = lambda j: (table_g[bi, lax.div(first + j, blocks_per_page)] * blocks_per_page
                           + lax.rem(first + j, blocks_per_page))
  return block_index, c_g, kr_g


def _decode(ql, qr, c_kv, k_rope, lengths, table, *, sm_scale, num_splits, num_blocks, c_tile,
            blocks_per_page, interpret):
  """ql [b, hp, c], qr [b, hp, dr] -> (o_part [b, splits, hp, c], lse_part [b, splits, hp]) fp32.

  Contiguous (table None): c_kv [b, n, c], k_rope [b, n, dr]. Paged: c_kv [pages*page, c] and
  k_rope [pages*page, dr] as rows, table [b, max_pages]; a page holds page // BLOCK_N blocks.
  """
  b, hp, c = ql.shape
  dr = qr.shape[-1]
  dtype = ql.dtype
  scale2 = sm_scale * LOG2E
  c_tiles, head_groups = c // c_tile, hp // HEADS
  bps = pl.cdiv(num_blocks, num_splits)
  paged = table is not None

  def body(*refs):
    if paged:
      lengths_g, table_g, ql_g, qr_g, c_g, kr_g, o_g, lse_g = refs
    else:
      lengths_g, ql_g, qr_g, c_g, kr_g, o_g, lse_g = refs
    tile, si, bi = lax.axis_index("tile"), lax.axis_index("split"), lax.axis_index("batch")
    hg, ct = lax.div(tile, c_tiles), lax.rem(tile, c_tiles)
    heads = pl.ds(hg * HEADS, HEADS)
    length = lengths_g[bi]
    first = si * bps
    steps = jnp.clip(lax.div(length + BLOCK_N - 1, BLOCK_N) - first, 0, bps)
    block_index, c_src, kr_src = _cache_blocks(table_g if paged else None, c_g, kr_g, bi, first,
                                               blocks_per_page)

    def scoped(ql_s, qr_s, p_s, barrier):
      load_tiles([(ql_g.at[bi, heads], ql_s), (qr_g.at[bi, heads], qr_s)], barrier)

      def step(idx, c_s, kr_s, carry):
        acc, m, l = carry
        t = wgmma_tile((HEADS, BLOCK_N), (ql_s, c_s.T), (qr_s, kr_s.T)) * scale2
        pos = (first + idx[0]) * BLOCK_N + plgpu.broadcasted_iota(
            jnp.int32, t.shape, 1, layout=plgpu.Layout.WGMMA)
        t = jnp.where(pos < length, t, common.MASK_VALUE)
        m_new = jnp.maximum(m, t.max(axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(t - lax.broadcast_in_dim(m_new, t.shape, [0]))
        pv = wgmma_tile(acc.shape, (stage(p_s, p), c_s.at[:, pl.ds(ct * c_tile, c_tile)]))
        return (acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv, m_new,
                l * alpha + p.sum(axis=1))

      def write(o, lse):
        def out(o_s, lse_s):
          o_s[...] = o
          lse_s[...] = lse
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(o_s, o_g.at[bi, si, heads, pl.ds(ct * c_tile, c_tile)])

          @pl.when(ct == 0)
          def _():
            plgpu.copy_smem_to_gmem(lse_s, lse_g.at[bi, si, heads])
          plgpu.wait_smem_to_gmem(0)
        pl.run_scoped(out, plgpu.SMEM((HEADS, c_tile), jnp.float32,
                                      transforms=transforms(c_tile, jnp.float32)),
                      plgpu.SMEM((HEADS,), jnp.float32))

      @pl.when(steps > 0)
      def _attend():
        in_specs = [tile_spec((BLOCK_N, c), lambda j: (block_index(j), 0), dtype),
                    tile_spec((BLOCK_N, dr), lambda j: (block_index(j), 0), dtype)]
        init = (plgpu.layout_cast(jnp.zeros((HEADS, c_tile), jnp.float32), plgpu.Layout.WGMMA),
                plgpu.layout_cast(jnp.full((HEADS,), common.MASK_VALUE, jnp.float32), ROWS),
                plgpu.layout_cast(jnp.zeros((HEADS,), jnp.float32), ROWS))
        acc, m, l = plgpu.emit_pipeline(step, grid=(steps,), in_specs=in_specs,
                                        max_concurrent_steps=MAX_CONCURRENT_STEPS,
                                        init_carry=init)(c_src, kr_src)
        write(acc / lax.broadcast_in_dim(l, acc.shape, [0]), (m + jnp.log2(l)) * LN2)

      @pl.when(steps == 0)
      def _empty():
        write(plgpu.layout_cast(jnp.zeros((HEADS, c_tile), jnp.float32), plgpu.Layout.WGMMA),
              plgpu.layout_cast(jnp.full((HEADS,), common.MASK_VALUE, jnp.float32), ROWS))

    pl.run_scoped(scoped, plgpu.SMEM((HEADS, c), dtype, transforms=transforms(c, dtype)),
                  plgpu.SMEM((HEADS, dr), dtype, transforms=transforms(dr, dtype)),
                  plgpu.SMEM((HEADS, BLOCK_N), dtype, transforms=transforms(BLOCK_N, dtype)),
                  plgpu.Barrier(num_arrivals=1))

  out_type = (jax.ShapeDtypeStruct((b, num_splits, hp, c), jnp.float32),
              jax.ShapeDtypeStruct((b, num_splits, hp), jnp.float32))
  args = (lengths, table, ql, qr, c_kv, k_rope) if paged else (lengths, ql, qr, c_kv, k_rope)
  return run_kernel(body, out_type, (head_groups * c_tiles, num_splits, b),
                    ("tile", "split", "batch"), interpret, *args)


def _decode_ws(ql, qr, c_kv, k_rope, lengths, table, *, sm_scale, num_splits, num_blocks,
               blocks_per_page, interpret):
  """The warp-specialised `_decode` (num_blocks and blocks_per_page count WS_BLOCK_N-token blocks)."""
  b, hp, c = ql.shape
  dr = qr.shape[-1]
  dtype = ql.dtype
  scale2 = sm_scale * LOG2E
  half = c // 2
  chunk = min(WS_OUT_CHUNK, half)
  bn = WS_BLOCK_N
  bps = pl.cdiv(num_blocks, num_splits)
  paged = table is not None
  itemsize = jnp.dtype(dtype).itemsize
  # wgmma operands pair up with one swizzle: p [HEADS, bn] sets it for q_latent and c_kv too.
  latent_transforms = transforms(bn, dtype)

  def body(*refs):
    if paged:
      lengths_g, table_g, ql_g, qr_g, c_g, kr_g, o_g, lse_g = refs
    else:
      lengths_g, ql_g, qr_g, c_g, kr_g, o_g, lse_g = refs
    hg, si, bi = lax.axis_index("heads"), lax.axis_index("split"), lax.axis_index("batch")
    heads = pl.ds(hg * HEADS, HEADS)
    length = lengths_g[bi]
    first = si * bps
    steps = jnp.clip(lax.div(length + bn - 1, bn) - first, 0, bps)
    block_index, c_src, kr_src = _cache_blocks(table_g if paged else None, c_g, kr_g, bi, first,
                                               blocks_per_page)

    def scoped(ql_s, qr_s, p_s, alpha_s, stat_s, o_s, q_barrier, p_ready, p_free):
      wg = lax.axis_index("wg")

      def write(o, lse):
        """Consumer wg's columns of o [HEADS, half] in fp32 chunks; consumer 0 also writes lse."""
        for ci in range(half // chunk):
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          o_s.at[wg][...] = o[:, ci * chunk:(ci + 1) * chunk]
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(o_s.at[wg], o_g.at[bi, si, heads, pl.ds(wg * half + ci * chunk,
                                                                          chunk)])

        @pl.when(wg == 0)
        def _():
          stat_s[2] = lse
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(stat_s.at[2], lse_g.at[bi, si, heads])
        plgpu.wait_smem_to_gmem(0)

      def step(idx, c_s, kr_s, acc):
        j = idx[0]
        slot = lax.rem(j, 2)

        @pl.when(wg == 0)
        def _softmax():
          t = wgmma_tile((HEADS, bn), (ql_s, c_s.T), (qr_s, kr_s.T)) * scale2
          pos = (first + j) * bn + plgpu.broadcasted_iota(jnp.int32, t.shape, 1,
                                                          layout=plgpu.Layout.WGMMA)
          t = jnp.where(pos < length, t, common.MASK_VALUE)
          m, l = plgpu.load(stat_s.at[0], layout=ROWS), plgpu.load(stat_s.at[1], layout=ROWS)
          m_new = jnp.maximum(m, t.max(axis=1))
          alpha = jnp.exp2(m - m_new)
          p = jnp.exp2(t - lax.broadcast_in_dim(m_new, t.shape, [0]))
          stat_s[0] = m_new
          stat_s[1] = l * alpha + p.sum(axis=1)

          @pl.when(j >= 2)
          def _():
            plgpu.barrier_wait(p_free.at[slot])  # consumer 1 is done with block j - 2
          p_s.at[slot][...] = p.astype(dtype)
          alpha_s[slot] = alpha
          plgpu.commit_smem()
          plgpu.barrier_arrive(p_ready.at[slot])

        @pl.when(wg == 1)
        def _():
          plgpu.barrier_wait(p_ready.at[slot])

        alpha = plgpu.load(alpha_s.at[slot], layout=ROWS)
        pv = wgmma_tile(acc.shape, (p_s.at[slot], c_s.at[:, pl.ds(wg * half, half)]))

        @pl.when(wg == 1)
        def _():
          plgpu.barrier_arrive(p_free.at[slot])
        return acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv

      def consumer(run_pipeline):
        @pl.when(wg == 0)
        def _():
          load_tiles([(ql_g.at[bi, heads], ql_s), (qr_g.at[bi, heads], qr_s)], q_barrier)
          stat_s[0] = plgpu.layout_cast(jnp.full((HEADS,), common.MASK_VALUE, jnp.float32), ROWS)
          stat_s[1] = plgpu.layout_cast(jnp.zeros((HEADS,), jnp.float32), ROWS)

        acc = run_pipeline(plgpu.layout_cast(jnp.zeros((HEADS, half), jnp.float32),
                                             plgpu.Layout.WGMMA))
        # Consumer 0 wrote the final statistics before its last p_ready arrival.
        m, l = plgpu.load(stat_s.at[0], layout=ROWS), plgpu.load(stat_s.at[1], layout=ROWS)
        write(acc / lax.broadcast_in_dim(l, acc.shape, [0]), (m + jnp.log2(l)) * LN2)

      @pl.when(steps > 0)
      def _attend():
        in_specs = [plgpu.BlockSpec((bn, c), lambda j: (block_index(j), 0),
                                    transforms=latent_transforms),
                    tile_spec((bn, dr), lambda j: (block_index(j), 0), dtype)]
        pipelined(step, consumer, in_specs=in_specs, operands=[c_src, kr_src], steps=steps,
                  consumers=2,
                  fixed_bytes=(HEADS * (c + dr) * itemsize + 2 * HEADS * bn * itemsize
                               + 5 * HEADS * 4 + 2 * HEADS * chunk * 4),
                  what=f"decode (latent {c} + {dr})")

      @pl.when((steps == 0) & (wg < 2))
      def _empty():
        write(plgpu.layout_cast(jnp.zeros((HEADS, half), jnp.float32), plgpu.Layout.WGMMA),
              plgpu.layout_cast(jnp.full((HEADS,), common.MASK_VALUE, jnp.float32), ROWS))

    pl.run_scoped(scoped, plgpu.SMEM((HEADS, c), dtype, transforms=latent_transforms),
                  plgpu.SMEM((HEADS, dr), dtype, transforms=transforms(dr, dtype)),
                  plgpu.SMEM((2, HEADS, bn), dtype, transforms=latent_transforms),
                  plgpu.SMEM((2, HEADS), jnp.float32),
                  plgpu.SMEM((3, HEADS), jnp.float32),
                  plgpu.SMEM((2, HEADS, chunk), jnp.float32, transforms=transforms(chunk, jnp.float32)),
                  plgpu.Barrier(num_arrivals=1),
                  plgpu.Barrier(num_arrivals=1, num_barriers=2),
                  plgpu.Barrier(num_arrivals=1, num_barriers=2),
                  collective_axes="wg")

  out_type = (jax.ShapeDtypeStruct((b, num_splits, hp, c), jnp.float32),
              jax.ShapeDtypeStruct((b, num_splits, hp), jnp.float32))
  args = (lengths, table, ql, qr, c_kv, k_rope) if paged else (lengths, ql, qr, c_kv, k_rope)
  return run_kernel(body, out_type, (hp // HEADS, num_splits, b), ("heads", "split", "batch"),
                    interpret, *args, consumers=2)


def _pad_heads(x, hp):
  return common.pad_seq(x, hp, axis=1)


def _run(ql, qr, c_kv, k_rope, lengths, table, *, h, sm_scale, num_splits, tokens, page, c_tile,
         consumers, interpret):
  """Pads heads, picks the split count and runs the chosen kernel; returns o_latent [b, h, c]."""
  b, _, c = ql.shape
  check_consumers(consumers, "decode")
  c_tile = c // 2 if consumers == 2 else min(c_tile, c)
  if c % c_tile:
    raise ValueError(f"kv_lora_rank {c} must be a multiple of the column tile {c_tile}")
  hp = common.round_up(h, HEADS)
  block_n = WS_BLOCK_N if consumers == 2 else BLOCK_N
  if page is not None and page % block_n:
    raise ValueError(f"the gpu backend needs a page size that is a multiple of {block_n}, got {page}")
  num_splits = num_splits or default_num_splits(b, pl.cdiv(tokens, BLOCK_N), hp // HEADS,
                                                1 if consumers == 2 else c // c_tile)
  kernel_args = (_pad_heads(ql, hp), _pad_heads(qr, hp), c_kv, k_rope,
                 jnp.clip(lengths.astype(jnp.int32), 0, tokens), table)
  common_kw = dict(sm_scale=sm_scale, num_splits=num_splits, num_blocks=pl.cdiv(tokens, block_n),
                   blocks_per_page=None if page is None else page // block_n, interpret=interpret)
  if consumers == 2:
    o_part, lse_part = _decode_ws(*kernel_args, **common_kw)
  else:
    o_part, lse_part = _decode(*kernel_args, c_tile=c_tile, **common_kw)
  return combine_splits(o_part[:, :, :h], lse_part[:, :, :h, None], ql.dtype)


def decode(q_latent, q_rope, c_kv, k_rope, lengths, *, sm_scale, num_splits=None, interpret=False,
           c_tile=C_TILE, consumers=1):
  """Contiguous cache: c_kv [b, n, c], k_rope [b, n, dr], lengths [b] -> o_latent [b, h, c].

  consumers=2 runs the warp-specialised kernel (c_tile is then c / 2).
  """
  check_dtypes(q_latent, q_rope, c_kv, k_rope)
  return _run(q_latent, q_rope, c_kv, k_rope, lengths, None, h=q_latent.shape[1], sm_scale=sm_scale,
              num_splits=num_splits, tokens=c_kv.shape[1], page=None, c_tile=c_tile,
              consumers=consumers, interpret=interpret)


def decode_paged(q_latent, q_rope, c_kv_pages, k_rope_pages, block_table, lengths, *, sm_scale,
                 num_splits=None, interpret=False, c_tile=C_TILE, consumers=1):
  """Paged cache: pages [p, page, c] / [p, page, dr], block_table [b, max_pages] -> [b, h, c]."""
  check_dtypes(q_latent, q_rope, c_kv_pages, k_rope_pages)
  num_pages, page, c = c_kv_pages.shape
  return _run(q_latent, q_rope, c_kv_pages.reshape(num_pages * page, c),
              k_rope_pages.reshape(num_pages * page, -1), lengths, block_table.astype(jnp.int32),
              h=q_latent.shape[1], sm_scale=sm_scale, num_splits=num_splits,
              tokens=block_table.shape[1] * page, page=page, c_tile=c_tile, consumers=consumers,
              interpret=interpret)
