"""Chunked cross entropy: the same loss and gradients as full fp32 logits + logsumexp, on one device and on a
mesh, without [tokens, vocab] temporaries; the train step gives the same result with and without it."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from experiments.configs import small
from experiments.configs.base import override
from kimi_jax import sharding
from kimi_jax.train import loop
from kimi_jax.train.cross_entropy import chunked_cross_entropy
from kimi_jax.train.step import cross_entropy, make_train_step


def plain_cross_entropy(x, kernel, targets, mask):
    """The reference: the full fp32 logits (as Transformer.logits), then step.cross_entropy."""
    return cross_entropy(jnp.dot(x, kernel.astype(x.dtype), preferred_element_type=jnp.float32), targets, mask)


def inputs(b=4, s=37, h=16, vocab=300, dtype=jnp.float32, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(k[0], (b, s, h)).astype(dtype)
    kernel = (0.3 * jax.random.normal(k[1], (h, vocab))).astype(dtype)
    targets = jax.random.randint(k[2], (b, s), 0, vocab)
    mask = (jax.random.uniform(k[3], (b, s)) > 0.3).astype(jnp.float32)
    return x, kernel, targets, mask


def loss_and_grads(fn, x, kernel, targets, mask, **kw):
    def loss(x, kernel):
        total, n = fn(x, kernel, targets, mask, **kw)
        return total / n, n
    (value, n), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, kernel)
    return value, n, grads


def assert_close(got, want, rtol, atol):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=rtol, atol=atol)


@pytest.mark.parametrize("chunk", [1, 8, 10, 37, 512])   # 37 tokens: padded blocks for 8 and 10; 1 block for 512
def test_fp32_matches_full_logits(chunk):
    args = inputs()
    want = loss_and_grads(plain_cross_entropy, *args)
    got = loss_and_grads(chunked_cross_entropy, *args, chunk_tokens=chunk)
    assert float(got[1]) == float(want[1]) == float(jnp.sum(args[3]))
    assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_bf16_matches_full_logits():
    args = inputs(s=45, vocab=1000, dtype=jnp.bfloat16)
    want = loss_and_grads(plain_cross_entropy, *args)
    got = loss_and_grads(chunked_cross_entropy, *args, chunk_tokens=16)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)          # fp32 logits and logsumexp in both
    for g, w in zip(got[2], want[2]):   # bf16 rounding (of the logit cotangent, of the outputs): about an ulp
        assert g.dtype == w.dtype == jnp.bfloat16
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        np.testing.assert_allclose(g, w, rtol=2e-2, atol=2e-2 * np.abs(w).max())


def test_fp32_master_kernel_gets_an_fp32_gradient():
    x, kernel, targets, mask = inputs(dtype=jnp.bfloat16)
    kernel32 = kernel.astype(jnp.float32)
    want = loss_and_grads(plain_cross_entropy, x, kernel32, targets, mask)     # plain casts to bf16 inside too
    got = loss_and_grads(chunked_cross_entropy, x, kernel32, targets, mask, chunk_tokens=8)
    assert got[2][1].dtype == jnp.float32
    assert_close(got, want, rtol=1e-2, atol=1e-3)


def test_all_masked_and_nan_mask():
    x, kernel, targets, mask = inputs()
    total, n = chunked_cross_entropy(x, kernel, targets, jnp.zeros_like(mask), chunk_tokens=8)
    assert float(total) == 0.0 and float(n) == 0.0
    grads = jax.grad(lambda x, k: chunked_cross_entropy(x, k, targets, jnp.zeros_like(mask))[0], (0, 1))(x, kernel)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in grads)
    total, _ = chunked_cross_entropy(x, kernel, targets, mask * jnp.nan, chunk_tokens=8)
    assert np.isnan(float(total))                                   # as the plain loss: the step is skipped


def test_mask_gradient():
    x, kernel, targets, mask = inputs()
    want = jax.grad(lambda m: plain_cross_entropy(x, kernel, targets, m)[0])(mask)
    got = jax.grad(lambda m: chunked_cross_entropy(x, kernel, targets, m, chunk_tokens=8)[0])(mask)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("axes", [(2, 2, 1, 2), (1, 2, 2, 2), (8, 1, 1, 1), (1, 1, 1, 8)])
@pytest.mark.parametrize("with_mesh", [False, True])
def test_sharded_matches_single_device(axes, with_mesh):
    mesh = sharding.make_mesh(*axes)
    x, kernel, targets, mask = inputs(b=8, s=21, vocab=512)
    want = loss_and_grads(plain_cross_entropy, x, kernel, targets, mask)
    rows = NamedSharding(mesh, P(("data", "fsdp", "expert")))
    x_s, targets_s, mask_s = (jax.device_put(a, rows) for a in (x, targets, mask))
    kernel_s = jax.device_put(kernel, NamedSharding(mesh, P("fsdp", "tensor")))
    got = loss_and_grads(chunked_cross_entropy, x_s, kernel_s, targets_s, mask_s, chunk_tokens=8,
                         mesh=mesh if with_mesh else None)
    assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got[2][0].sharding.is_equivalent_to(rows, 3)


def test_sharded_kernel_gradient_is_reduced_once():
    """With the mesh, the blocks' kernel gradients are summed per batch shard and reduced over the batch axes
    after the scan: no collective of kernel size inside the loop (only the small [tokens, hidden] one of dx)."""
    mesh = sharding.make_mesh(2, 2, 1, 2)
    b, s, h, vocab = 8, 64, 16, 512
    sds = lambda shape, dtype, spec: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))
    rows = P(("data", "fsdp"))
    args = (sds((b, s, h), jnp.float32, rows), sds((h, vocab), jnp.float32, P("fsdp", "tensor")),
            sds((b, s), jnp.int32, rows), sds((b, s), jnp.float32, rows))
    f = jax.jit(jax.grad(lambda x, k, t, m: chunked_cross_entropy(x, k, t, m, chunk_tokens=16, mesh=mesh)[0],
                         argnums=(0, 1)))
    computations, name = {}, None
    for line in f.lower(*args).compile().as_text().splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            name = "ENTRY" if line.startswith("ENTRY") else line.split()[0].lstrip("%")
            computations[name] = []
        elif name is not None:
            computations[name].append(line)
    loop_bodies = {body for lines in computations.values() for line in lines
                   for body in re.findall(r"body=%?([\w.\-]+)", line)}
    assert len(loop_bodies) == 2                                 # the forward and the backward scan
    collectives = lambda lines: [line for line in lines
                                 if any(op in line for op in ("all-reduce(", "all-gather(", "reduce-scatter("))]
    kernel_sized = f"{h},{vocab // 2}]"                          # the kernel's tensor shard, gathered over fsdp
    for body in loop_bodies:
        assert collectives(computations[body])                  # the logsumexp and dx reductions over tensor
        assert not [line for line in collectives(computations[body]) if kernel_sized in line]
    gathers = [line for line in collectives(computations["ENTRY"]) if "all-gather(" in line and kernel_sized in line]
    assert len(gathers) == 1                                     # the kernel's fsdp shards: once


def compiled_temp_bytes(fn, b, s, h, vocab, **kw):
    sds = jax.ShapeDtypeStruct
    args = (sds((b, s, h), jnp.bfloat16), sds((h, vocab), jnp.float32), sds((b, s), jnp.int32),
            sds((b, s), jnp.float32))
    f = jax.jit(jax.value_and_grad(lambda x, k, t, m: fn(x, k, t, m, **kw)[0], argnums=(0, 1)))
    return f.lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_temp_memory_does_not_grow_with_tokens_times_vocab():
    """Kimi K2's vocabulary, hidden 16, 2 x 2048 and 2 x 4096 tokens (abstract: nothing is allocated)."""
    vocab, h, chunk = 163840, 16, 256
    block_logits = 2 * chunk * vocab * 4                          # one block's fp32 logits: 335 MB
    small_t, large_t = (compiled_temp_bytes(chunked_cross_entropy, 2, s, h, vocab, chunk_tokens=chunk)
                        for s in (2048, 4096))
    plain = compiled_temp_bytes(plain_cross_entropy, 2, 2048, h, vocab)
    added = 2 * 2048 * vocab * 4                                  # the added tokens' fp32 logits: 2.7 GB
    assert plain >= added                                         # the full logits (and their gradient)
    assert large_t - small_t < added / 100, (small_t, large_t)
    assert large_t < 3 * block_logits, (large_t, block_logits)    # logits + softmax of one block, no more
    assert small_t < plain / 5, (small_t, plain)


