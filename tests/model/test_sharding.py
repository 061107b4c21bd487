"""The model on meshes: same logits (and gradients) as on one device, parameters placed by the rules table."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import kimi_jax
from kimi_jax import sharding

CFG = kimi_jax.tiny()


@pytest.fixture(scope="module")
def reference():
    model = kimi_jax.create_model(CFG, seed=1)
    ids = jax.random.randint(jax.random.key(0), (8, 16), 0, CFG.vocab_size)
    seg = jnp.asarray(np.repeat([[1] * 6 + [2] * 7 + [0] * 3], 8, axis=0), jnp.int32)
    logits, aux = jax.jit(lambda m: m.forward(ids, segment_ids=seg))(model)
    return model, ids, seg, logits, aux


def place(state, cfg, mesh):
    graphdef, abstract = nnx.split(kimi_jax.abstract_model(cfg, mesh))
    return nnx.merge(graphdef, jax.device_put(state, sharding.state_shardings(abstract, mesh)))


@pytest.mark.parametrize("shape, expert_parallel", [
    ((8, 1, 1, 1), False), ((2, 2, 2, 1), True), ((2, 2, 2, 1), False), ((1, 2, 2, 2), True),
    ((1, 2, 2, 2), False), ((2, 1, 4, 1), True)])
def test_same_logits_on_meshes(reference, shape, expert_parallel):
    model, ids, seg, ref_logits, ref_aux = reference
    cfg = CFG.replace(expert_parallel=expert_parallel)
    sharded = place(nnx.state(model), cfg, sharding.make_mesh(*shape))
    logits, aux = jax.jit(lambda m: m.forward(ids, segment_ids=seg))(sharded)
    np.testing.assert_allclose(logits, ref_logits, atol=2e-5)
    np.testing.assert_allclose(aux["max_logits"], ref_aux["max_logits"], rtol=1e-5)
    np.testing.assert_array_equal(aux["expert_counts"], ref_aux["expert_counts"])


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_expert_parallel_gradients(reference, capacity_factor):
    """Dropless EP gives the single-device gradients; a small EP capacity drops tokens (changes the loss)."""
    model, ids, seg, _, _ = reference
    cfg = CFG.replace(expert_parallel_capacity_factor=capacity_factor)

    def loss(params, graphdef):
        return jnp.mean(nnx.merge(graphdef, params)(ids, segment_ids=seg) ** 2)

    graphdef, params = nnx.split(model)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, graphdef)
    sharded = place(params, cfg, sharding.make_mesh(1, 2, 2, 2))
    graphdef_s, params_s = nnx.split(sharded)
    got_loss, got_grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params_s, graphdef_s)
    if capacity_factor is None:
        np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)
    else:
        assert abs(float(got_loss) - float(ref_loss)) > 1e-6


def test_parameter_partition_specs():
    mesh = sharding.make_mesh(1, 2, 2, 2)
    specs = sharding.state_specs(nnx.state(kimi_jax.abstract_model(CFG, mesh)), mesh)
    assert specs["embed_tokens"]["embedding"] == P("tensor", "fsdp")
    assert specs["lm_head"]["kernel"] == P("fsdp", "tensor")
    assert specs["norm"]["weight"] == P(None)
    attn = specs["moe_layers"]["self_attn"]
    assert attn["q_a_proj"]["kernel"] == P(None, "fsdp", None)
    assert attn["q_b_proj"]["kernel"] == P(None, None, "tensor")
    assert attn["kv_b_proj"]["kernel"] == P(None, None, "tensor")
    assert attn["o_proj"]["kernel"] == P(None, "tensor", "fsdp")
    mlp = specs["moe_layers"]["mlp"]
    assert mlp["experts"]["gate_proj"] == P(None, "expert", "fsdp", "tensor")
    assert mlp["experts"]["down_proj"] == P(None, "expert", "tensor", "fsdp")
    assert mlp["gate"]["kernel"] == P(None, "fsdp", None)
    assert mlp["gate"]["e_score_correction_bias"] == P(None, None)
    assert specs["dense_layers"]["mlp"]["up_proj"]["kernel"] == P(None, "fsdp", "tensor")


def test_created_sharded_without_a_full_copy():
    mesh = sharding.make_mesh(1, 2, 2, 2)
    model = kimi_jax.create_model(CFG, mesh)
    experts = model.moe_layers.mlp.experts.gate_proj[...]
    assert experts.sharding.spec == P(None, "expert", "fsdp", "tensor")
    shard = experts.addressable_shards[0].data
    assert shard.shape == (CFG.num_moe_layers, CFG.n_routed_experts // 2, CFG.hidden_size // 2,
                           CFG.moe_intermediate_size // 2)


@pytest.mark.parametrize("shape, field", [((1, 1, 1, 8), "num_attention_heads"),
                                          ((1, 1, 8, 1), None)])
def test_mesh_errors_name_the_field(shape, field):
    mesh = sharding.make_mesh(*shape)
    if field is None:  # 8 experts over an expert axis of 8 is fine
        kimi_jax.abstract_model(CFG, mesh)
    else:
        with pytest.raises(ValueError, match=field):
            kimi_jax.abstract_model(CFG, mesh)
    with pytest.raises(ValueError, match="n_routed_experts"):
        kimi_jax.abstract_model(CFG.replace(n_routed_experts=4, num_experts_per_tok=2), sharding.make_mesh(1, 1, 8, 1))
    with pytest.raises(ValueError, match="number of devices"):
        sharding.make_mesh(2, 2, 1, 1)


def test_batch_not_divisible_by_mesh(reference):
    model, ids, _, _, _ = reference
    sharded = place(nnx.state(model), CFG, sharding.make_mesh(8, 1, 1, 1))
    with pytest.raises(ValueError, match="batch size 4"):
        sharded(ids[:4])


def abstract_inputs(cfg, mesh, batch, seq):
    graphdef, state = nnx.split(kimi_jax.abstract_model(cfg, mesh))
    shardings = sharding.state_shardings(state, mesh)
    state = jax.tree.map(lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)),
                         state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32,
                               sharding=jax.NamedSharding(mesh, P(("data", "fsdp", "expert"))))
    return graphdef, state, ids


def test_kimi_k2_lowers_on_a_fake_mesh():
    """The full 1T model, built abstractly (nothing allocated), lowers and compiles for a sharded forward pass,
    with every device holding ~1/8 of the parameters."""
    cfg = kimi_jax.kimi_k2_1t(dtype="bfloat16", param_dtype="bfloat16", remat_policy="dots")
    mesh = sharding.make_mesh(1, 2, 2, 2)
    graphdef, state, ids = abstract_inputs(cfg, mesh, 8, 4096)
    n = sum(np.prod(v.shape) for v in jax.tree.leaves(state))
    assert n == kimi_jax.count_params(cfg)["total"]
    lowered = jax.jit(lambda st, i: nnx.merge(graphdef, st).forward(i)).lower(state, ids)
    out = lowered.out_info[0]
    assert out.shape == (8, 4096, cfg.vocab_size) and out.dtype == jnp.float32
    assert "all-to-all" in lowered.as_text() or "all_to_all" in lowered.as_text()
    per_device = lowered.compile().memory_analysis().argument_size_in_bytes
    assert per_device == pytest.approx(2 * n / 8, rel=0.03)            # bf16 parameters, fully sharded


def test_compiled_size_does_not_grow_with_depth():
    mesh = sharding.make_mesh(8, 1, 1, 1)
    sizes = []
    for layers in (3, 12):
        cfg = CFG.replace(num_hidden_layers=layers)
        graphdef, state, ids = abstract_inputs(cfg, mesh, 8, 16)
        text = jax.jit(lambda st, i: nnx.merge(graphdef, st)(i)).lower(state, ids).as_text()
        sizes.append(len(text))
    assert abs(sizes[1] - sizes[0]) < 0.02 * sizes[0]
