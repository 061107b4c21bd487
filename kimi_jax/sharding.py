"""Mesh construction, the logical-axis rules table, and sharding helpers.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters sharded), `expert` (expert
parallelism; also splits the batch outside the MoE), `tensor` (heads and MLP columns). Every parameter carries
logical axis names (its `axes` metadata); RULES maps each logical name to mesh axes. Axes missing from a mesh, or
of size 1, are dropped from specs.
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
RULES: Mapping[str, str | tuple[str, ...] | None] = {
    # activations
    "batch": ("data", "fsdp", "expert"),
    "seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "o_heads": "tensor",
    "mlp": "tensor",
    "experts": "expert",
    "expert_mlp": "tensor",
    "layers": None,
    "norm": None,
    "q_lora": None,
    "kv_lora": None,
    "router": None,
}


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


def logical_to_spec(axes: tuple[str | None, ...], mesh: Mesh, rules: Mapping = RULES) -> P:
    """Logical axis names -> PartitionSpec on `mesh` (mesh axes absent or of size 1 are dropped)."""
    spec, used = [], set()
    for name in axes:
        if name is not None and name not in rules:
            raise ValueError(f"logical axis {name!r} has no entry in the sharding rules")
        target = rules.get(name) if name is not None else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        kept = tuple(t for t in targets if axis_size(mesh, t) > 1 and t not in used)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return P(*spec)


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


def state_shardings(state: nnx.State, mesh: Mesh, rules: Mapping = RULES):
    """A pytree like `state` (nnx.Variables) whose values are NamedShardings from each Variable's `axes`."""
    def one(var):
        axes = var.get_metadata().get("axes")
        if axes is None:
            return NamedSharding(mesh, P())
        if len(axes) != len(value_of(var).shape):
            raise ValueError(f"parameter of shape {value_of(var).shape} has logical axes {axes} of another rank")
        return NamedSharding(mesh, logical_to_spec(axes, mesh, rules))
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
    if mesh is None:
        return 1
    spec = logical_to_spec(("batch",), mesh)[0]
    names = (spec,) if isinstance(spec, str) else tuple(spec or ())
    return int(np.prod([mesh.shape[n] for n in names])) if names else 1
