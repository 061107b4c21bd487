"""MoE routing, dispatch modes, balancing functions and expert-parallel paths against independent references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import kimi_jax
from kimi_jax import sharding
from kimi_jax.model.moe import (capacity_moe, dropless_moe, route, sequence_balance_loss, update_router_bias)


def np_route(cfg, logits, bias):
    """NumPy DeepSeek-V3 router, token by token."""
    scores = 1 / (1 + np.exp(-logits.astype(np.float64)))
    idx_all, w_all = [], []
    per_group = cfg.n_routed_experts // cfg.n_group
    for s in scores:
        choice = s + bias
        groups = [np.sort(choice[g * per_group:(g + 1) * per_group])[-2:].sum() for g in range(cfg.n_group)]
        keep = np.argsort(groups)[::-1][:cfg.topk_group]
        masked = np.full_like(choice, -np.inf)
        for g in keep:
            masked[g * per_group:(g + 1) * per_group] = choice[g * per_group:(g + 1) * per_group]
        idx = np.sort(np.argsort(masked)[::-1][:cfg.num_experts_per_tok])
        w = s[idx]
        if cfg.norm_topk_prob:
            w = w / (w.sum() + 1e-20)
        idx_all.append(idx)
        w_all.append(w * cfg.routed_scaling_factor)
    return np.array(idx_all), np.array(w_all)


@pytest.mark.parametrize("n_group, topk_group, k", [(1, 1, 2), (4, 2, 3), (4, 1, 2)])
def test_router_matches_numpy(n_group, topk_group, k):
    cfg = kimi_jax.tiny().replace(n_routed_experts=16, n_group=n_group, topk_group=topk_group,
                                  num_experts_per_tok=k)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 16)).astype(np.float32)
    bias = rng.normal(scale=0.3, size=16).astype(np.float32)
    idx, w, _ = route(cfg, jnp.asarray(logits), jnp.asarray(bias))
    order = np.argsort(np.asarray(idx), axis=-1)
    want_idx, want_w = np_route(cfg, logits, bias)
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(idx), order, -1), want_idx)
    np.testing.assert_allclose(np.take_along_axis(np.asarray(w), order, -1), want_w, rtol=1e-5)


def test_router_bias_selects_but_does_not_weight():
    cfg = kimi_jax.tiny().replace(n_routed_experts=4, num_experts_per_tok=1, norm_topk_prob=False,
                                  routed_scaling_factor=1.0)
    logits = jnp.array([[2.0, 1.0, 0.0, -1.0]])
    idx, w, _ = route(cfg, logits, jnp.array([0.0, 0.0, 0.0, 5.0]))
    assert int(idx[0, 0]) == 3
    np.testing.assert_allclose(w[0, 0], 1 / (1 + np.exp(1.0)), rtol=1e-6)   # sigmoid(-1), unbiased


def np_experts(x, idx, w, gate, up, down, capacity=None):
    """Loop over tokens; with `capacity`, an expert serves only its first `capacity` assignments in token order."""
    out = np.zeros_like(x)
    served = np.zeros(gate.shape[0], int)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = idx[t, j]
            served[e] += 1
            if capacity is not None and served[e] > capacity:
                continue
            h = x[t] @ gate[e]
            h = h / (1 + np.exp(-h)) * (x[t] @ up[e])
            out[t] += w[t, j] * (h @ down[e])
    return out


@pytest.fixture(scope="module")
def moe_inputs():
    rng = np.random.default_rng(1)
    t, e, h, f, k = 40, 8, 16, 12, 3
    x = rng.normal(size=(t, h)).astype(np.float32)
    idx = np.stack([rng.choice(e, k, replace=False) for _ in range(t)]).astype(np.int32)
    others = [x for x in range(e) if x != 5]
    idx[:20] = [[5, *rng.choice(others, k - 1, replace=False)] for _ in range(20)]   # skew: expert 5 is popular
    w = rng.uniform(size=(t, k)).astype(np.float32)
    weights = [rng.normal(scale=0.3, size=s).astype(np.float32) for s in ((e, h, f), (e, h, f), (e, f, h))]
    return x, idx, w, weights


def test_dropless_matches_loop(moe_inputs):
    x, idx, w, weights = moe_inputs
    got = dropless_moe(jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w), tuple(map(jnp.asarray, weights)), 8,
                       "ragged_dot")
    np.testing.assert_allclose(got, np_experts(x, idx, w, *weights), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 8.0])
def test_capacity_matches_loop(moe_inputs, capacity_factor):
    x, idx, w, weights = moe_inputs
    capacity = int(np.ceil(capacity_factor * idx.size / 8))
    got, dropped = capacity_moe(jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w), tuple(map(jnp.asarray, weights)),
                                8, capacity_factor)
    np.testing.assert_allclose(got, np_experts(x, idx, w, *weights, capacity=capacity), rtol=1e-4, atol=1e-5)
    want_dropped = sum(max(0, int(np.sum(idx == e)) - capacity) for e in range(8))
    assert int(dropped) == want_dropped and (want_dropped > 0) == (capacity_factor < 8.0)


def test_sequence_balance_loss_matches_numpy():
    rng = np.random.default_rng(2)
    b, s, e, k = 2, 10, 6, 2
    scores = rng.uniform(size=(b, s, e)).astype(np.float32)
    idx = np.argsort(-scores, axis=-1)[..., :k]
    valid = np.ones((b, s), bool)
    valid[1, 7:] = False
    want = []
    for r in range(b):
        n = valid[r].sum()
        f = np.array([(idx[r][valid[r]] == i).sum() for i in range(e)]) * e / (k * n)
        p = (scores[r][valid[r]] / scores[r][valid[r]].sum(-1, keepdims=True)).mean(0)
        want.append((f * p).sum())
    got = sequence_balance_loss(jnp.asarray(scores), jnp.asarray(idx), jnp.asarray(valid), k)
    np.testing.assert_allclose(got, np.mean(want), rtol=1e-5)


def test_router_bias_update():
    bias = jnp.zeros((2, 4))
    counts = jnp.array([[10, 2, 4, 4], [5, 5, 5, 5]])
    got = update_router_bias(bias, counts, 1e-3)
    np.testing.assert_allclose(got, [[-1e-3, 1e-3, 1e-3, 1e-3], [0, 0, 0, 0]])


def test_bias_gets_no_gradient():
    model = kimi_jax.create_model(kimi_jax.tiny(), seed=0)
    ids = jnp.arange(32).reshape(2, 16)
    grads = nnx.grad(lambda m: jnp.mean(m(ids) ** 2))(model)
    assert float(jnp.abs(grads.moe_layers.mlp.gate.e_score_correction_bias[...]).max()) == 0.0
    assert float(jnp.abs(grads.moe_layers.mlp.gate.kernel[...]).max()) > 0.0


@pytest.mark.parametrize("impl", ["all_to_all", "ragged_all_to_all"])
def test_expert_parallel_impls_match(impl):
    """Both EP exchanges (ragged emulated with all_gather on CPU) equal the single-device model."""
    cfg = kimi_jax.tiny(expert_parallel_impl=impl)
    model = kimi_jax.create_model(cfg, seed=1)
    ids = jax.random.randint(jax.random.key(3), (8, 12), 0, cfg.vocab_size)
    ref = model(ids)
    mesh = sharding.make_mesh(1, 1, 8, 1)
    graphdef, abstract = nnx.split(kimi_jax.abstract_model(cfg, mesh))
    sharded = nnx.merge(graphdef, jax.device_put(nnx.state(model), sharding.state_shardings(abstract, mesh)))
    np.testing.assert_allclose(jax.jit(lambda m: m(ids))(sharded), ref, atol=2e-5)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_ragged_expert_parallel_lowers_for_accelerators(platform, monkeypatch):
    """The ragged_all_to_all path lowers for TPU and GPU (it cannot run on XLA:CPU)."""
    cfg = kimi_jax.tiny(expert_parallel_impl="ragged_all_to_all")
    mesh = sharding.make_mesh(1, 2, 2, 2)
    graphdef, state = nnx.split(kimi_jax.abstract_model(cfg, mesh))
    shardings = sharding.state_shardings(state, mesh)
    state = jax.tree.map(lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)), state,
                         shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
    ids = jax.ShapeDtypeStruct((8, 16), jnp.int32, sharding=jax.NamedSharding(mesh, P(("data", "fsdp", "expert"))))
    from kimi_jax.model import expert_parallel
    monkeypatch.setattr(expert_parallel, "ragged_exchange", lambda platform: expert_parallel.ragged_all_to_all)
    exported = jax.export.export(
        jax.jit(lambda st, i: nnx.merge(graphdef, st)(i)), platforms=[platform],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("ragged_all_to_all")])(state, ids)
    assert "ragged_all_to_all" in exported.mlir_module()


def np_expert_parallel_keep(idx, blocks, ep, n_local, factor, impl):
    """Which assignments (t, j) an expert-parallel exchange with capacity `factor` keeps. Token rows are split
    into `blocks` equal blocks (devices of the batch split, the `expert` axis innermost); each group of `ep`
    consecutive blocks exchanges over `expert`. all_to_all: each source keeps, per destination, its first
    C = ceil(f T_loc k / EP) assignments ordered by expert, then token; ragged: each destination keeps the
    first ceil(f T_loc k) rows in (source, expert, token) order."""
    t, k = idx.shape
    t_loc = t // blocks
    keep = np.zeros((t, k), bool)
    for group in range(blocks // ep):
        received = {d: 0 for d in range(ep)}
        for src in range(ep):
            rows = range((group * ep + src) * t_loc, (group * ep + src + 1) * t_loc)
            pairs = sorted(((idx[r, j], r, j) for r in rows for j in range(k)), key=lambda p: p[0])
            for dest in range(ep):
                mine = [p for p in pairs if p[0] // n_local == dest]
                if impl == "all_to_all":
                    kept = mine[:int(np.ceil(factor * t_loc * k / ep))]
                else:
                    room = int(np.ceil(factor * t_loc * k)) - received[dest]
                    kept = mine[:max(room, 0)]
                    received[dest] += len(mine)
                for _, r, j in kept:
                    keep[r, j] = True
    return keep


@pytest.mark.parametrize("impl", ["all_to_all", "ragged_all_to_all"])
@pytest.mark.parametrize("factor", [0.5, None])
def test_expert_parallel_capacity_drops_exactly(impl, factor):
    """The MoE island on an EP mesh against a NumPy emulation: the output is the loop over the assignments the
    exchange keeps, and dropped_fraction counts the others."""
    from kimi_jax.model.moe import routed_experts
    cfg = kimi_jax.tiny(expert_parallel_impl=impl, expert_parallel_capacity_factor=factor)
    e, h, f = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    rng = np.random.default_rng(4)
    x = rng.normal(size=(8, 6, h)).astype(np.float32)
    kernel = rng.normal(scale=0.3, size=(h, e)).astype(np.float32)
    kernel[:, 3] += 0.4                                                    # expert 3 is popular
    bias = np.zeros(e, np.float32)
    weights = [rng.normal(scale=0.3, size=s).astype(np.float32) for s in ((e, h, f), (e, h, f), (e, f, h))]
    seg = np.ones((8, 6), np.int32)
    mesh = sharding.make_mesh(1, 2, 2, 2)                                   # batch over fsdp x expert, EP 2, TP 2
    y, aux = jax.jit(lambda *a: routed_experts(cfg, mesh, *a))(x, seg, kernel, bias, tuple(weights))
    tokens = x.reshape(-1, h)
    idx, w = np_route(cfg, tokens @ kernel, bias)
    if factor is None:
        keep = np.ones(idx.shape, bool)
    else:
        keep = np_expert_parallel_keep(idx, 4, 2, e // 2, factor, impl)
    want = np_experts(tokens, idx, w * keep, *weights)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, h), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    assert float(aux["dropped_fraction"]) == pytest.approx(1 - keep.mean(), abs=1e-7)
    assert (factor is None) == (keep.all())
    np.testing.assert_array_equal(aux["expert_counts"], np.bincount(idx.reshape(-1), minlength=e))
