"""Mesh construction, the logical-axis rules table, and sharding helpers.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters sharded), `expert` (expert
parallelism; also splits the batch outside the MoE, and shards non-expert weights like fsdp), `tensor` (heads
and MLP columns). Every parameter carries logical axis names (its `axes` metadata); a strategy (STRATEGIES,
chosen by ModelConfig.sharding_strategy) maps each logical name to ordered candidate mesh axes. Axes missing
from a mesh, or of size 1, are dropped from specs.
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Activations: logical axis -> mesh axes, the same in every strategy.
ACTIVATION_RULES: Mapping[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp", "expert"),
    "seq": (),
    "act_embed": (),
    "act_heads": ("tensor",),
}

# Parameters: logical axis -> ordered candidate mesh axes. A dimension takes its candidates in order, each one
# that is in the mesh (size > 1), not yet used by an earlier dimension of the same array, and that divides what
# is left of the dimension. Afterwards, every mesh axis in the strategy's "fsdp_fill" still unused is put on the
# first dimension it divides (largest dimension first), so a large leaf is split over every mesh axis that
# divides it; `data` stays a pure data-parallel (replica) axis.
_TP = ("tensor",)
STRATEGIES: Mapping[str, Mapping[str, tuple[str, ...]]] = {
    # FSDP over fsdp and expert for every weight (the expert axis is a batch axis outside the MoE), tensor
    # parallelism on heads / MLP columns / vocabulary, routed experts split over `expert`. Kimi K2's.
    "fsdp_tp_ep": {
        "vocab": _TP, "q_heads": _TP, "kv_heads": _TP, "o_heads": _TP, "mlp": _TP, "expert_mlp": _TP,
        "embed": ("fsdp", "expert"), "q_lora": ("fsdp", "expert"), "kv_lora": ("fsdp", "expert"),
        "experts": ("expert",), "router": (), "layers": (), "norm": (),
        "fsdp_fill": ("fsdp", "expert", "tensor"),
    },
    # Non-expert weights FSDP over fsdp only (replicated over `expert`): all-gathers span fewer devices, at the
    # price of expert-times more non-expert parameter memory. For small models on meshes with a large EP.
    "fsdp_tp": {
        "vocab": _TP, "q_heads": _TP, "kv_heads": _TP, "o_heads": _TP, "mlp": _TP, "expert_mlp": _TP,
        "embed": ("fsdp",), "q_lora": ("fsdp",), "kv_lora": ("fsdp",), "experts": ("expert",), "router": (),
        "layers": (), "norm": (), "fsdp_fill": ("fsdp", "tensor"),
    },
}
DEFAULT_STRATEGY = "fsdp_tp_ep"
# Logical axes the fill leaves alone, per mesh axis: the scanned layer axis; the router's [E] bias (tiny, read
# whole by every device's routing); norm weights stay whole over `tensor`, whose devices hold whole activations.
_NOT_FILLED = {"layers": ("fsdp", "expert", "tensor"), "router": ("fsdp", "expert", "tensor"), "norm": ("tensor",)}
RULES = STRATEGIES[DEFAULT_STRATEGY]


def rules_for(cfg) -> Mapping[str, tuple[str, ...]]:
    """The parameter rules of ModelConfig.sharding_strategy."""
    return STRATEGIES[cfg.sharding_strategy]


def make_mesh(data: int = 1, fsdp: int = 1, expert: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, expert, tensor) mesh of Auto axes over `devices` (default: all devices).

    The devices are laid out by `mesh_utils.create_device_mesh`, which knows the physical topology of TPU
    slices (torus axes): a logical axis that no physical axis matches (16 on a 4x8x8 v5p-512) is made by
    splitting physical axes on purpose, where `jax.make_mesh` refuses.
    """
    devices = jax.devices() if devices is None else list(devices)
    shape = (data, fsdp, expert, tensor)
    if any(s < 1 for s in shape):
        raise ValueError(f"mesh axis sizes must be >= 1, got data={data} fsdp={fsdp} expert={expert} "
                         f"tensor={tensor}")
    if math.prod(shape) != len(devices):
        raise ValueError(f"mesh data*fsdp*expert*tensor = {data}*{fsdp}*{expert}*{tensor} = {math.prod(shape)} "
                         f"does not equal the number of devices ({len(devices)})")
    array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return Mesh(array, MESH_AXES, axis_types=(AxisType.Auto,) * 4)


def axis_size(mesh: Mesh | None, name: str) -> int:
    if mesh is None or name not in mesh.axis_names:
        return 1
    return mesh.shape[name]


