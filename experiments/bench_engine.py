"""Output tokens/s of the continuous-batching engine against the static `generate`, in the same run.

    python experiments/bench_engine.py [--hidden_size=128] [--max_tokens=64] [--max_slots=32]

Workloads: 1, 8 and 32 concurrent requests (prompts of mixed lengths) of max_tokens each; K = 8 samples of each
of 4 prompts (the engine prefills each prompt once and shares its pages; `generate` gets every prompt 8 times);
and 32 requests whose lengths differ (max_tokens from max_tokens / 8 to 2 x max_tokens, as responses that end at
different points): the static batch runs every row to the longest, the engine frees a slot as soon as its
request ends. Both sides are compiled first (a warm-up run), then timed over the same requests. Temperature 1
with no stop token; tokens/s counts the tokens requested (the static batch's extra tokens are waste). Last line:
JSON.
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
_DECODE_STEPS = flags.DEFINE_integer("decode_steps", 8, "Engine decode steps per compiled call.")
_PREFILL_BATCH = flags.DEFINE_integer("prefill_batch", 16, "Engine prompts prefilled together.")
_PREFILL_CHUNK = flags.DEFINE_integer("prefill_chunk", 128, "Engine prompt tokens per prefill step.")


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
    ecfg = EngineConfig(max_slots=_SLOTS.value, page_size=16, num_pages=_SLOTS.value * (8 + t // 8) + 1,
                        max_seq_len=128 + 2 * t, prefill_chunk=_PREFILL_CHUNK.value,
                        decode_steps=_DECODE_STEPS.value, prefill_batch=_PREFILL_BATCH.value)
    engine = Engine(model, ecfg)
    rng = np.random.default_rng(0)
    rows = []
    workloads = [(f"{c} concurrent", _prompts(c, rng), 1, [t] * c) for c in (1, 8, 32)]
    workloads += [("4 prompts x K=8", _prompts(4, rng), 8, [t] * 4),
                  ("32 mixed lengths", _prompts(32, rng), 1, rng.integers(t // 8, 2 * t, size=32).tolist())]
    for name, prompts, k, lengths in workloads:
        def run_engine():
            for i, (p, n) in enumerate(zip(prompts, lengths)):
                engine.add_request(Request(p, max_tokens=int(n), temperature=1.0, n=k, seed=i))
            engine.run()

        def run_static():
            out = generate(model, [p for p in prompts for _ in range(k)], max_new_tokens=max(lengths),
                           sampling=SamplingParams(temperature=1.0), key=jax.random.key(0))
            assert out.tokens.shape == (len(prompts) * k, max(lengths))

        tokens = k * sum(lengths)
        engine_s, static_s = _time(run_engine), _time(run_static)
        rows.append({"workload": name, "samples": len(prompts) * k, "output_tokens": tokens,
                     "engine_tokens_per_s": round(tokens / engine_s, 1),
                     "generate_tokens_per_s": round(tokens / static_s, 1),
                     "engine_vs_generate": round(static_s / engine_s, 3),
                     "prefill_tokens_engine": engine.stats["prefill_tokens"]})
        engine.stats["prefill_tokens"] = 0
        print(f"{name:>18}: engine {tokens / engine_s:8.1f} tok/s, generate {tokens / static_s:8.1f} tok/s, "
              f"ratio {static_s / engine_s:.2f}", flush=True)
    print(json.dumps({"bench": "engine", "hidden_size": _HIDDEN.value, "max_tokens": t,
                      "decode_steps": _DECODE_STEPS.value, "prefill_batch": _PREFILL_BATCH.value,
                      "prefill_chunk": _PREFILL_CHUNK.value, "backend": jax.default_backend(),
                      "rows": rows}))


if __name__ == "__main__":
    app.run(main)
