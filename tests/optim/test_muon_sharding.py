"""MuonClip under sharding (8 fake CPU devices): equal to unsharded; Newton-Schulz shares each leaf's matrices
out over all devices (per-device flops and temporaries an even share) and never leaves its expert."""

import math
import re
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from kimi_jax.optim import muonclip, newton_schulz, newton_schulz_shardings, qk_clip
from kimi_jax.sharding import logical_to_spec, make_mesh
from optim_testlib import K2, TINY, nest, random_tree, spec

CFG = SimpleNamespace(**{**vars(TINY), "n_routed_experts": 8, "num_attention_heads": 4})
# One leaf of each kind (keeps compile time down): AdamW table and vectors, the frozen bias, a one-layer stack
# (a single matrix: one device orthogonalises it), a two-layer stack, the router, an expert stack.
LEAVES = ("embed_tokens.embedding", "norm.weight", "moe_layers.input_layernorm.weight",
          "moe_layers.mlp.gate.e_score_correction_bias", "dense_layers.self_attn.kv_b_proj.kernel",
          "moe_layers.self_attn.q_b_proj.kernel", "moe_layers.mlp.gate.kernel", "moe_layers.mlp.experts.down_proj")
MESHES = [(1, 2, 2, 2), (2, 1, 4, 1), (1, 1, 8, 1), (1, 4, 1, 2)]
COLLECTIVE = re.compile(r"^\s*\S+ = .*?\b(all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter)"
                        r"(?:-start)?\(.*?replica_groups=(mesh\[[^\]]*\] \{[^}]*\}|\{[^ ]*\}|\[[^ ]+)", re.M)


def leaves_spec():
    return {k: spec(CFG)[k] for k in LEAVES}


def shardings_for(mesh):
    return nest({k: NamedSharding(mesh, logical_to_spec(axes, mesh, shape=shape))
                 for k, (shape, axes) in leaves_spec().items()})


def axes_for():
    return nest({k: axes for k, (_, axes) in leaves_spec().items()})


def random_leaves(seed):
    rng = np.random.default_rng(seed)
    return nest({k: rng.standard_normal(shape).astype(np.float32) for k, (shape, _) in leaves_spec().items()})


def replica_groups(text: str, mesh) -> list[tuple[str, list[list[tuple[int, ...]]]]]:
    """(op, groups of mesh coordinates) for every collective in compiled HLO text."""
    out = []
    names = list(mesh.axis_names)
    for op, groups in COLLECTIVE.findall(text):
        if groups.startswith("mesh["):
            axes = re.findall(r"'(\w+)'", groups.split("{")[1])
            coords = np.indices(mesh.devices.shape).reshape(len(names), -1).T
            keep = [i for i, n in enumerate(names) if n not in axes]
            rows: dict = {}
            for c in coords:
                rows.setdefault(tuple(c[keep]), []).append(tuple(c))
            out.append((op, list(rows.values())))
            continue
        m = re.match(r"\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", groups)
        if m:
            ids = np.arange(int(np.prod([int(d) for d in m.group(3).split(",")]))).reshape(
                [int(d) for d in m.group(3).split(",")])
            if m.group(4):
                ids = ids.transpose([int(p) for p in m.group(4).split(",")])
            ids = ids.reshape(int(m.group(1)), int(m.group(2)))
        else:
            ids = [[int(i) for i in g.split(",")] for g in re.findall(r"\{([\d,]+)\}", groups)]
        out.append((op, [[np.unravel_index(i, mesh.devices.shape) for i in g] for g in ids]))
    return out


def expert_mixing(text: str, mesh) -> list[str]:
    """Collectives whose groups contain devices with different `expert` coordinates."""
    e = list(mesh.axis_names).index("expert")
    return [op for op, groups in replica_groups(text, mesh) if any(len({c[e] for c in g}) > 1 for g in groups)]


