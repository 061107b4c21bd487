"""Model settings that must not change the math: remat policies, compute dtype, dense-only and tied variants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kimi_jax

CFG = kimi_jax.tiny().replace(num_hidden_layers=3)


@pytest.fixture(scope="module")
def params_and_grads():
    params = nnx.to_pure_dict(nnx.state(kimi_jax.create_model(CFG, seed=4)))
    ids = jax.random.randint(jax.random.key(1), (2, 16), 0, CFG.vocab_size)
    return params, ids, grads_of(CFG, params, ids)


def grads_of(cfg, params, ids):
    graphdef, _ = nnx.split(kimi_jax.abstract_model(cfg))
    return jax.jit(jax.grad(lambda p: jnp.mean(nnx.merge(graphdef, p)(ids) ** 2)))(params)


@pytest.mark.parametrize("policy", ["full", "dots", "dots_with_no_batch_dims"])
def test_remat_policies_give_the_same_gradients(params_and_grads, policy):
    params, ids, ref = params_and_grads
    got = grads_of(CFG.replace(remat_policy=policy), params, ids)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_bf16_compute_with_fp32_master_weights(params_and_grads):
    params, ids, _ = params_and_grads
    graphdef32, _ = nnx.split(kimi_jax.abstract_model(CFG))
    cfg16 = CFG.replace(dtype="bfloat16")
    graphdef16, _ = nnx.split(kimi_jax.abstract_model(cfg16))
    ref = nnx.merge(graphdef32, params)(ids)
    got = nnx.merge(graphdef16, params)(ids)
    assert got.dtype == jnp.float32                               # logits are fp32 whatever the compute dtype
    assert jax.tree.leaves(params)[0].dtype == jnp.float32
    err = float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))
    assert 0 < err < 0.05                                          # bf16 rounding, not a different model


@pytest.mark.parametrize("changes", [{"first_k_dense_replace": 3}, {"first_k_dense_replace": 0},
                                     {"tie_word_embeddings": True}, {"q_lora_rank": None}])
def test_variants_build_and_run(changes):
    cfg = CFG.replace(**changes)
    model = kimi_jax.create_model(cfg)
    logits, aux = model.forward(jnp.zeros((1, 8), jnp.int32))
    assert logits.shape == (1, 8, cfg.vocab_size) and bool(jnp.all(jnp.isfinite(logits)))
    assert aux["max_logits"].shape == (cfg.num_hidden_layers, cfg.num_attention_heads)
    assert hasattr(model, "moe_layers") == (cfg.num_moe_layers > 0)
    assert hasattr(model, "lm_head") != cfg.tie_word_embeddings
