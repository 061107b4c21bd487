"""Trainer -> engine weight sync of a ~1B-parameter K2-shaped model on 8 CPU devices: seconds and GB/s per sync,
peak memory, and the measured rates scaled to Kimi K2 on 256 GPUs.

    python experiments/bench_weight_sync.py [--bucket_mb 64] [--reps 2]

Model: K2's architecture and vocabulary (163,840) cut to hidden 1024, 12 layers (1 dense), 8 heads, 32 routed
experts of 512 (top-4) + 1 shared: 0.95B parameters, fp32 master weights, bf16 engine weights (the router bias
stays fp32).
  - colocated (one process, 8 devices): the trainer's parameters on (fsdp=8) are offloaded to pinned_host, the
    engine's bf16 weights on (expert=2, tensor=4) are built from them bucket by bucket (ColocatedSync.to_engine),
    the parameters come back with one host -> device copy (restore). The optimizer state is left out (it would
    add 2x the parameters to offload and restore, linearly);
  - 2-process (4 + 4 devices): a trainer process on (fsdp=4) pushes to an engine process on (expert=2,
    tensor=2) over jax.experimental.transfer (kimi_jax/serve/transfer.py).
Every sync runs --reps + 1 times; the first (compiles) is reported apart, the others' median is the result.
GB/s counts the engine's bytes (bf16) produced per second. Peak memory: SyncStats.peak_bytes (most bytes on one
device during the sync) against its stated bound, and each process's peak resident set (ru_maxrss).

These are CPU numbers (the 8 "devices" share the machine's cores and DRAM; transfer goes over loopback). The
2-process run also times the transport alone: RAW_PULLS pulls of one bucket-sized buffer over
jax.experimental.transfer, before the syncs. The K2 table is arithmetic on the measured rates: K2's bf16 bytes per
device (colocated: each device converts its 1/256 share), per link (broadcast: every engine rank receives all
bytes, checkpoint-engine's default mode) or per link for 1/256 (each rank pulls only its shard), and the rate each
mode would need for K2's 30 s. The last printed line is one JSON object with every number;
experiments/results/weight_sync.md holds a run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import transfer  # noqa: E402
from jax.sharding import SingleDeviceSharding  # noqa: E402

import kimi_jax  # noqa: E402
from kimi_jax import sharding  # noqa: E402

K2_GPUS = 256
CHECKPOINT_ENGINE_S = 16.0      # Kimi-K2 (FP8) on 256 x H20, broadcast mode, checkpoint-engine's published time
K2_REPORT_S = 30.0              # K2 report: a full parameter update "under 30 s"
RAW_PULLS = 5


def bench_config():
    """~1B parameters, K2-shaped: K2's vocabulary, MLA and MoE, fewer and narrower layers."""
    return kimi_jax.ModelConfig(hidden_size=1024, num_hidden_layers=12, first_k_dense_replace=1,
                                num_attention_heads=8, q_lora_rank=384, kv_lora_rank=256, n_routed_experts=32,
                                num_experts_per_tok=4, moe_intermediate_size=512, intermediate_size=4096)


def engine_config():
    return bench_config().replace(param_dtype="bfloat16", dtype="bfloat16")


def trainer_params(devices):
    """fp32 parameters (pure dict), created sharded over (fsdp=len(devices))."""
    mesh = sharding.make_mesh(fsdp=len(devices), devices=devices)
    return nnx.to_pure_dict(nnx.state(kimi_jax.create_model(bench_config(), mesh)))


def max_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def summarize(stats) -> dict:
    """SyncStats of the runs -> first (compiling) and median of the rest."""
    warm = stats[1:]
    seconds = statistics.median(s.seconds for s in warm)
    return {"first_s": stats[0].seconds, "seconds": seconds, "gb": stats[0].bytes / 1e9,
            "gb_per_s": stats[0].bytes / seconds / 1e9, "buckets": stats[0].buckets,
            "peak_gib": max(s.peak_bytes for s in stats) / 2 ** 30,
            "bound_gib": max(s.bound_bytes for s in stats) / 2 ** 30}