def logical_to_spec(axes: tuple[str | None, ...], mesh: Mesh, rules: Mapping = RULES,
                    shape: tuple[int, ...] | None = None) -> P:
    """Logical axis names -> PartitionSpec on `mesh` (mesh axes absent or of size 1 are dropped).

    Activation names ("batch", "seq", "act_embed", "act_heads") use ACTIVATION_RULES; parameter names use
    `rules` (a strategy). With `shape` (parameters), a mesh axis is only used where it divides the dimension,
    and the strategy's "fsdp_fill" axes still unused are placed on the largest dimension they divide.
    """
    entries, used = [], set()
    for i, name in enumerate(axes):
        table = ACTIVATION_RULES if name in ACTIVATION_RULES else rules
        if name is not None and name not in table:
            raise ValueError(f"logical axis {name!r} has no entry in the sharding rules")
        kept = []
        for target in (table[name] if name is not None else ()):
            size = axis_size(mesh, target)
            if size > 1 and target not in used and (
                    shape is None or shape[i] % (math.prod(mesh.shape[k] for k in kept) * size) == 0):
                kept.append(target)
        used.update(kept)
        entries.append(kept)
    if shape is not None:
        for target in rules.get("fsdp_fill", ()):
            size = axis_size(mesh, target)
            if size <= 1 or target in used:
                continue
            for i in sorted(range(len(shape)), key=lambda d: -shape[d]):
                if target not in _NOT_FILLED.get(axes[i], ()) and shape[i] % (
                        math.prod(mesh.shape[k] for k in entries[i]) * size) == 0:
                    entries[i].append(target)
                    used.add(target)
                    break
    while entries and not entries[-1]:      # canonical: no trailing Nones, as XLA's output shardings have them
        entries.pop()
    return P(*[None if not e else e[0] if len(e) == 1 else tuple(e) for e in entries])


def spec_axes(entry) -> tuple[str, ...]:
    """One PartitionSpec entry (None, a name or a tuple of names) -> tuple of mesh axis names."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes (size > 1) the batch is split over."""
    spec = logical_to_spec(("batch",), mesh)
    return spec_axes(spec[0]) if len(spec) else ()


def check_mesh(cfg, mesh: Mesh) -> None:
    """Errors naming the config field when the model cannot be laid out on `mesh`."""
    tensor, expert = axis_size(mesh, "tensor"), axis_size(mesh, "expert")
    if cfg.num_attention_heads % tensor:
        raise ValueError(f"ModelConfig.num_attention_heads ({cfg.num_attention_heads}) is not divisible by the "
                         f"mesh 'tensor' axis ({tensor})")
    if cfg.n_routed_experts % expert:
        raise ValueError(f"ModelConfig.n_routed_experts ({cfg.n_routed_experts}) is not divisible by the mesh "
                         f"'expert' axis ({expert})")
    for name in ("intermediate_size", "moe_intermediate_size"):
        if getattr(cfg, name) % tensor:
            raise ValueError(f"ModelConfig.{name} ({getattr(cfg, name)}) is not divisible by the mesh 'tensor' "
                             f"axis ({tensor})")


def value_of(var: nnx.Variable):
    """The Variable's value (an array or ShapeDtypeStruct), across flax versions."""
    return var.get_value() if hasattr(var, "get_value") else var.value


def param_sharding(axes, shape, mesh: Mesh, rules: Mapping = RULES) -> NamedSharding:
    """The NamedSharding of a parameter with logical `axes` (None: replicated) and `shape`."""
    if axes is None:
        return NamedSharding(mesh, P())
    if len(axes) != len(shape):
        raise ValueError(f"parameter of shape {shape} has logical axes {axes} of another rank")
    return NamedSharding(mesh, logical_to_spec(axes, mesh, rules, tuple(shape)))


def state_shardings(state: nnx.State, mesh: Mesh, rules: Mapping = RULES):
    """A pytree like `state` (nnx.Variables) whose values are NamedShardings from each Variable's `axes`."""
    return jax.tree.map(lambda var: param_sharding(var.get_metadata().get("axes"), value_of(var).shape, mesh,
                                                   rules),
                        state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def layer_slice_shardings(state: nnx.State, mesh: Mesh, rules: Mapping = RULES):
    """For a stacked layer state (leading "layers" axis): the shardings of one layer's slice, each the stacked
    parameter's own spec without the layer axis (so a scanned layer keeps its parameters FSDP-sharded and
    gathers them inside the loop, one layer at a time)."""
    def one(var):
        axes, shape = var.get_metadata().get("axes"), value_of(var).shape
        if axes is None or axes[0] != "layers":
            raise ValueError(f"stacked parameter of shape {shape} has logical axes {axes} without 'layers' first")
        stacked = logical_to_spec(axes, mesh, rules, tuple(shape))
        return NamedSharding(mesh, P(*stacked[1:]))
    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_specs(state: nnx.State, mesh: Mesh, rules: Mapping = RULES):
    """Like state_shardings but PartitionSpecs."""
    return jax.tree.map(lambda s: s.spec, state_shardings(state, mesh, rules),
                        is_leaf=lambda x: isinstance(x, NamedSharding))


def constrain(x: jax.Array, axes: tuple[str | None, ...], mesh: Mesh | None) -> jax.Array:
    """with_sharding_constraint by logical axes; a no-op without a mesh."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, mesh)))


def batch_divisor(mesh: Mesh | None) -> int:
    """How many ways the batch axis is split on `mesh`."""
    return 1 if mesh is None else math.prod(mesh.shape[n] for n in batch_axes(mesh))
