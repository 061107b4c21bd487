"""The continuous-batching engine against the static `generate`, and its page, sharing and shape bookkeeping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kimi_jax
from kimi_jax import sharding
from kimi_jax.infer import SamplingParams, filter_logits, generate
from kimi_jax.serve import Engine, EngineConfig, Request, RequestError, trace_count
from kimi_jax.serve import forward
from kimi_jax.serve.forward import RowSampling, filter_rows

# initializer_range 0.1 gives peaked logits (magnitude ~4): a wrong page, position or mask changes the argmax.
CFG = kimi_jax.tiny(initializer_range=0.1)
ECFG = EngineConfig(max_slots=4, page_size=8, num_pages=48, max_seq_len=64, prefill_chunk=16)
RNG = np.random.default_rng(0)
PROMPTS = [[int(t) for t in RNG.integers(0, 256, size=n)] for n in (5, 17, 1, 33, 9, 8, 24)]
N = 10


@pytest.fixture(scope="module")
def model():
    return kimi_jax.create_model(CFG, seed=0)


@pytest.fixture(scope="module")
def reference(model):
    return generate(model, PROMPTS, max_new_tokens=N)


def test_greedy_equals_generate_with_requests_arriving_mid_run(model, reference):
    engine = Engine(model, ECFG)
    traces = trace_count()
    ids = [engine.add_request(Request(p, max_tokens=N)) for p in PROMPTS[:3]]
    for _ in range(3):
        engine.step()
    ids += [engine.add_request(Request(p, max_tokens=N)) for p in PROMPTS[3:]]
    running = []
    while engine.has_work:
        engine.step()
        running.append(engine.num_running)
    for row, rid in enumerate(ids):
        out = engine.result(rid).samples[0]
        assert out.tokens == reference.tokens[row].tolist(), f"prompt {row} (length {len(PROMPTS[row])})"
        assert out.finish_reason == "length" and len(out.logprobs) == N
    assert max(running) == 4                                  # 4 slots: requests waited for one, then joined
    assert engine.allocator.num_free == engine.allocator.capacity     # every page back
    assert all(engine.allocator.refcount(p) == 0 for p in range(ECFG.num_pages))
    # Compilations: one per (program, batch bucket, table-width bucket) actually run, never one per request.
    assert trace_count() - traces <= len(engine.shapes_seen) + 1          # + the copy_pages program
    assert len(engine.shapes_seen) <= 2 * 3 * 4          # (decode, prefill) x rows {1, 2, 4} x width {1, 2, 4, 8}


def test_logprobs_are_the_models(model):
    """The returned logprob of each greedy token is log-softmax of the full forward's logits at that point."""
    engine = Engine(model, ECFG)
    rid = engine.add_request(Request(PROMPTS[1], max_tokens=4))
    out = engine.run()[rid].samples[0]
    seq = jnp.asarray([PROMPTS[1] + out.tokens])
    logp = jax.nn.log_softmax(model(seq)[0].astype(jnp.float32), axis=-1)
    start = len(PROMPTS[1]) - 1
    want = [float(logp[start + i, t]) for i, t in enumerate(out.tokens)]
    np.testing.assert_allclose(out.logprobs, want, atol=2e-4)
    assert out.top_logprobs[0][0][0] == out.tokens[0]          # greedy: the best alternative is the token itself
    assert out.top_logprobs[0][0][1] == out.logprobs[0]


def test_shared_prefix_samples_equal_independent_requests(model):
    prompt = PROMPTS[3]                                       # 33 tokens: 4 full shared pages + a partial one
    sampling = dict(max_tokens=6, temperature=1.0, top_k=40, top_p=0.95)
    engine = Engine(model, EngineConfig(max_slots=4, page_size=8, num_pages=64, max_seq_len=64,
                                        prefill_chunk=16))
    group = engine.add_request(Request(prompt, n=4, seed=10, **sampling))
    engine.step()
    shared = engine._groups[group].shared
    assert len(shared) == 4 and all(engine.allocator.refcount(p) == 4 for p in shared)
    engine.run()
    assert engine.stats["prefill_tokens"] == len(prompt) - 1              # the prompt was prefilled once
    samples = engine.result(group).samples
    alone = Engine(model, ECFG)
    ids = [alone.add_request(Request(prompt, seed=10 + i, **sampling)) for i in range(4)]
    alone.run()
    assert alone.stats["prefill_tokens"] == 4 * (len(prompt) - 1)
    for i, rid in enumerate(ids):
        assert samples[i].tokens == alone.result(rid).samples[0].tokens
        np.testing.assert_allclose(samples[i].logprobs, alone.result(rid).samples[0].logprobs, atol=1e-5)
    assert len({tuple(s.tokens) for s in samples}) > 1                   # the samples differ from each other
    assert engine.allocator.num_free == engine.allocator.capacity


def test_stop_tokens_and_abort_free_their_pages(model, reference):
    engine = Engine(model, ECFG, stop_token_ids=[reference.tokens[0][3]])
    rid = engine.add_request(Request(PROMPTS[0], max_tokens=N))
    other = engine.add_request(Request(PROMPTS[4], max_tokens=40))
    engine.step()
    engine.step()
    assert not engine.finished(other)
    events = engine.abort(other)
    assert [(e.request_id, e.finish_reason) for e in events] == [(other, "abort")]
    engine.run()
    out = engine.result(rid).samples[0]
    first_stop = reference.tokens[0].tolist().index(reference.tokens[0][3])
    assert out.tokens == reference.tokens[0][:first_stop + 1].tolist() and out.finish_reason == "stop"
    assert engine.allocator.num_free == engine.allocator.capacity and not engine.has_work


