"""Output tokens/s of the continuous-batching engine against the static `generate`, in the same run.

    python experiments/bench_engine.py [--hidden_size=128] [--max_tokens=64] [--max_slots=32]

Workloads: 1, 8 and 32 concurrent requests (prompts of mixed lengths), and K = 8 samples of each of 4 prompts
(the engine prefills each prompt once and shares its pages; `generate` gets every prompt 8 times). Both sides are
compiled first (a warm-up run), then timed over the same requests. Temperature 1 with no stop token, so both
produce exactly max_tokens tokens per sample. Last line: JSON.
"""

import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import kimi_jax  # noqa: E402
from kimi_jax.infer import SamplingParams, generate  # noqa: E402
from kimi_jax.serve import Engine, EngineConfig, Request  # noqa: E402

_HIDDEN = flags.DEFINE_integer("hidden_size", 128, "Hidden size of the tiny-shaped model (random weights).")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 64, "Tokens generated per sample.")
_SLOTS = flags.DEFINE_integer("max_slots", 32, "Engine slots (largest decode batch).")


def _prompts(count: int, rng) -> list[list[int]]:
    return [rng.integers(0, 250, size=int(n)).tolist() for n in rng.integers(16, 128, size=count)]


def _time(fn) -> float:
    fn()                                                     # compile
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(_):
    cfg = dataclasses.replace(kimi_jax.tiny(), hidden_size=_HIDDEN.value)
    model = kimi_jax.create_model(cfg, seed=0)
    t = _MAX_TOKENS.value
    ecfg = EngineConfig(max_slots=_SLOTS.value, page_size=16, num_pages=_SLOTS.value * 13 + 1,
                        max_seq_len=128 + t, prefill_chunk=64)
    engine = Engine(model, ecfg)
    rng = np.random.default_rng(0)
    rows = []
    workloads = [(f"{c} concurrent", _prompts(c, rng), 1) for c in (1, 8, 32)] + [("4 prompts x K=8",
                                                                                    _prompts(4, rng), 8)]
    for name, prompts, k in workloads:
        def run_engine():
            for i, p in enumerate(prompts):
                engine.add_request(Request(p, max_tokens=t, temperature=1.0, n=k, seed=i))
            engine.run()

        def run_static():
            out = generate(model, [p for p in prompts for _ in range(k)], max_new_tokens=t,
                           sampling=SamplingParams(temperature=1.0), key=jax.random.key(0))
            assert out.tokens.shape == (len(prompts) * k, t)

        tokens = len(prompts) * k * t
        engine_s, static_s = _time(run_engine), _time(run_static)
        rows.append({"workload": name, "samples": len(prompts) * k, "output_tokens": tokens,
                     "engine_tokens_per_s": round(tokens / engine_s, 1),
                     "generate_tokens_per_s": round(tokens / static_s, 1),
                     "engine_vs_generate": round(static_s / engine_s, 3),
                     "prefill_tokens_engine": engine.stats["prefill_tokens"]})
        engine.stats["prefill_tokens"] = 0
        print(f"{name:>18}: engine {tokens / engine_s:8.1f} tok/s, generate {tokens / static_s:8.1f} tok/s, "
              f"ratio {static_s / engine_s:.2f}", flush=True)
    print(json.dumps({"bench": "engine", "hidden_size": _HIDDEN.value, "max_tokens": t, "backend": jax.default_backend(),
                      "rows": rows}))


if __name__ == "__main__":
    app.run(main)