def run_steps(tx, params, grads, in_shardings=None):
    step = jax.jit(tx.update) if in_shardings is None else jax.jit(
        tx.update, in_shardings=(in_shardings, None, in_shardings))
    state, p = tx.init(params), params
    for g in grads:
        u, state = step(g, state, p)
        p = optax.apply_updates(p, u)
    return p, u


@pytest.fixture(scope="module")
def problem():
    params, grads = random_leaves(3), [random_leaves(4), random_leaves(5)]
    tx = muonclip(1e-2, ns_dtype=jnp.float32, axes=axes_for())
    return params, grads, run_steps(tx, params, grads)[0]


@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_equals_unsharded(problem, mesh_shape):
    params, grads, want = problem
    mesh = make_mesh(*mesh_shape)
    shardings = shardings_for(mesh)
    tx = muonclip(1e-2, ns_dtype=jnp.float32, axes=axes_for(), shardings=shardings)
    put = lambda tree: jax.device_put(tree, shardings)
    got, last_update = run_steps(tx, put(params), [put(g) for g in grads], shardings)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6, err_msg=str(path))
    want_sharding = shardings["moe_layers"]["mlp"]["experts"]["down_proj"]
    stack = last_update["moe_layers"]["mlp"]["experts"]["down_proj"]
    assert stack.sharding.is_equivalent_to(want_sharding, stack.ndim)
    momentum = tx.init(put(params)).inner_states["muon"].inner_state[0].momentum
    assert momentum["moe_layers"]["mlp"]["experts"]["down_proj"].sharding.is_equivalent_to(want_sharding, 4)


def experts_only(tree: dict) -> dict:
    """The routed-expert stacks of a nested dict (the leaves under an `experts` key)."""
    out = {}
    for key, value in tree.items():
        sub = value if key == "experts" else experts_only(value) if isinstance(value, dict) else None
        if sub:
            out[key] = sub
    return out


def update_hlo(tx, params) -> str:
    state = jax.eval_shape(tx.init, params)
    return jax.jit(tx.update).lower(params, state, params).compile().as_text()


def test_update_hlo_never_mixes_experts():
    """The update of an expert stack never exchanges data between expert shards. (The other matrices are split
    over `expert` too, like over fsdp, so their Newton-Schulz does.)"""
    mesh = make_mesh(1, 2, 2, 2)
    shardings = shardings_for(mesh)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=s),
                            random_leaves(0), shardings)
    text = update_hlo(muonclip(1e-2, axes=axes_for(), shardings=shardings), abstract)
    assert replica_groups(text, mesh), "the parser found no collectives: the HLO format changed or nothing is sharded"
    text = update_hlo(muonclip(1e-2, axes=experts_only(axes_for()), shardings=shardings), experts_only(abstract))
    assert replica_groups(text, mesh), "the expert stack's update has no collectives"
    assert expert_mixing(text, mesh) == []


def test_k2_expert_stack_stays_local():
    """The K2 routed-expert stack [60, 384, 7168, 2048] on (fsdp 2, expert 2, tensor 2): lowers, compiles, and
    Newton-Schulz only exchanges fsdp/tensor slices inside each expert shard (all-to-alls); per-device
    temporaries stay a small multiple of the local shard."""
    mesh = make_mesh(1, 2, 2, 2)
    shape, axes = spec(K2)["moe_layers.mlp.experts.gate_proj"]
    sharding = NamedSharding(mesh, logical_to_spec(axes, mesh, shape=shape))
    x = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)
    # Each expert shard's 60 x 192 matrices go to its 4 fsdp x tensor devices, 2,880 each.
    assert [s.spec for s in newton_schulz_shardings(shape, sharding)] == [P(("expert", "fsdp", "tensor"), None, None)]
    compiled = jax.jit(lambda g: newton_schulz(g, sharding=sharding)).lower(x).compile()
    text = compiled.as_text()
    assert expert_mixing(text, mesh) == []
    assert {op for op, _ in replica_groups(text, mesh)} == {"all-to-all"}
    local_bytes = np.prod(shape) * 4 // 8
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < 4 * local_bytes, (temp, local_bytes)