def test_too_large_request_gets_an_error_while_others_continue(model, reference):
    small = EngineConfig(max_slots=4, page_size=8, num_pages=9, max_seq_len=64, prefill_chunk=16)
    engine = Engine(model, small)
    rid = engine.add_request(Request(PROMPTS[0], max_tokens=N))
    with pytest.raises(RequestError, match="more than the whole cache"):
        engine.add_request(Request(PROMPTS[3], max_tokens=30, n=2))
    with pytest.raises(RequestError, match="max_seq_len"):
        engine.add_request(Request(PROMPTS[3], max_tokens=40))
    with pytest.raises(RequestError, match="vocab_size"):
        engine.add_request(Request([1, 2, CFG.vocab_size]))
    # Two requests that fit only one at a time: the second waits for pages, never shares or corrupts them.
    late = engine.add_request(Request(PROMPTS[3], max_tokens=N))
    engine.run()
    assert engine.result(rid).samples[0].tokens == reference.tokens[0].tolist()
    assert engine.result(late).samples[0].tokens == reference.tokens[3].tolist()


def test_weight_versions_swap_between_steps(model, reference):
    engine = Engine(model, ECFG, weight_version=3)
    rid = engine.add_request(Request(PROMPTS[0], max_tokens=N))
    engine.step()
    other = kimi_jax.create_model(CFG, seed=1)
    engine.load_weights(nnx.split(other)[1], version=4)
    events = engine.step()
    assert events and {e.weight_version for e in events} == {4}
    engine.run()
    assert engine.result(rid).samples[0].weight_versions == [3, 4]
    after = engine.add_request(Request(PROMPTS[0], max_tokens=N))
    fresh = Engine(other, ECFG)
    fresh_id = fresh.add_request(Request(PROMPTS[0], max_tokens=N))
    assert engine.run()[after].samples[0].tokens == fresh.run()[fresh_id].samples[0].tokens
    assert engine.result(after).samples[0].tokens != reference.tokens[0].tolist()
    bad = jax.tree.map(lambda a: a.astype(jnp.bfloat16), nnx.split(other)[1])
    with pytest.raises(ValueError, match=r"\['input_layernorm'\]\['weight'\].* is bfloat16"):
        engine.load_weights(bad, version=5)


def test_row_sampling_filters_equal_the_static_ones():
    logits = jax.random.normal(jax.random.PRNGKey(0), (4, 64)) * 3
    logits = logits.at[1, :3].set(10.0)                                   # ties at the top-k boundary
    params = [SamplingParams(1.0, 0, 1.0), SamplingParams(0.7, 2, 1.0), SamplingParams(1.3, 0, 0.8),
              SamplingParams(0.5, 10, 0.5)]
    rows = RowSampling(jnp.array([p.temperature for p in params]), jnp.array([p.top_k for p in params]),
                       jnp.array([p.top_p for p in params]), jnp.zeros(4, jnp.int32), jnp.zeros(4, jnp.int32))
    got = filter_rows(logits, rows)
    for i, p in enumerate(params):
        np.testing.assert_array_equal(got[i], filter_logits(logits[i:i + 1], p)[0])
    assert int(jnp.sum(jnp.isfinite(got[1]))) == 3                        # top-2 keeps the three tied logits


def test_engine_on_a_mesh_equals_unsharded(model, reference):
    """Decode with tensor-parallel attention and expert-parallel MoE (the batch split over `expert`)."""
    mesh = sharding.make_mesh(data=1, fsdp=1, expert=2, tensor=2, devices=jax.devices()[:4])
    sharded = kimi_jax.create_model(CFG, mesh, seed=0)
    engine = Engine(sharded, ECFG)
    ids = [engine.add_request(Request(p, max_tokens=4)) for p in PROMPTS[:3]]
    engine.run()
    for row, rid in enumerate(ids):
        assert engine.result(rid).samples[0].tokens == reference.tokens[row][:4].tolist()


@pytest.mark.slow
def test_paged_pallas_decode_equals_xla(model, reference):
    interpret = kimi_jax.create_model(kimi_jax.tiny(initializer_range=0.1, pallas_backend="tpu",
                                                    pallas_interpret=True), seed=0)
    engine = Engine(interpret, EngineConfig(max_slots=2, page_size=8, num_pages=32, max_seq_len=64,
                                            prefill_chunk=16, decode_impl="pallas"))
    ids = [engine.add_request(Request(p, max_tokens=4)) for p in PROMPTS[:2]]
    engine.run()
    for row, rid in enumerate(ids):
        assert engine.result(rid).samples[0].tokens == reference.tokens[row][:4].tolist()


def test_decode_program_lowers_for_tpu_with_the_paged_kernel():
    """The engine's decode program (bf16, paged Pallas kernel) passes Mosaic's TPU lowering rules."""
    cfg = kimi_jax.tiny(dtype="bfloat16", param_dtype="bfloat16", pallas_backend="tpu")
    engine = Engine(kimi_jax.create_model(cfg, seed=0), EngineConfig(max_slots=4, page_size=16, num_pages=32,
                                                                       max_seq_len=128, decode_impl="pallas"))
    b, width = 4, 8
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)              # noqa: E731
    params = RowSampling(jax.ShapeDtypeStruct((b,), jnp.float32), i32(b), jax.ShapeDtypeStruct((b,), jnp.float32),
                         i32(b), i32(b))
    exported = jax.export.export(forward.decode, platforms=["tpu"])(
        engine.graphdef, engine.state, engine.pool, i32(b), i32(b), i32(b), i32(b, width), params,
        attend=engine.attend, num_steps=2)
    text = exported.mlir_module()
    assert "mla_decode_paged" in text and "tpu_custom_call" in text
