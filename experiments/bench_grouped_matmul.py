"""Grouped expert matmul benchmark at Kimi K2 shapes.

Times, in one process: our `gmm` forward, its backward (dlhs via gmm on the
transposed rhs, drhs via tgmm), `lax.ragged_dot` forward and backward, and a
dense [m, k] x [k, n] matmul of the same FLOPs. Prints TFLOP/s and the ratio
to the dense matmul. With --check it first compares the kernels against the
jnp reference on small ragged shapes (exits non-zero on a mismatch).
`--tilings` times several kernel tilings in the same run (one table row
each); on a GPU the default compares the one-warpgroup kernel with the
warp-specialised one (`gpu.WS_TILING`).

    python experiments/bench_grouped_matmul.py [--check] [--quick]
        [--tilings default,128x64x128x2]
    # the check's GPU code path on a CPU, in the Mosaic GPU interpreter:
    python experiments/bench_grouped_matmul.py --check --no-bench --backend gpu \
        --interpret --tilings 64x64x32,64x64x32x2
"""
import argparse
import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.grouped_matmul import gmm, gpu, reference, tgmm

HIDDEN, EXPERT_FFN, ROWS = 7168, 2048, 16384  # K2: 2048 tokens x top-8


def group_sizes(key, rows, groups, routing):
  """int32 [groups] summing to rows: uniform random or skewed (Zipf 1.2)."""
  if routing == "random":
    probs = jnp.ones(groups) / groups
  else:
    probs = 1.0 / jnp.arange(1, groups + 1) ** 1.2
    probs = probs / probs.sum()
  ids = jax.random.choice(key, groups, (rows,), p=probs)
  return jnp.bincount(ids, length=groups).astype(jnp.int32)


def timeit(fn, *args, iters=10):
  """Median wall seconds of a jitted fn (after compile + warm-up)."""
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def try_timeit(fn, *args):
  """timeit, or NaN when the baseline fails (ragged_dot's dense fallback
  can exhaust device memory at 384 groups)."""
  try:
    return timeit(fn, *args)
  except Exception as e:
    print(f"baseline failed: {type(e).__name__}: "
          f"{str(e).splitlines()[0][:200]}", file=sys.stderr)
    return float("nan")


def parse_tilings(text):
  """"default,128x64x128x2" -> [None, (128, 64, 128, 2)]."""
  return [None if t == "default" else tuple(int(v) for v in t.split("x"))
          for t in text.split(",")]


def tiling_name(tiling):
  return "default" if tiling is None else "x".join(map(str, tiling))


def check(backend, tiling=None, interpret=None):
  """Kernels vs the jnp reference (fwd + grads), bf16 and (except on the
  16-bit-only gpu backend) f32, ragged."""
  ok = True
  key = jax.random.key(1)
  dtypes = ((jnp.bfloat16, 2e-2),) + (() if backend == "gpu" else
                                      ((jnp.float32, 1e-2),))
  for dtype, tol in dtypes:
    for transpose_rhs, offset in ((False, None), (True, None), (False, 3)):
      m, k, n, g_all = 1000, 320, 448, 8
      g_local = g_all if offset is None else 4
      k1, k2, k3, k4 = jax.random.split(key, 4)
      sizes = group_sizes(k1, 900, g_all, "skewed").at[2].set(0)
      lhs = jax.random.normal(k2, (m, k), jnp.float32).astype(dtype)
      shape = (g_local, n, k) if transpose_rhs else (g_local, k, n)
      rhs = jax.random.normal(k3, shape, jnp.float32).astype(dtype)
      dout = jax.random.normal(k4, (m, n), jnp.float32).astype(dtype)
      kw = dict(transpose_rhs=transpose_rhs, group_offset=offset)

      def run(fn, lhs, rhs):
        out, vjp = jax.vjp(lambda a, b: fn(a, b, sizes, **kw), lhs, rhs)
        return (out,) + vjp(dout.astype(out.dtype))

      label = (f"check {backend} {tiling_name(tiling)} {jnp.dtype(dtype).name} "
               f"transpose={transpose_rhs} offset={offset}")
      try:
        got = jax.jit(functools.partial(
            run, functools.partial(gmm, backend=backend, tiling=tiling,
                                   interpret=interpret)))(lhs, rhs)
      except Exception as e:  # report every configuration, then fail
        print(f"{label}: ERROR {type(e).__name__}: {str(e)[:400]}")
        ok = False
        continue
      f32 = lambda x: x.astype(jnp.float32)
      want = jax.jit(functools.partial(run, reference.gmm_reference))(
          f32(lhs), f32(rhs))
      for name, a, b in zip(("out", "dlhs", "drhs"), got, want):
        err = float(jnp.abs(f32(a) - b).max() / jnp.maximum(
            jnp.abs(b).max(), 1.0))
        status = "ok" if err <= tol else "FAIL"
        ok &= err <= tol
        print(f"{label} {name}: rel err {err:.2e} {status}")
  return ok


