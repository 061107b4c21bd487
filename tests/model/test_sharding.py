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


def test_expert_parallel_gradients(reference):
    """Dropless EP gives the single-device gradients (capacity drops: test_moe.py, exactly)."""
    model, ids, seg, _, _ = reference
    cfg = CFG

    def loss(params, graphdef):
        return jnp.mean(nnx.merge(graphdef, params)(ids, segment_ids=seg) ** 2)

    graphdef, params = nnx.split(model)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, graphdef)
    sharded = place(params, cfg, sharding.make_mesh(1, 2, 2, 2))
    graphdef_s, params_s = nnx.split(sharded)
    got_loss, got_grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params_s, graphdef_s)
    np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


def test_parameter_partition_specs():
    mesh = sharding.make_mesh(1, 2, 2, 2)
    specs = sharding.state_specs(nnx.state(kimi_jax.abstract_model(CFG, mesh)), mesh)
    batch = ("fsdp", "expert")
    assert specs["embed_tokens"]["embedding"] == P("tensor", batch)
    assert specs["lm_head"]["kernel"] == P(batch, "tensor")
    assert specs["norm"]["weight"] == P(batch)
    attn = specs["moe_layers"]["self_attn"]
    assert attn["q_a_proj"]["kernel"] == P(None, batch + ("tensor",))              # filled: divides 128
    assert attn["q_b_proj"]["kernel"] == P(None, batch, "tensor")
    assert attn["kv_b_proj"]["kernel"] == P(None, batch, "tensor")
    assert attn["o_proj"]["kernel"] == P(None, "tensor", batch)
    mlp = specs["moe_layers"]["mlp"]
    assert mlp["experts"]["gate_proj"] == P(None, "expert", "fsdp", "tensor")
    assert mlp["experts"]["down_proj"] == P(None, "expert", "tensor", "fsdp")
    assert mlp["gate"]["kernel"] == P(None, batch + ("tensor",))
    assert mlp["gate"]["e_score_correction_bias"] == P()
    assert specs["dense_layers"]["mlp"]["up_proj"]["kernel"] == P(None, batch, "tensor")


# Mesh axes a parameter may leave unused although one of its dimensions is divisible by them, with the reason.
EXCEPTIONS = {
    "data": "pure data parallelism: every data replica holds the parameters (use fsdp to shard them)",
    "layers": "the scanned layer axis: a layer's slice must be spread over all devices, not held by a few",
    "e_score_correction_bias": "the router's [E] bias: read whole by every device's routing, 0.01% of K2",
    ("weight", "tensor"): "RMSNorm weights stay whole over `tensor`, whose devices hold whole activations",
}


def unused_dividing_axes(path, shape, spec, mesh_shape):
    """Mesh axes (other than the exceptions) that the spec leaves unused while some dimension, apart from the
    layer axis, could still be split by them."""
    dims = [sharding.spec_axes(e) for e in list(spec) + [None] * (len(shape) - len(spec))]
    used = {a for d in dims for a in d}
    missing = []
    for axis, size in mesh_shape.items():
        if (size == 1 or axis in used or axis in EXCEPTIONS or any(p in EXCEPTIONS for p in path)
                or (path[-1], axis) in EXCEPTIONS):
            continue
        first = 1 if path[0] in ("dense_layers", "moe_layers") else 0
        if any(shape[i] % (np.prod([mesh_shape[a] for a in dims[i]]) * size) == 0
               for i in range(first, len(shape))):
            missing.append(axis)
    return missing


def per_device_parameters(cfg, mesh_shape):
    """{path: (shape, spec, per-device shard shape)} of every parameter of cfg on an AbstractMesh."""
    mesh = jax.sharding.AbstractMesh(mesh_shape, sharding.MESH_AXES,
                                     axis_types=(jax.sharding.AxisType.Auto,) * 4)
    state = nnx.state(kimi_jax.abstract_model(cfg, mesh))
    shardings = dict(nnx.to_flat_state(sharding.state_shardings(state, mesh, sharding.rules_for(cfg))))
    return {path: (sharding.value_of(v).shape, shardings[path].spec,
                   shardings[path].shard_shape(sharding.value_of(v).shape))
            for path, v in nnx.to_flat_state(state)}


@pytest.mark.parametrize("mesh_shape", [(1, 64, 16, 1), (1, 128, 8, 1), (2, 16, 8, 4), (8, 1, 1, 1),
                                        (2, 2, 2, 1), (1, 2, 4, 1), (1, 1, 8, 1)])
def test_every_large_leaf_split_over_every_dividing_axis(mesh_shape):
    """K2 parameters (and, optimizer state mirroring them, their moments): each leaf above 1 MiB is split over
    every mesh axis that divides it, the exceptions above aside."""
    shape_by_axis = dict(zip(sharding.MESH_AXES, mesh_shape))
    for path, (shape, spec, _) in per_device_parameters(kimi_jax.kimi_k2_1t(), mesh_shape).items():
        if np.prod(shape) * 4 > 2 ** 20:
            assert not unused_dividing_axes(path, shape, spec, shape_by_axis), (path, shape, spec)


@pytest.mark.parametrize("mesh_shape", [(1, 64, 16, 1), (1, 128, 8, 1)])
def test_k2_parameters_per_device_are_the_ideal_share(mesh_shape):
    """Per device, expert and non-expert parameters are each within 5% of total / devices."""
    devices = np.prod(mesh_shape)
    total, local = {True: 0, False: 0}, {True: 0, False: 0}
    for path, (shape, _, shard) in per_device_parameters(kimi_jax.kimi_k2_1t(), mesh_shape).items():
        total["experts" in path] += np.prod(shape)
        local["experts" in path] += np.prod(shard)
    for expert in (True, False):
        assert local[expert] == pytest.approx(total[expert] / devices, rel=0.05), expert


def test_strategies_are_the_config_choices():
    from kimi_jax.config import SHARDING_STRATEGIES
    assert tuple(sharding.STRATEGIES) == SHARDING_STRATEGIES
    cfg = kimi_jax.kimi_k2_1t(sharding_strategy="fsdp_tp")
    params = per_device_parameters(cfg, (1, 64, 16, 1))
    shape, spec, _ = params[("moe_layers", "self_attn", "q_b_proj", "kernel")]
    assert spec == P(None, "fsdp")                           # non-expert weights not split over `expert`
    assert params[("moe_layers", "mlp", "experts", "gate_proj")][1] == P(None, "expert", "fsdp")
    with pytest.raises(ValueError, match="sharding_strategy"):
        kimi_jax.tiny(sharding_strategy="zero9")


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
    assert per_device == pytest.approx(2 * n / 8, rel=0.002)           # bf16 parameters, fully sharded


def test_compiled_size_does_not_grow_with_depth():
    mesh = sharding.make_mesh(8, 1, 1, 1)
    sizes = []
    for layers in (3, 12):
        cfg = CFG.replace(num_hidden_layers=layers)
        graphdef, state, ids = abstract_inputs(cfg, mesh, 8, 16)
        text = jax.jit(lambda st, i: nnx.merge(graphdef, st)(i)).lower(state, ids).as_text()
        sizes.append(len(text))
    assert abs(sizes[1] - sizes[0]) < 0.02 * sizes[0]