def test_qk_clip_sharded_equals_unsharded():
    params = random_tree(CFG, seed=5)
    s_max = jnp.asarray(np.random.default_rng(6).uniform(50, 150, (3, 4)), jnp.float32)
    want, _ = qk_clip(params, s_max, config=CFG)
    mesh = make_mesh(1, 2, 2, 2)
    shardings = nest({k: NamedSharding(mesh, logical_to_spec(axes, mesh, shape=shape))
                      for k, (shape, axes) in spec(CFG).items()})
    got, _ = jax.jit(lambda p, m: qk_clip(p, m, config=CFG), in_shardings=(shardings, None))(
        jax.device_put(params, shardings), s_max)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_one_shot_reshard_would_gather_experts():
    """The check above can fail: moving fsdp and tensor off the matrix axes in one constraint (instead of one
    mesh axis per step) makes XLA replicate the whole stack, expert axis included."""
    mesh = make_mesh(1, 2, 2, 2)
    sharding = NamedSharding(mesh, P(None, "expert", "fsdp", "tensor"))
    one_shot = NamedSharding(mesh, P(None, ("expert", "fsdp", "tensor"), None, None))
    x = jax.ShapeDtypeStruct((3, 8, 12, 20), jnp.float32, sharding=sharding)
    text = jax.jit(lambda g: jax.lax.with_sharding_constraint(g, one_shot) * 2).lower(x).compile().as_text()
    assert "all-gather" in expert_mixing(text, mesh)
    stepwise = jax.jit(lambda g: newton_schulz(g, dtype=jnp.float32, sharding=sharding)).lower(x)
    assert expert_mixing(stepwise.compile().as_text(), mesh) == []


def test_real_tiny_model_shardings_compile():
    """The model's own tiny tree and `state_shardings` feed muonclip directly; the expert stacks' update keeps
    experts local."""
    from flax import nnx

    from kimi_jax.config import tiny
    from kimi_jax.model import abstract_model
    from kimi_jax.sharding import state_shardings

    mesh = make_mesh(1, 2, 2, 2)
    state = nnx.state(abstract_model(tiny(), mesh), nnx.Param)
    shardings = state_shardings(state, mesh)
    axes = jax.tree.map(lambda v: v.get_metadata()["axes"], state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nnx.to_pure_dict(state), nnx.to_pure_dict(shardings))
    axes = nnx.to_pure_dict(axes)
    text = update_hlo(muonclip(1e-3, axes=axes, shardings=shardings), params)
    assert "all-to-all" in {op for op, _ in replica_groups(text, mesh)}
    assert experts_only(params), "the tiny model has no `experts` stacks"
    text = update_hlo(muonclip(1e-3, axes=experts_only(axes), shardings=shardings), experts_only(params))
    assert expert_mixing(text, mesh) == []


# (leaf shape, mesh (data, fsdp, expert, tensor), spec): stacks whose mesh axes divide no batch axis, replicated
# mesh axes, a single matrix, fewer matrices than devices, tall matrices (transposed), two mesh axes on one matrix
# axis, both matrix axes split, a stack split on its batch axes only.
NS_CASES = [
    ((3, 8, 64, 32), (1, 4, 2, 1), P(None, "expert", "fsdp", None)),
    ((5, 4, 64, 32), (1, 4, 2, 1), P(None, "expert", "fsdp", None)),
    ((3, 64, 48), (2, 2, 2, 1), P(None, "fsdp", "tensor")),
    ((16, 64, 32), (2, 2, 2, 1), P(None, "fsdp", None)),
    ((64, 32), (1, 2, 2, 2), P("fsdp", "tensor")),
    ((5, 48, 64), (1, 2, 1, 4), P(None, ("fsdp", "tensor"), None)),
    ((2, 4, 24, 40), (1, 2, 2, 2), P(None, "expert", "fsdp", "tensor")),
    ((10, 16, 24), (2, 2, 2, 1), P()),
    ((8, 16, 24), (1, 2, 2, 2), P(("fsdp", "expert", "tensor"))),
]