def bench(backend, quick, tilings):
  dtype = jnp.bfloat16
  key = jax.random.key(0)
  shapes = [("up", HIDDEN, EXPERT_FFN), ("down", EXPERT_FFN, HIDDEN)]
  cases = ([(48, "random"), (384, "skewed")] if quick else
           [(g, r) for g in (48, 384) for r in ("random", "skewed")])
  print(f"device: {jax.devices()[0].device_kind}  dtype bf16  rows {ROWS}")
  header = ("shape", "G", "routing", "tiling", "dense", "gmm", "tgmm", "rd_fwd",
            "gmm_bwd", "rd_bwd", "gmm/dense", "bwd_speedup")
  print("|" + " | ".join(f"{h:>10}" for h in header) + "|")
  for name, k, n in shapes:
    k1, k2 = jax.random.split(jax.random.fold_in(key, k))
    lhs = jax.random.normal(k1, (ROWS, k), dtype)
    dense_rhs = jax.random.normal(k2, (k, n), dtype)
    flops = 2 * ROWS * k * n
    dense = jax.jit(lambda a, b: a @ b)
    t_dense = timeit(dense, lhs, dense_rhs)
    for groups, routing in cases:
      rhs = jax.random.normal(k2, (groups, k, n), dtype) * 0.02
      dout = jax.random.normal(k1, (ROWS, n), dtype)
      sizes = group_sizes(jax.random.fold_in(key, groups), ROWS, groups,
                          routing)

      def fwd(fn, a, b):
        return fn(a, b, sizes)

      def bwd(fn, a, b):
        return jax.vjp(lambda x, y: fn(x, y, sizes), a, b)[1](dout)

      ragged = lambda a, b, s: jax.lax.ragged_dot(a, b, s)
      t_rd = try_timeit(jax.jit(functools.partial(fwd, ragged)), lhs, rhs)
      t_rd_bwd = try_timeit(jax.jit(functools.partial(bwd, ragged)), lhs, rhs)
      for tiling in tilings:
        ours = functools.partial(gmm, backend=backend, tiling=tiling)
        grouped_t = jax.jit(lambda a, d: tgmm(a, d, sizes, groups,
                                              backend=backend, tiling=tiling))
        t_gmm = try_timeit(jax.jit(functools.partial(fwd, ours)), lhs, rhs)
        t_tgmm = try_timeit(grouped_t, lhs, dout)
        t_bwd = try_timeit(jax.jit(functools.partial(bwd, ours)), lhs, rhs)
        cells = [name, str(groups), routing, tiling_name(tiling)]
        cells += [f"{flops / t / 1e12:.0f} TF/s"
                  for t in (t_dense, t_gmm, t_tgmm, t_rd)]
        cells += [f"{2 * flops / t / 1e12:.0f} TF/s" for t in (t_bwd, t_rd_bwd)]
        cells += [f"{t_dense / t_gmm:.2f}", f"{t_rd_bwd / t_bwd:.2f}x"]
        print("|" + " | ".join(f"{c:>10}" for c in cells) + "|", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--check", action="store_true")
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--backend", default="auto")
  parser.add_argument("--no-bench", action="store_true")
  parser.add_argument("--tilings", default=None,
                      help="comma-separated: default or TMxTKxTN[xWGS]")
  parser.add_argument("--interpret", action="store_true",
                      help="run --check's kernels in Pallas interpret mode")
  args = parser.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0]}")
  on_gpu = args.backend == "gpu" or (args.backend == "auto" and
                                     jax.default_backend() == "gpu")
  tilings = parse_tilings(args.tilings or (
      "default," + tiling_name(gpu.WS_TILING) if on_gpu else "default"))
  ok = True
  if args.check:
    # The reference must not use TF32; the kernels' f32 path may (tol 1e-2).
    with jax.default_matmul_precision("highest"):
      for tiling in tilings:
        ok &= check(args.backend, tiling,
                    interpret=True if args.interpret else None)
  if not args.no_bench:
    bench(args.backend, args.quick, tilings)
  if not ok:
    sys.exit(1)


if __name__ == "__main__":
  main()
