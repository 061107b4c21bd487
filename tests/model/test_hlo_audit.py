"""Every device does only its share: audits of the compiled per-device program and of the traced step.

- No array of the compiled forward+backward (collectives, dynamic slices, anything) has the global token count
  in its shape: the batch stays split on every mesh, on the XLA and the Pallas (interpret) paths.
- Dense math (attention, dense MLPs, embeddings, lm_head): per-device FLOPs of the compiled program within 10% of
  the single-device program's / devices.
- Routed experts and Pallas kernels run inside shard_map islands (never fed global arrays), and the grouped
  matmul FLOPs each device does are within 10% of the single-device total / devices.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jex_core
from jax.sharding import NamedSharding

import kimi_jax
from kimi_jax import sharding

B, S = 8, 40                       # 320 global tokens, 640 expert assignments (top-2): shapes no weight has
MESHES = [(8, 1, 1, 1), (2, 2, 2, 1), (1, 2, 4, 1), (1, 1, 8, 1)]
PALLAS = dict(attention_impl="pallas", moe_impl="pallas", pallas_backend="tpu", pallas_interpret=True)
CFG = kimi_jax.tiny(expert_parallel_capacity_factor=1.0).replace(num_hidden_layers=2)   # a dense and a MoE layer
GLOBAL_TOKENS = re.compile(rf"\[({B},{S}|{B * S}|{B * S * CFG.num_experts_per_tok})[,\]]"
                           rf"|,({B * S}|{B * S * CFG.num_experts_per_tok})[,\]]")


def loss_and_inputs(cfg, mesh):
    graphdef, state = nnx.split(kimi_jax.abstract_model(cfg, mesh))
    ids = jax.ShapeDtypeStruct((B, S), jnp.int32)
    if mesh is not None:
        shardings = sharding.state_shardings(state, mesh, sharding.rules_for(cfg))
        state = jax.tree.map(lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)), state,
                             shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
        ids = jax.ShapeDtypeStruct((B, S), jnp.int32,
                                   sharding=NamedSharding(mesh, sharding.logical_to_spec(("batch", "seq"), mesh)))

    def loss(st, i):
        logits, aux = nnx.merge(graphdef, st).forward(i)
        return jnp.mean(logits ** 2) + 1e-3 * jnp.sum(aux.get("balance_loss", 0.0))

    return jax.value_and_grad(loss), (state, ids)


@functools.cache
def compiled(cfg, mesh):
    fn, args = loss_and_inputs(cfg, mesh)
    return jax.jit(fn).lower(*args).compile()


@pytest.mark.parametrize("pallas", [False, True], ids=["xla", "pallas"])
@pytest.mark.parametrize("mesh_shape", MESHES)
def test_no_global_token_arrays(mesh_shape, pallas):
    cfg = CFG.replace(**PALLAS) if pallas else CFG
    text = compiled(cfg, sharding.make_mesh(*mesh_shape)).as_text()
    offenders = [line.strip()[:200] for line in text.splitlines() if "=" in line and GLOBAL_TOKENS.search(line)]
    assert not offenders, "\n".join(offenders[:10])


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_dense_flops_are_the_device_share(mesh_shape):
    cfg = CFG.replace(first_k_dense_replace=CFG.num_hidden_layers)             # attention + dense MLPs only
    single = compiled(cfg, None).cost_analysis()["flops"]
    per_device = compiled(cfg, sharding.make_mesh(*mesh_shape)).cost_analysis()["flops"]
    assert per_device == pytest.approx(single / 8, rel=0.10)


def _subjaxprs(eqn):
    for value in eqn.params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, jex_core.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, jex_core.Jaxpr):
                yield v


def kernel_calls(jaxpr, inside=False):
    """(primitive name, inside a shard_map?, eqn) of every grouped matmul and Pallas call, recursively."""
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in ("ragged_dot_general", "pallas_call"):
            yield name, inside, eqn
        for sub in _subjaxprs(eqn):
            yield from kernel_calls(sub, inside or name == "shard_map")


def ragged_dot_flops(eqn) -> float:
    """2 x (multiply-adds) of a ragged dot: each row meets one group's weights."""
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    numbers = eqn.params["ragged_dot_dimension_numbers"]
    (lhs_contract, _), _ = numbers.dot_dimension_numbers
    contracted = np.prod([lhs[d] for d in lhs_contract])
    groups = np.prod([rhs[d] for d in numbers.rhs_group_dimensions]) if numbers.rhs_group_dimensions else 1
    return 2.0 * np.prod(lhs) * np.prod(rhs) / (contracted * groups)


def pallas_rows(eqn) -> tuple[str, int]:
    """("gmm", token rows m) of a grouped matmul (its operands start with 1-D group metadata, then lhs [m, k]),
    or ("attention", batch rows b) of an attention kernel (segment ids [b, s, 1] first). With heads whole
    (tensor = 1), a kernel's work per device scales with these rows."""
    shapes = [v.aval.shape for v in eqn.invars]
    if len(shapes[0]) == 1:
        return "gmm", next(s[0] for s in shapes if len(s) == 2)
    return "attention", shapes[0][0]


def traced_kernels(cfg, mesh):
    fn, args = loss_and_inputs(cfg, mesh)
    return list(kernel_calls(jax.make_jaxpr(fn)(*args).jaxpr))


@pytest.mark.parametrize("pallas", [False, True], ids=["ragged_dot", "pallas"])
@pytest.mark.parametrize("mesh_shape", MESHES)
def test_experts_and_kernels_run_in_shard_map_with_the_device_share(mesh_shape, pallas):
    cfg = CFG.replace(**PALLAS) if pallas else CFG
    single = traced_kernels(cfg, None)
    on_mesh = traced_kernels(cfg, sharding.make_mesh(*mesh_shape))
    assert on_mesh and all(inside for _, inside, _ in on_mesh), [n for n, inside, _ in on_mesh if not inside]
    total = sum(ragged_dot_flops(e) for n, _, e in single if n == "ragged_dot_general")
    local = sum(ragged_dot_flops(e) for n, _, e in on_mesh if n == "ragged_dot_general")
    assert local == pytest.approx(total / 8, rel=0.10)
    ideal = {"gmm": B * S * CFG.num_experts_per_tok / 8, "attention": B / 8}      # the kernels pad single-device
    for kind, rows in (pallas_rows(e) for n, _, e in on_mesh if n == "pallas_call"):    # rows to their tiles
        assert rows <= 1.10 * ideal[kind], (kind, rows)
    assert pallas == any(n == "pallas_call" for n, _, _ in on_mesh)