def case_id(case):
    shape, mesh_shape, s = case
    return f"{'x'.join(map(str, shape))}-mesh{''.join(map(str, mesh_shape))}-{s}".replace(" ", "")


@pytest.mark.parametrize("case", NS_CASES, ids=case_id)
def test_distributed_newton_schulz_equals_unsharded(case):
    shape, mesh_shape, s = case
    sharding = NamedSharding(make_mesh(*mesh_shape), s)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    want = np.asarray(newton_schulz(jnp.asarray(x), dtype=jnp.float32))
    got = jax.jit(lambda g: newton_schulz(g, dtype=jnp.float32, sharding=sharding))(jax.device_put(x, sharding))
    assert got.sharding.is_equivalent_to(sharding, len(shape))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=2e-6)


def ns_cost(shape, sharding=None) -> tuple[float, int]:
    """(flops, temp bytes) per device of the compiled bf16 Newton-Schulz of an fp32 leaf."""
    x = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)
    compiled = jax.jit(lambda g: newton_schulz(g, sharding=sharding)).lower(x).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost["flops"], compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("case", [
    ((6, 4, 64, 32), (1, 4, 2, 1), P(None, "expert", "fsdp", None)),  # fsdp divides no batch axis
    ((16, 64, 32), (2, 2, 2, 1), P(None, "fsdp", None)),  # data and expert replicate the stack
    ((5, 4, 64, 32), (1, 4, 2, 1), P(None, "expert", "fsdp", None)),  # 20 matrices on 8 devices
    ((3, 64, 48), (2, 2, 2, 1), P(None, "fsdp", "tensor")),  # 3 matrices on 8 devices
], ids=case_id)
def test_distributed_newton_schulz_work_is_an_even_share(case):
    """Per-device flops and temporaries within 1.25x of the single-device compile's times ceil(N / D) / N (N
    matrices, D devices; the share of the busiest device), plus one fp32 matrix of temporaries when D does not
    divide N. (Placing the iteration by moving mesh axes onto dividing batch axes and dropping the others, each
    of these leaves had every device compute 3-4x its share.)"""
    shape, mesh_shape, s = case
    mesh = make_mesh(*mesh_shape)
    n, d = math.prod(shape[:-2]), mesh.size
    share = math.ceil(n / d) / n
    flops_one, temp_one = ns_cost(shape)
    flops, temp = ns_cost(shape, NamedSharding(mesh, s))
    slack = 0 if n % d == 0 else shape[-2] * shape[-1] * 4
    assert flops <= 1.25 * flops_one * share, (flops / (flops_one * share))
    assert temp <= 1.25 * temp_one * share + slack, (temp / (temp_one * share))


def test_newton_schulz_shardings_use_every_mesh_axis():
    """The working stack is split over the batch axes' mesh axes, then the replicated ones, then the matrix axes'."""
    mesh = make_mesh(2, 2, 2, 1)
    assert [s.spec for s in newton_schulz_shardings((3, 64, 48), NamedSharding(mesh, P(None, "fsdp", "tensor")))] \
        == [P(("data", "expert", "fsdp"), None, None)]
    assert [s.spec for s in newton_schulz_shardings((4, 8, 64, 32), NamedSharding(mesh, P(None, "expert", None)))] \
        == [P(("expert", "data", "fsdp"), None, None)]
    with pytest.raises(ValueError, match="not divisible"):
        newton_schulz_shardings((3, 64, 48), NamedSharding(mesh, P("fsdp")))
