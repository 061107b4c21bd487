"""Training throughput of the benchmark config (experiments/configs/benchmark.py): tokens/s and MFU.

    python experiments/bench_train.py [--steps=20] [--config=experiments/configs/benchmark.py]
        [--config.model.attention_impl=pallas --config.model.moe_impl=pallas
         --config.model.pallas_warp_specialized=True]

Times the jitted train step in steady state (after compilation, on a batch from the real input pipeline) for
MuonClip (Muon + QK-Clip) and for AdamW, on all local devices (data parallel), and prints a table with the ratio
MuonClip / AdamW. MFU uses kimi_jax.train.metrics (model FLOPs per token from the config, peak per device from
the device kind; CPU: a nominal 1e11 FLOP/s per device). The last line is one JSON object.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/benchmark.py", "Benchmark config.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per optimizer (after 2 warm-up steps).")


def time_optimizer(config, name: str, steps: int) -> dict:
    import jax
    from jax.sharding import NamedSharding
    from kimi_jax import sharding
    from kimi_jax.train import loop
    from kimi_jax.train.metrics import flops_per_token, peak_flops_per_device
    from kimi_jax.train.step import make_train_step

    config = config.copy_and_resolve_references()
    config.optimizer.name = name
    config.data.prefetch = 0  # one batch, reused: no prefetch thread
    cfg = loop.model_config(config.model)
    mesh = loop.make_mesh(config.mesh)
    graphdef, state, tx, lr = loop.init_state(config, cfg, mesh)
    step_fn = jax.jit(make_train_step(graphdef, cfg, tx, lr, microbatches=config.train.microbatches,
                                      qk_clip_tau=config.optimizer.qk_clip_tau if name == "muonclip" else None),
                      donate_argnums=0)
    data = loop.data_input.make_input(config.data, cfg, seed=0)
    batch_sharding = NamedSharding(mesh, sharding.logical_to_spec(("batch", "seq"), mesh))
    batch = {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in next(data).items()}
    for _ in range(2):
        state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / steps
    tokens = config.data.global_batch_size * config.data.seq_len
    flops = flops_per_token(cfg, config.data.seq_len) * tokens
    peak = peak_flops_per_device(config.train.peak_flops_per_device) * jax.device_count()
    return {"optimizer": name, "step_s": seconds, "tokens_per_s": tokens / seconds, "mfu": flops / seconds / peak,
            "loss": float(metrics["loss"])}


def main(argv):
    del argv
    import jax
    results = [time_optimizer(_CONFIG.value, name, _STEPS.value) for name in ("muonclip", "adamw")]
    print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()}")
    print(f"{'optimizer':<10} {'step ms':>9} {'tokens/s':>10} {'MFU':>8}")
    for r in results:
        print(f"{r['optimizer']:<10} {r['step_s'] * 1e3:9.1f} {r['tokens_per_s']:10.0f} {r['mfu']:8.2%}")
    muon, adamw = results
    ratio = muon["tokens_per_s"] / adamw["tokens_per_s"]
    print(f"MuonClip / AdamW throughput: {ratio:.3f}")
    print(json.dumps({"tokens_per_s": muon["tokens_per_s"], "mfu": muon["mfu"],
                      "adamw_tokens_per_s": adamw["tokens_per_s"], "adamw_mfu": adamw["mfu"],
                      "muonclip_over_adamw": ratio, "device": jax.devices()[0].device_kind,
                      "devices": jax.device_count()}))


if __name__ == "__main__":
    app.run(main)
