"""Malformed tool-call rate with and without the tool-call enforcer, and what enforcing costs.

    python experiments/bench_enforcer.py [--samples 64] [--fit-steps 200] [--out experiments/results/enforcer.md]

Two tiny-preset models (byte tokenizer, vocab 272), sampled by the rollout engine at temperature 1:
  random   random weights; the prompt ends with <|tool_calls_section_begin|> (the model is made to call a tool)
  fitted   Adam on 48 tool-calling dialogues (8 shipped tools, no tool declaration in the prompt), 8 per step, for
           --fit-steps steps: it opens sections by itself and half-learns the format; prompts are new requests
Each is sampled --samples times without and with the enforcer (the same seeds), max_tokens = the enforcer's
bound on a section. A response that opens a section is *malformed* when parse_assistant(text, tools,
first_call_index=0) reports any error (which covers arguments that break the tool's JSON schema); calls
attempted = the <|tool_call_begin|> tokens of the section (at least 1), well-formed calls = those parsed with
no error; malformed-call rate = 1 - well-formed / attempted. Cost: generated tokens per second of the engine
(the same workload run twice, the second timed, so no compilation is counted) without enforcer at
decode_steps 8 and 1, and with it, and the host time of the masks; and the mask time per token for a synthetic 163,840-token BPE vocabulary (random multi-byte tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import kimi_jax  # noqa: E402
from kimi_jax import chat  # noqa: E402
from kimi_jax.agentic.tools import load_tools, openai_form  # noqa: E402
from kimi_jax.data import ByteTokenizer  # noqa: E402
from kimi_jax.data.tokenizers import KimiTokenizer  # noqa: E402
from kimi_jax.serve import Engine, EngineConfig, Request  # noqa: E402
from kimi_jax.serve.enforcer import masks as enforcer_mod  # noqa: E402
from kimi_jax.serve.enforcer import EnforcerConfig, ToolCallEnforcer  # noqa: E402

TOK = ByteTokenizer()
SECTION_BEGIN = TOK.token_to_id("<|tool_calls_section_begin|>")
STOP = chat.stop_token_ids(TOK)
NAMES = ("get_current_weather", "get_forecast", "list_events", "delete_event", "create_note", "search_notes",
         "search_flights", "get_order")
TOOLS = [openai_form(t) for t in load_tools() if t["function"]["name"] in NAMES]
CONFIG = EnforcerConfig(max_string_len=16, max_array_items=3, max_calls=2)
CITIES = ["Paris", "Oslo", "Lima", "Tokyo", "Cairo", "Quito", "Perth", "Rome", "Dakar", "Hanoi"]


def dialogue(rng: random.Random) -> tuple[str, str, dict]:
    """A user request and the call that answers it: (user text, tool name, arguments)."""
    city, n, day = rng.choice(CITIES), rng.randint(1, 7), f"2024-0{rng.randint(1, 9)}-{rng.randint(10, 28)}"
    kind = rng.randrange(8)
    if kind == 0:
        return f"Weather in {city}?", "get_current_weather", {"city": city, "units": rng.choice(["metric", "imperial"])}
    if kind == 1:
        return f"Forecast for {city}, {n} days.", "get_forecast", {"city": city, "days": n}
    if kind == 2:
        return f"What is on {day}?", "list_events", {"date": day}
    if kind == 3:
        return f"Delete event ev{n}{n}.", "delete_event", {"event_id": f"ev{n}{n}"}
    if kind == 4:
        return f"Note: buy {city} maps.", "create_note", {"title": "maps", "body": f"buy {city} maps"}
    if kind == 5:
        return f"Find my notes on {city}.", "search_notes", {"query": city}
    if kind == 6:
        a, b = rng.sample(["CDG", "JFK", "LIM", "HND", "CAI"], 2)
        return f"Flights {a} to {b} on {day}?", "search_flights", {"origin": a, "destination": b, "date": day}
    return f"Where is order {n * 7}?", "get_order", {"order_id": n * 7}


def fit(model, steps: int, seed: int = 0, batch: int = 8):
    """Adam on 48 one-call dialogues, `batch` of them per step in turn (loss on the assistant turns) -> the
    model, the last step's loss."""
    rng = random.Random(seed)
    rows = []
    for _ in range(48):
        user, name, args = dialogue(rng)
        messages = [{"role": "user", "content": user},
                    {"role": "assistant", "content": "", "tool_calls": [
                        {"id": "x", "type": "function", "function": {"name": name, "arguments": args}}]}]
        rows.append(chat.encode(TOK, messages))
    length = max(len(ids) for ids, _ in rows)
    ids = np.zeros((len(rows), length), np.int32)
    mask = np.zeros((len(rows), length), np.float32)
    for r, (i, m) in enumerate(rows):
        ids[r, :len(i)], mask[r, :len(m)] = i, m
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, ids, mask):
        def loss_fn(model):
            logits = model(ids[:, :-1]).astype(np.float32)
            nll = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])
            return (nll * mask[:, 1:]).sum() / mask[:, 1:].sum()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    loss = None
    for k in range(steps):
        rows_k = [(k * batch + j) % len(rows) for j in range(batch)]
        loss = step(model, optimizer, ids[rows_k], mask[rows_k])
    return model, float(loss)