def run_colocated(bucket_bytes: int, reps: int) -> dict:
    from kimi_jax.serve.weight_sync import ColocatedSync
    params = trainer_params(jax.devices())
    jax.block_until_ready(params)
    sync = ColocatedSync(engine_config(), sharding.make_mesh(expert=2, tensor=4), bucket_bytes)
    start = time.perf_counter()
    host = sync.offload(params)
    offload_s = time.perf_counter() - start
    stats = []
    for _ in range(reps + 1):
        state, _ = sync.to_engine(host)
        stats.append(sync.stats)
        del state
    start = time.perf_counter()
    jax.block_until_ready(sync.restore(host))
    fp32_gb = sum(x.nbytes for x in jax.tree.leaves(params)) / 1e9
    return {**summarize(stats), "offload_s": offload_s, "restore_s": time.perf_counter() - start,
            "trainer_gb": fp32_gb, "max_rss_gib": max_rss_gib()}


def run_sender(bucket_bytes: int, reps: int) -> dict:
    from kimi_jax.serve.transfer import WeightSender
    params = trainer_params(jax.devices())
    sender = WeightSender(engine_config(), bucket_bytes, timeout_s=600)
    raw = transfer.start_transfer_server(jax.devices()[0].client, "127.0.0.1:0",
                                         ["127.0.0.1:0"] * jax.device_count())
    buffers = [jnp.full((bucket_bytes,), i, jnp.uint8) for i in range(RAW_PULLS)]
    for i, buffer in enumerate(buffers):
        raw.await_pull(i + 1, [buffer])
    print(json.dumps({"listening": sender.address, "raw": raw.address()}), flush=True)
    stats = [sender.push(params, version) for version in range(1, reps + 2)]
    sender.close()
    return {**summarize(stats), "max_rss_gib": max_rss_gib()}


def raw_link_rate(address: str, bucket_bytes: int) -> float:
    """Median GB/s of RAW_PULLS pulls of one bucket-sized uint8 buffer from the trainer's transfer server: the
    transport alone, without packing, checksums or unpacking."""
    server = transfer.start_transfer_server(jax.devices()[0].client, "127.0.0.1:0",
                                            ["127.0.0.1:0"] * jax.device_count())
    connection = server.connect(address)
    spec = jax.ShapeDtypeStruct((bucket_bytes,), jnp.uint8, sharding=SingleDeviceSharding(jax.devices()[0]))
    rates = []
    for i in range(RAW_PULLS):
        start = time.perf_counter()
        jax.block_until_ready(connection.pull(i + 1, [spec]))
        rates.append(bucket_bytes / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


def run_receiver(address: str, raw_address: str, bucket_bytes: int, reps: int) -> dict:
    from kimi_jax.serve.transfer import WeightReceiver
    link = raw_link_rate(raw_address, bucket_bytes)
    receiver = WeightReceiver(engine_config(), sharding.make_mesh(expert=2, tensor=2), address,
                              lambda state, version: None, timeout_s=600)
    stats = []
    for _ in range(reps + 1):
        receiver.receive()
        stats.append(receiver.stats)
    return {**summarize(stats), "link_gb_per_s": link, "max_rss_gib": max_rss_gib()}


def launch(role: str, devices: int, *args: str) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), f"--role={role}", *args], env=env,
                            stdout=subprocess.PIPE, text=True)