def step_setup(mesh_axes, **overrides):
    config = override(small.get_config(), {"mesh.data": mesh_axes[0], "mesh.fsdp": mesh_axes[1],
                                           "mesh.expert": mesh_axes[2], "mesh.tensor": mesh_axes[3],
                                           **overrides})
    cfg = loop.model_config(config.model)
    mesh = loop.make_mesh(config.mesh)
    graphdef, state, tx, lr = loop.init_state(config, cfg, mesh)
    data = loop.data_input.make_input(config.data, cfg, seed=0)
    batch = {k: jnp.asarray(v) for k, v in next(data).items()}
    return cfg, graphdef, state, tx, lr, batch


@pytest.mark.parametrize("mesh_axes,overrides", [
    ((2, 2, 1, 2), {}),
    pytest.param((2, 1, 2, 2), {"model.tie_word_embeddings": True, "train.microbatches": 2},
                 marks=pytest.mark.slow),
])
def test_train_step_same_with_and_without_chunking(mesh_axes, overrides):
    cfg, graphdef, state, tx, lr, batch = step_setup(mesh_axes, **overrides)
    microbatches = overrides.get("train.microbatches", 1)
    full = jax.jit(make_train_step(graphdef, cfg, tx, lr, microbatches=microbatches, qk_clip_tau=100.0,
                                   ce_chunk=None))
    chunked = jax.jit(make_train_step(graphdef, cfg, tx, lr, microbatches=microbatches, qk_clip_tau=100.0,
                                      ce_chunk=24))                   # seq 64: 3 blocks of 22 (2 padded)
    s1, m1 = full(state, batch)
    s2, m2 = chunked(state, batch)
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-5)
    assert float(m2["tokens"]) == float(m1["tokens"])
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(a, b, atol=1e-5)