def prompts(kind: str, count: int) -> list[tuple[list[int], str | None]]:
    """-> [(prompt ids, the tool the request needs (fitted) or None)]."""
    rng = random.Random(1234)                                    # other requests than the fitting data's
    out = []
    for _ in range(count):
        user, name, _ = dialogue(rng) if kind == "fitted" else ("What is the weather in Paris?", None, None)
        ids, _ = chat.encode(TOK, [{"role": "user", "content": user}], add_generation_prompt=True)
        out.append((ids + [SECTION_BEGIN] if kind == "random" else ids, name))
    return out


def classify(prompt: list[int], tokens: list[int], wanted: str | None):
    """-> (opened a section, calls attempted, well-formed calls, malformed, error kinds, a well-formed first call
    names `wanted`)."""
    body = [t for t in tokens if t not in STOP]
    text = TOK.decode(([SECTION_BEGIN] if prompt[-1] == SECTION_BEGIN else []) + body)
    if "<|tool_calls_section_begin|>" not in text:
        return False, 0, 0, False, [], False
    parsed = chat.parse_assistant(text, TOOLS, first_call_index=0)
    attempted = max(1, text.count("<|tool_call_begin|>"))
    right = parsed.ok and bool(parsed.tool_calls) and parsed.tool_calls[0]["function"]["name"] == wanted
    return True, attempted, len(parsed.tool_calls), not parsed.ok, sorted({e.kind for e in parsed.errors}), right


class MaskTimer:
    """Accumulates the host time spent in ToolCallEnforcer.allowed (the mask of one state)."""

    def __init__(self):
        self.seconds, self.calls = 0.0, 0
        self._orig = ToolCallEnforcer.allowed

    def __enter__(self):
        timer = self

        def allowed(enforcer, stack):
            t = time.perf_counter()
            try:
                return timer._orig(enforcer, stack)
            finally:
                timer.seconds += time.perf_counter() - t
                timer.calls += 1

        ToolCallEnforcer.allowed = allowed
        return self

    def __exit__(self, *exc):
        ToolCallEnforcer.allowed = self._orig