def last_json(proc: subprocess.Popen, role: str) -> dict:
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"the {role} process failed with code {proc.returncode}:\n{out[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def k2_table(colocated: dict, two_process: dict) -> list[dict]:
    """Seconds for K2's bf16 bytes at the measured rates, and the rate each mode needs for K2_REPORT_S."""
    k2_bytes = kimi_jax.count_params(kimi_jax.kimi_k2_1t())["total"] * 2
    rows = [("colocated: each GPU converts its 1/256 share", colocated["gb_per_s"] / 8, K2_GPUS),
            ("2-process broadcast: every rank receives all", two_process["gb_per_s"], 1),
            ("  the same at the raw transfer rate", two_process["link_gb_per_s"], 1),
            ("2-process: each rank pulls its 1/256 shard", two_process["gb_per_s"], K2_GPUS)]
    table = [{"mode": mode, "rate_gb_s": rate, "k2_seconds": k2_bytes / share / rate / 1e9,
              "needed_gb_s": k2_bytes / share / K2_REPORT_S / 1e9} for mode, rate, share in rows]
    return table + [{"mode": "checkpoint-engine, 256 x H20, K2 FP8 (published)", "k2_seconds": CHECKPOINT_ENGINE_S},
                    {"mode": "K2 report, full update (published)", "k2_seconds": K2_REPORT_S}]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bucket_mb", type=int, default=64)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--role", default="driver", choices=["driver", "colocated", "sender", "receiver"])
    parser.add_argument("--address", default="")
    parser.add_argument("--raw_address", default="")
    args = parser.parse_args()
    bucket_bytes = args.bucket_mb << 20
    if args.role == "colocated":
        print(json.dumps(run_colocated(bucket_bytes, args.reps)))
        return
    if args.role == "sender":
        print(json.dumps(run_sender(bucket_bytes, args.reps)))
        return
    if args.role == "receiver":
        print(json.dumps(run_receiver(args.address, args.raw_address, bucket_bytes, args.reps)))
        return
    common = [f"--bucket_mb={args.bucket_mb}", f"--reps={args.reps}"]
    colocated = last_json(launch("colocated", 8, *common), "colocated")
    print("colocated", json.dumps(colocated), flush=True)
    sender = launch("sender", 4, *common)
    addresses = json.loads(sender.stdout.readline())
    receiver = last_json(launch("receiver", 4, *common, f"--address={addresses['listening']}",
                                f"--raw_address={addresses['raw']}"), "receiver")
    sender_stats = last_json(sender, "sender")
    print("2-process engine", json.dumps(receiver), flush=True)
    print("2-process trainer", json.dumps(sender_stats), flush=True)
    table = k2_table(colocated, receiver)
    params = kimi_jax.count_params(bench_config())["total"]
    print(f"\n{params / 1e9:.2f}B parameters, {colocated['gb']:.2f} GB of engine (bf16) weights, "
          f"buckets of {args.bucket_mb} MiB")
    print(f"colocated: {colocated['seconds']:.2f} s per sync ({colocated['gb_per_s']:.2f} GB/s), offload "
          f"{colocated['offload_s']:.2f} s, restore {colocated['restore_s']:.2f} s, peak "
          f"{colocated['peak_gib']:.2f} GiB per device (bound {colocated['bound_gib']:.2f})")
    print(f"2-process: {receiver['seconds']:.2f} s per sync ({receiver['gb_per_s']:.2f} GB/s; raw transfer "
          f"{receiver['link_gb_per_s']:.2f} GB/s), engine peak {receiver['peak_gib']:.2f} GiB per device (bound "
          f"{receiver['bound_gib']:.2f}), trainer peak {sender_stats['peak_gib']:.2f} (bound "
          f"{sender_stats['bound_gib']:.2f})")
    print(f"K2 ({K2_GPUS} GPUs, bf16):  mode, measured rate, K2 seconds at it, rate needed for {K2_REPORT_S:.0f} s")
    for row in table:
        rate = f"{row['rate_gb_s']:8.3f} GB/s" if "rate_gb_s" in row else " " * 13
        needed = f"{row['needed_gb_s']:8.2f} GB/s" if "needed_gb_s" in row else ""
        print(f"  {row['mode']:<50} {rate} {row['k2_seconds']:10.1f} s {needed}")
    print(json.dumps({"params": params, "bucket_mb": args.bucket_mb, "colocated": colocated,
                      "two_process": {"engine": receiver, "trainer": sender_stats}, "k2": table}))


if __name__ == "__main__":
    main()
