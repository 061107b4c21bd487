"""Benchmark of the MLA attention kernels against the XLA path, at Kimi K2 head dims, in one run.

  python experiments/bench_mla_attention.py [--heads 64] [--seqs 4096,8192] [--check]

Training: causal forward and forward+backward TFLOP/s (useful FLOPs of the causal half: forward
2*s*s/2*h*(192+128), backward 2*s*s/2*h*(3*192+2*128)) and the fraction of the bf16 dense peak.
On a GPU the warp-specialised kernels (`warp_specialized=True`: training forward and backward, and the
decode that reads each cache block once) are timed beside the defaults. Decode: GB/s of latent cache
read (b*n*(512+64)*2 bytes) over a batch x length sweep and the fraction of the HBM bandwidth.
--check first compares the kernels with the reference on the device.
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.mla_attention import mla_attention, mla_decode, mla_decode_paged, reference

DN, DR, DV, C = 128, 64, 128, 512
SM_SCALE = 0.1309  # K2: 192**-0.5 with the YaRN mscale
PEAKS = {  # (bf16 dense TFLOP/s, HBM GB/s)
    "H100": (989.0, 3350.0), "H200": (989.0, 4800.0), "H800": (989.0, 3350.0),
    "TPU v5 lite": (197.0, 819.0), "TPU v5p": (459.0, 2765.0), "TPU v6 lite": (918.0, 1640.0),
}


def _peaks():
  kind = jax.devices()[0].device_kind
  for name, peak in PEAKS.items():
    if name in kind:
      return kind, peak
  return kind, (float("nan"), float("nan"))


def _time(fn, *args, iters=10):
  """Mean seconds per call of a jitted fn (after compilation and a warm-up call)."""
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(iters):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / iters


def _train_inputs(b, s, h, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 5)
  shapes = [(b, s, h, DN), (b, s, h, DR), (b, s, h, DN), (b, s, DR), (b, s, h, DV)]
  return [jax.random.normal(k, sh, jnp.bfloat16) for k, sh in zip(ks, shapes)]


def _train_fns(backend, warp_specialized=False):
  def fwd(*args):
    return mla_attention(*args, sm_scale=SM_SCALE, backend=backend,
                         warp_specialized=warp_specialized)

  def loss(*args):
    o, lse, _ = fwd(*args)
    return jnp.sum(o.astype(jnp.float32))

  return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=range(5)))


def _decode_inputs(b, n, h, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  shapes = [(b, h, C), (b, h, DR), (b, n, C), (b, n, DR)]
  return [jax.random.normal(k, sh, jnp.bfloat16) for k, sh in zip(ks, shapes)]


def check(backend, heads):
  """Max relative errors of the kernels vs the fp32 reference on the device."""
  rel = lambda g, w: float(jnp.max(jnp.abs(g.astype(jnp.float32) - w)) / jnp.max(jnp.abs(w)))
  args = _train_inputs(2, 1000, heads, seed=1)
  seg = jnp.asarray(np.repeat([[1, 2, 3, 0]], 250, axis=1).reshape(1, -1).repeat(2, 0), jnp.int32)
  f32 = [a.astype(jnp.float32) for a in args]
  ref = lambda *a: reference.mla_attention_reference(*a, sm_scale=SM_SCALE, segment_ids=seg)
  got = jax.jit(lambda *a: mla_attention(*a, sm_scale=SM_SCALE, segment_ids=seg, backend=backend))(*args)
  want = jax.jit(ref)(*f32)
  print(f"check train fwd: o {rel(got[0], want[0]):.2e} lse {rel(got[1], want[1]):.2e} "
        f"max_logits {rel(got[2], want[2]):.2e}")
  loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)[0].astype(jnp.float32))) + jnp.sum(fn(*a)[1])
  w = jax.jit(jax.grad(loss(ref), argnums=range(5)))(*f32)
  for warp_specialized in ((False, True) if backend == "gpu" else (False,)):
    kern = lambda *a, ws=warp_specialized: mla_attention(*a, sm_scale=SM_SCALE, segment_ids=seg,
                                                         backend=backend, warp_specialized=ws)
    label = " (warp-specialised)" if warp_specialized else ""
    if warp_specialized:
      got = jax.jit(kern)(*args)
      print(f"check train fwd{label}: o {rel(got[0], want[0]):.2e} lse {rel(got[1], want[1]):.2e} "
            f"max_logits {rel(got[2], want[2]):.2e}")
    g = jax.jit(jax.grad(loss(kern), argnums=range(5)))(*args)
    print(f"check train bwd{label}: " + " ".join(
        f"{n} {rel(a, b):.2e}" for n, a, b in
        zip(["dq_nope", "dq_rope", "dk_nope", "dk_rope", "dv"], g, w)))
  dargs = _decode_inputs(4, 3000, heads, seed=2)
  lengths = jnp.asarray([3000, 1, 777, 0], jnp.int32)
  want = reference.mla_decode_reference(*[a.astype(jnp.float32) for a in dargs], lengths,
                                        sm_scale=SM_SCALE)
  for splits in (1, 8):
    got = jax.jit(lambda *a: mla_decode(*a, sm_scale=SM_SCALE, backend=backend,
                                        num_splits=splits))(*dargs, lengths)
    print(f"check decode splits={splits}: {rel(got, want):.2e}")
    if backend == "gpu":
      got = jax.jit(lambda *a: mla_decode(*a, sm_scale=SM_SCALE, backend=backend, num_splits=splits,
                                          warp_specialized=True))(*dargs, lengths)
      print(f"check decode (warp-specialised) splits={splits}: {rel(got, want):.2e}")
  pages_c = dargs[2][:, :2944].reshape(-1, 64, C)
  pages_r = dargs[3][:, :2944].reshape(-1, 64, DR)
  table = jnp.asarray(np.random.RandomState(0).permutation(pages_c.shape[0]).reshape(4, -1), jnp.int32)
  plengths = jnp.asarray([2944, 65, 700, 0], jnp.int32)
  want = reference.mla_decode_paged_reference(*[a.astype(jnp.float32) for a in
                                                (dargs[0], dargs[1], pages_c, pages_r)],
                                              table, plengths, sm_scale=SM_SCALE)
  got = jax.jit(lambda *a: mla_decode_paged(*a, sm_scale=SM_SCALE, backend=backend))(
      dargs[0], dargs[1], pages_c, pages_r, table, plengths)
  print(f"check decode paged: {rel(got, want):.2e}")


def bench_train(backend, heads, seqs, peak_tflops):
  print(f"\n## training, causal, bf16, b=1, h={heads}, head dims 192/128")
  print("| seq | path | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | % of peak |")
  print("|---|---|---|---|---|---|---|")
  for s in seqs:
    args = _train_inputs(1, s, heads)
    pairs = s * s / 2 * heads
    flops_fwd = 2 * pairs * (DN + DR + DV)
    flops_bwd = 2 * pairs * (3 * (DN + DR) + 2 * DV)
    paths = [(backend, False), ("xla", False)] + ([("gpu", True)] if backend == "gpu" else [])
    for path, warp_specialized in paths:
      fwd, grad = _train_fns(path, warp_specialized)
      label = path + (" warp-specialised" if warp_specialized else "")
      try:
        t_fwd = _time(fwd, *args)
        t_all = _time(grad, *args)
      except Exception as e:  # e.g. the XLA path's [b, h, s, s] logits exceed the device memory
        print(f"| {s} | {label} | failed: {type(e).__name__}: {str(e).splitlines()[0][:80]} |")
        continue
      tflops = (flops_fwd + flops_bwd) / t_all / 1e12
      print(f"| {s} | {label} | {t_fwd * 1e3:.2f} | {flops_fwd / t_fwd / 1e12:.1f} | "
            f"{t_all * 1e3:.2f} | {tflops:.1f} | {100 * tflops / peak_tflops:.0f}% |")


def bench_decode(backend, heads, batches, lengths, peak_gbs):
  print(f"\n## decode, bf16, h={heads}, latent {C}+{DR}")
  ws = backend == "gpu"
  print("| batch | cache len | kernel us | kernel GB/s | % of HBM | xla us | xla GB/s |"
        + (" ws us | ws GB/s | ws % of HBM |" if ws else ""))
  print("|---|---|---|---|---|---|---|" + ("---|---|---|" if ws else ""))
  for b in batches:
    for n in lengths:
      args = _decode_inputs(b, n, heads)
      lens = jnp.full((b,), n, jnp.int32)
      gbytes = b * n * (C + DR) * 2 / 1e9
      times = {}
      for path in (backend, "xla"):
        fn = jax.jit(lambda *a, path=path: mla_decode(*a, sm_scale=SM_SCALE, backend=path))
        times[path] = _time(fn, *args, lens, iters=20)
      t, tx = times[backend], times["xla"]
      row = (f"| {b} | {n} | {t * 1e6:.1f} | {gbytes / t:.0f} | {100 * gbytes / t / peak_gbs:.0f}% | "
             f"{tx * 1e6:.1f} | {gbytes / tx:.0f} |")
      if ws:
        fn = jax.jit(lambda *a: mla_decode(*a, sm_scale=SM_SCALE, backend="gpu",
                                           warp_specialized=True))
        tw = _time(fn, *args, lens, iters=20)
        row += f" {tw * 1e6:.1f} | {gbytes / tw:.0f} | {100 * gbytes / tw / peak_gbs:.0f}% |"
      print(row)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--heads", type=int, default=64)
  parser.add_argument("--seqs", default="4096,8192")
  parser.add_argument("--batches", default="1,8,32")
  parser.add_argument("--lengths", default="1024,4096,16384")
  parser.add_argument("--check", action="store_true")
  parser.add_argument("--skip_train", action="store_true")
  args = parser.parse_args()
  platform = jax.default_backend()
  backend = platform if platform in ("tpu", "gpu") else "xla"
  kind, (peak_tflops, peak_gbs) = _peaks()
  print(f"device: {kind} ({platform}), jax {jax.__version__}, kernel backend: {backend}, "
        f"peaks: {peak_tflops} TFLOP/s bf16, {peak_gbs} GB/s")
  if args.check:
    check(backend, 8)
  if not args.skip_train:
    bench_train(backend, args.heads, [int(s) for s in args.seqs.split(",")], peak_tflops)
  bench_decode(backend, args.heads, [int(b) for b in args.batches.split(",")],
               [int(n) for n in args.lengths.split(",")], peak_gbs)


if __name__ == "__main__":
  main()