def run(model, kind: str, samples: int, enforce: bool, decode_steps: int = 8, seed: int = 0):
    """Sample `samples` responses (8 per prompt) -> (stats dict, generated tokens, seconds)."""
    enforcer = ToolCallEnforcer(TOOLS, TOK, config=CONFIG) if enforce else None
    bound = ToolCallEnforcer(TOOLS, TOK, config=CONFIG).grammar.max_section_tokens() + 40
    engine = Engine(model, EngineConfig(max_slots=16, page_size=64, num_pages=400, max_seq_len=2048,
                                        prefill_chunk=128, decode_steps=decode_steps), stop_token_ids=STOP)
    ps = prompts(kind, max(1, samples // 8))
    start = time.perf_counter()
    with MaskTimer() as timer:
        ids = [(p, name, engine.add_request(Request(p, max_tokens=bound, temperature=1.0, n=8, seed=seed + 100 * k,
                                                    enforcer=enforcer))) for k, (p, name) in enumerate(ps)]
        engine.run()
    seconds = time.perf_counter() - start
    stats = {"responses": 0, "sections": 0, "malformed": 0, "attempted": 0, "good": 0, "right_tool": 0, "kinds": {}}
    tokens = 0
    for p, name, rid in ids:
        for sample in engine.result(rid).samples:
            tokens += len(sample.tokens)
            opened, attempted, good, bad, kinds, right = classify(p, sample.tokens, name)
            stats["right_tool"] += right
            stats["responses"] += 1
            stats["sections"] += opened
            stats["malformed"] += bad
            stats["attempted"] += attempted
            stats["good"] += good
            for k in kinds:
                stats["kinds"][k] = stats["kinds"].get(k, 0) + 1
    stats["violations"] = engine.stats["enforcer_violations"]
    stats["mask_s"], stats["mask_calls"] = timer.seconds, timer.calls
    return stats, tokens, seconds


def synthetic_vocab_mask_ms(walks: int = 4, size: int = 163_584) -> dict:
    """Mask time per token on a KimiTokenizer of `size` random multi-byte tokens (uniform walks over the masks)."""
    rng = random.Random(0)
    alphabet = list(b'{}[]":, 0123456789.-_/\\<|abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ') + \
        list("éü中文日本語".encode())
    tokens = {bytes([b]) for b in range(256)}
    while len(tokens) < size:
        tokens.add(bytes(rng.choice(alphabet) for _ in range(rng.choice((2, 2, 3, 3, 4, 5, 6, 8, 12)))))
    ranks = {bytes([b]): b for b in range(256)}
    for t in sorted(tokens - set(ranks)):
        ranks[t] = len(ranks)
    tok = KimiTokenizer(ranks)
    t0 = time.perf_counter()
    enforcer = ToolCallEnforcer(TOOLS, tok, config=CONFIG)
    index_s = time.perf_counter() - t0
    begin = tok.token_to_id("<|tool_calls_section_begin|>")
    nrng = np.random.default_rng(0)
    times, cold = [], []
    for _ in range(walks):
        state = enforcer.start([begin])
        while state.active:
            cached = enforcer_mod._mask_key(enforcer.grammar, enforcer.vocab, state.stack) in \
                enforcer_mod._mask_cache(enforcer.grammar, enforcer.vocab).data
            t = time.perf_counter()
            mask = state.mask()
            dt = time.perf_counter() - t
            times.append(dt)
            if not cached:
                cold.append(dt)
            ids = np.flatnonzero(mask)
            state.advance(int(ids[nrng.integers(len(ids))]))
    return {"vocab": tok.vocab_size, "index_s": index_s, "tokens": len(times), "mean_ms": 1e3 * np.mean(times),
            "cold_ms": 1e3 * np.mean(cold), "cold_max_ms": 1e3 * max(cold), "cold": len(cold)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--fit-steps", type=int, default=200)
    ap.add_argument("--out", default="experiments/results/enforcer.md")
    args = ap.parse_args()

    rows, speed = [], []
    random_model = kimi_jax.create_model(kimi_jax.tiny(), seed=0)
    t = time.perf_counter()
    fitted, loss = fit(kimi_jax.create_model(kimi_jax.tiny(), seed=0), args.fit_steps)
    print(f"fitted {args.fit_steps} steps in {time.perf_counter() - t:.0f}s, loss {loss:.3f}", flush=True)
    for kind, model in (("random", random_model), ("fitted", fitted)):
        for enforce in (False, True):
            enforcer_mod._MASK_CACHES.clear()                              # masks computed afresh
            stats, tokens, seconds = run(model, kind, args.samples, enforce)
            rows.append((kind, enforce, stats))
            print(kind, enforce, json.dumps(stats), flush=True)
        if kind == "random":
            for label, enforce, steps in (("no enforcer, decode_steps 8", False, 8),
                                          ("no enforcer, decode_steps 1", False, 1),
                                          ("enforcer (masked steps: 1 token per call)", True, 8)):
                run(model, kind, args.samples, enforce, steps)        # compiles every shape the timed run meets
                stats, tokens, seconds = run(model, kind, args.samples, enforce, steps)
                speed.append((label, tokens, seconds, stats["mask_s"], stats["mask_calls"]))
                print(label, tokens, f"{seconds:.1f}s", flush=True)
    big = synthetic_vocab_mask_ms()
    print("synthetic vocab", big, flush=True)
    write(args, rows, speed, big, loss)


def write(args, rows, speed, big, loss):
    lines = ["# Tool-call enforcer: malformed calls with and without it (CPU)", "",
             f"`python experiments/bench_enforcer.py --samples {args.samples} --fit-steps {args.fit_steps}` "
             "(tiny preset, byte tokenizer; 2-core shared CPU). How it is measured: the docstring of "
             "experiments/bench_enforcer.py. Tools: 8 shipped tools "
             f"({', '.join(NAMES)}); enforcer bounds {CONFIG}.", "",
             "| model | enforcer | responses | opened a section | malformed responses | calls attempted | "
             "well-formed calls | malformed-call rate | right tool | mask time (cold cache) | error kinds (responses) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind, enforce, s in rows:
        rate = 1 - s["good"] / s["attempted"] if s["attempted"] else float("nan")
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(s["kinds"].items(), key=lambda kv: -kv[1])) or "-"
        right = f"{s['right_tool']}" if kind == "fitted" else "-"
        mask = f"{1e3 * s['mask_s'] / s['mask_calls']:.2f} ms x {s['mask_calls']}" if s["mask_calls"] else "-"
        lines.append(f"| {kind} | {'on' if enforce else 'off'} | {s['responses']} | {s['sections']} | "
                     f"{s['malformed']} | {s['attempted']} | {s['good']} | {rate:.1%} | {right} | {mask} | {kinds} |")
    lines += ["", f"random: random weights, prompt ending in <|tool_calls_section_begin|>. fitted: {args.fit_steps} "
              f"Adam steps of 8 dialogues (last loss {loss:.3f}) over 48 one-call dialogues; prompts are new requests "
              "and the model opens (or not) a section itself. right tool: responses whose section parses and whose "
              "first call names the tool the request needs (the dialogue generator knows it). mask time: host time "
              "per mask call in that run, the cache empty at its start.", "",
              "Cost (random model, forced sections, same requests and seeds; generated tokens / wall time of the "
              "second of two identical runs, so no compilation is counted and the masks come mostly from the cache "
              "the first run filled; the host mask time is part of the wall time):", "",
              "| decoding | tokens | seconds | tok/s | mask host time | mask calls | ms / call |",
              "|---|---|---|---|---|---|---|"]
    for label, tokens, seconds, mask_s, calls in speed:
        per = f"{1e3 * mask_s / calls:.2f}" if calls else "-"
        lines.append(f"| {label} | {tokens} | {seconds:.1f} | {tokens / seconds:.0f} | {mask_s:.2f} s | {calls} | "
                     f"{per} |")
    lines += ["", f"Large vocabulary (host only): a synthetic KimiTokenizer of {big['vocab']} ids (163,584 random "
              "multi-byte tokens over a JSON-ish alphabet, not the real K2 vocabulary, which this machine does not "
              f"have): VocabIndex built in {big['index_s']:.1f} s; {big['tokens']} masks along 4 uniform walks, "
              f"{big['mean_ms']:.1f} ms per token on average, {big['cold']} computed (cache misses) at "
              f"{big['cold_ms']:.1f} ms on average, {big['cold_max_ms']:.0f} ms at most."]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
