"""The model with the Pallas kernels (interpret mode on CPU) gives the XLA path's logits and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kimi_jax
from kimi_jax import sharding

BASE = kimi_jax.tiny().replace(num_hidden_layers=2, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                               q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                               v_head_dim=16)


def logits_and_grads(cfg, params, ids, seg):
    graphdef, _ = nnx.split(kimi_jax.abstract_model(cfg))

    def loss(p):
        logits = nnx.merge(graphdef, p)(ids, segment_ids=seg)
        return jnp.mean(jnp.where(seg[..., None] > 0, logits, 0.0) ** 2), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, grads


@pytest.fixture(scope="module")
def setup():
    params = nnx.to_pure_dict(nnx.state(kimi_jax.create_model(BASE, seed=2)))
    ids = jax.random.randint(jax.random.key(0), (2, 24), 0, BASE.vocab_size)
    seg = jnp.asarray([[1] * 10 + [2] * 11 + [0] * 3, [1] * 24], jnp.int32)
    return params, ids, seg, logits_and_grads(BASE, params, ids, seg)


@pytest.mark.parametrize("changes", [
    {"attention_impl": "pallas", "pallas_backend": "tpu", "pallas_interpret": True},
    {"moe_impl": "pallas", "pallas_backend": "tpu", "pallas_interpret": True},
])
def test_pallas_paths_match_xla(setup, changes):
    params, ids, seg, (ref_logits, ref_grads) = setup
    logits, grads = logits_and_grads(BASE.replace(**changes), params, ids, seg)
    real = np.asarray(seg) > 0
    np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(ref_logits)[real], atol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(ref_grads)):
        scale = float(jnp.max(jnp.abs(b))) + 1e-12
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-4 * scale, jax.tree_util.keystr(path)


def test_pallas_grouped_matmul_under_expert_parallelism(setup):
    params, ids, seg, (ref_logits, _) = setup
    cfg = BASE.replace(moe_impl="pallas", pallas_backend="tpu", pallas_interpret=True)
    mesh = sharding.make_mesh(1, 1, 2, 1, devices=jax.devices()[:2])
    graphdef, abstract = nnx.split(kimi_jax.abstract_model(cfg, mesh))
    shardings = sharding.state_shardings(abstract, mesh)
    nnx.replace_by_pure_dict(abstract, params)
    state = jax.device_put(abstract, shardings)
    logits = jax.jit(lambda st: nnx.merge(graphdef, st)(ids, segment_ids=seg))(state)
    real = np.asarray(seg) > 0
    np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(ref_logits)[real], atol=1e-5)


@pytest.mark.parametrize("warp_specialized", [False, True])
@pytest.mark.parametrize("kernel", ["attention", "moe"])
def test_gpu_kernels_in_model_match_xla(kernel, warp_specialized):
    """Each Mosaic GPU path (interpret mode, bf16 compute) against the XLA path in bf16: logits and gradients
    within bf16 rounding (the kernels change the summation order). Routing is top-2 of 4 experts. The grouped
    matmul runs with XLA attention, so the MoE layer's input, and with it every top-k choice, is the XLA path's;
    the attention kernel runs in a model of dense layers, where its rounding cannot flip a near-tie choice."""
    cfg = BASE.replace(qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, dtype="bfloat16",
                       n_routed_experts=4, num_experts_per_tok=2)
    if kernel == "attention":
        cfg = cfg.replace(first_k_dense_replace=cfg.num_hidden_layers)
        changes = {"attention_impl": "pallas"}
    else:
        changes = {"moe_impl": "pallas"}
    params = nnx.to_pure_dict(nnx.state(kimi_jax.create_model(cfg, seed=3)))
    ids = jax.random.randint(jax.random.key(1), (2, 24), 0, cfg.vocab_size)
    seg = jnp.asarray([[1] * 10 + [2] * 11 + [0] * 3, [1] * 24], jnp.int32)
    ref_logits, ref_grads = logits_and_grads(cfg, params, ids, seg)
    logits, grads = logits_and_grads(
        cfg.replace(**changes, pallas_backend="gpu", pallas_interpret=True,
                    pallas_warp_specialized=warp_specialized), params, ids, seg)
    real = np.asarray(seg) > 0
    ref = np.asarray(ref_logits, np.float32)[real]
    assert np.max(np.abs(np.asarray(logits, np.float32)[real] - ref)) <= 1.5e-2 * np.max(np.abs(ref))
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(ref_grads)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.max(np.abs(a - b)) <= 5e-2 * (np.max(np.abs(b)) + 1e-12), jax.tree_util.keystr(path)
