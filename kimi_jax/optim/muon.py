"""Muon: momentum orthogonalised by a Newton-Schulz iteration, as an optax `GradientTransformation`.

Per matrix G (the last two axes of a leaf; leading axes such as stacked layers [L, ...] or experts [L, E, ...]
are batch axes, orthogonalised independently in one batched computation):

    M_t = mu M_{t-1} + G_t                      (Kimi K2 report, Algorithm 1; `nesterov=False`, the default)
    U_t = M_t        or   U_t = G_t + mu M_t    (Moonlight's code; `nesterov=True`)
    O_t = NewtonSchulz5(U_t)
    update = rms_scale * sqrt(max(A, B)) * O_t  (A x B matrix; rms_scale 0.2 matches AdamW's update RMS)

Learning rate and decoupled weight decay are applied by the combined optimizer (muonclip.py):
W <- W - lr * (update + weight_decay * W).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from kimi_jax.optim.labels import flatten_by_path, path_str

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def _entries(spec, ndim: int) -> list[list[str]]:
    """PartitionSpec -> per-dimension lists of mesh axis names (padded to ndim)."""
    out = []
    for entry in list(spec) + [None] * (ndim - len(spec)):
        out.append([] if entry is None else list(entry) if isinstance(entry, (tuple, list)) else [entry])
    return out


def _newton_schulz_local(y: jax.Array, steps: int, coeffs: tuple[float, float, float], eps: float,
                         dtype: Any) -> jax.Array:
    """The iteration on y [..., A, B] in `dtype`, every matrix whole; returns `dtype`."""
    a, b, c = coeffs
    transpose = y.shape[-2] > y.shape[-1]
    if transpose:
        y = jnp.swapaxes(y, -1, -2)
    y32 = y.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(y32), axis=(-2, -1), keepdims=True))
    y = (y32 / (norm + eps)).astype(dtype)
    precision = jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None

    def mm(p, q):
        return jnp.matmul(p, q, precision=precision, preferred_element_type=jnp.float32).astype(dtype)

    for _ in range(steps):
        s = mm(y, jnp.swapaxes(y, -1, -2))
        poly = b * s + c * mm(s, s)
        y = a * y + mm(poly, y)
    if transpose:
        y = jnp.swapaxes(y, -1, -2)
    return y


def _plan(shape: tuple[int, ...], sharding: NamedSharding) -> tuple[tuple[str, ...], ...]:
    """(batch, free, rows, cols): the mesh axes (of size > 1) of a leaf's batch axes, those it is replicated
    over, and those of its two matrix axes."""
    size = dict(sharding.mesh.shape)
    dims = _entries(sharding.spec, len(shape))
    for i, d in enumerate(dims):
        if shape[i] % math.prod(size[m] for m in d):
            raise ValueError(f"newton_schulz: dimension {i} of shape {shape} is not divisible by its mesh axes "
                             f"{d} in {sharding.spec}")
    used = {m for d in dims for m in d}
    batch = tuple(m for d in dims[:-2] for m in d if size[m] > 1)
    free = tuple(m for m in sharding.mesh.axis_names if m not in used and size[m] > 1)
    rows, cols = (tuple(m for m in dims[k] if size[m] > 1) for k in (-2, -1))
    return batch, free, rows, cols


def newton_schulz_shardings(shape: tuple[int, ...], sharding: NamedSharding) -> list[NamedSharding]:
    """Where Newton-Schulz runs for a leaf of `shape` stored with `sharding`: [the working stack's layout].

    Devices holding the same batch slice (same coordinates on the mesh axes of the batch axes) form a group of
    g devices; between them that slice of n matrices is split over the mesh axes of the matrix axes and
    replicated over the other mesh axes. Each group shares its n matrices out among its g devices,
    ceil(n / g) whole matrices each. The working stack [D * ceil(n / g), A, B] (D devices; the groups' padded
    stacks one after another) is split on its first axis over every mesh axis of size > 1: those of the batch
    axes (which group), then the replicated ones, then those of the matrix axes (which device in the group).
    """
    batch, free, rows, cols = _plan(shape, sharding)
    work = batch + free + rows + cols
    return [NamedSharding(sharding.mesh, PartitionSpec(work if work else None, None, None))]


def _newton_schulz_distributed(x: jax.Array, sharding: NamedSharding, run, dtype: Any) -> jax.Array:
    """`run` (the iteration on whole matrices [k, A, B]) applied to x stored with `sharding`, the matrices shared
    out over every device as `newton_schulz_shardings` lays out; returns `dtype`.

    Inside one shard_map over all mesh axes, each device flattens its block to [n, a, b] (a, b: its pieces of
    the matrix axes), takes its part of that stack zero-padded to a multiple of the group size g (the part is
    picked by its coordinates on the replicated mesh axes; no data moves), casts it to `dtype` and brings the
    pieces of its ceil(n / g) matrices together by one all-to-all per matrix axis. The result goes back the same
    way: the all-to-alls reversed, then the parts are put together along the replicated axes, by an all-gather,
    or, when the padding is most of the padded stack (2 n < its length, which is g when n < g), by a sum of the
    parts scattered into a zero stack [n, a, b]. No device computes a matrix another one computes, nothing moves
    between groups (an expert stack split over `expert` never leaves its expert shard), and besides its block a
    device holds ceil(n / g) whole matrices, their iteration temporaries and at most 2 n pieces [a, b] on the
    way back.
    """
    _, free, rows, cols = _plan(x.shape, sharding)
    size = dict(sharding.mesh.shape)
    n_free = math.prod(size[m] for m in free)
    group = n_free * math.prod(size[m] for m in rows + cols)

    def body(block):
        local = block.shape
        n = math.prod(local[:-2])
        z = block.reshape(n, *local[-2:])
        padded = -(-n // group) * group
        part = padded // n_free
        mine = jax.lax.axis_index(free) * part + jnp.arange(part) if free else None
        if free:  # this device's part of the zero-padded stack, without padding the whole stack
            z = jnp.take(z, mine, axis=0, mode="fill", fill_value=0)
        elif padded > n:
            z = jnp.pad(z, ((0, padded - n), (0, 0), (0, 0)))
        z = z.astype(dtype)
        if rows:
            z = jax.lax.all_to_all(z, rows, 0, 1, tiled=True)
        if cols:
            z = jax.lax.all_to_all(z, cols, 0, 2, tiled=True)
        z = run(z)
        if cols:
            z = jax.lax.all_to_all(z, cols, 2, 0, tiled=True)
        if rows:
            z = jax.lax.all_to_all(z, rows, 1, 0, tiled=True)
        if free and 2 * n < padded:  # exact: every entry is one part's value plus zeros
            z = jax.lax.psum(jnp.zeros((n, *z.shape[1:]), z.dtype).at[mine].set(z, mode="drop"), free)
        elif free:
            z = jax.lax.all_gather(z, free, axis=0, tiled=True)
        return z[:n].reshape(local)

    # check_vma=False: the result is equal along the replicated axes after the all-gather or sum, which the check
    # cannot see.
    return jax.shard_map(body, mesh=sharding.mesh, in_specs=sharding.spec, out_specs=sharding.spec,
                         check_vma=False)(x)


def newton_schulz(x: jax.Array, *, steps: int = 5, coeffs: tuple[float, float, float] = NS_COEFFS,
                  eps: float = 1e-7, dtype: Any = jnp.bfloat16, sharding: NamedSharding | None = None
                  ) -> jax.Array:
    """Approximate orthogonalisation U V^T of each matrix in the last two axes of x [..., A, B].

    x is cast to `dtype` first (before any move between devices), then X = x / (||x||_F + eps) per matrix (norm
    in fp32), transposed so rows <= cols, then `steps` times
    X <- a X + (b S + c S^2) X with S = X X^T, (a, b, c) = `coeffs`, in `dtype` (bfloat16 or float32; fp32 runs
    its matmuls at HIGHEST precision, bf16 accumulates them in fp32). The singular values land in roughly
    [0.7, 1.2], not exactly 1. Returns [..., A, B] in x.dtype.

    sharding: how x is laid out, or None. When given, the matrices are shared out over all devices of its mesh
    (`newton_schulz_shardings`): each is orthogonalised whole on exactly one device, every device gets at most
    ceil(n / g) of them (g: the devices holding the same batch slice, n: the matrices in that slice), and the
    result comes back laid out as `sharding`.
    """
    if x.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix in the last two axes, got shape {x.shape}")

    def run(y):
        return _newton_schulz_local(y.astype(dtype), steps, coeffs, eps, dtype)

    y = run(x) if sharding is None else _newton_schulz_distributed(x, sharding, run, dtype)
    return y.astype(x.dtype)


def rms_match_scale(shape: tuple[int, ...], rms_scale: float) -> float:
    """rms_scale * sqrt(max(A, B)) for a leaf whose matrix is its last two axes [..., A, B]."""
    return rms_scale * math.sqrt(max(shape[-2], shape[-1]))


class ScaleByMuonState(NamedTuple):
    """momentum: M_t, a pytree shaped like the parameters (dtype `mu_dtype`)."""

    momentum: optax.Updates


def scale_by_muon(momentum: float = 0.95, *, nesterov: bool = False, ns_steps: int = 5,
                  ns_coeffs: tuple[float, float, float] = NS_COEFFS, ns_dtype: Any = jnp.bfloat16,
                  eps: float = 1e-7, rms_scale: float | None = 0.2, mu_dtype: Any = jnp.float32,
                  shardings: Any = None) -> optax.GradientTransformation:
    """Muon's direction for every leaf (each a stack of matrices [..., A, B]); see the module docstring.

    momentum: mu. nesterov: False = K2's M_t (default), True = Moonlight's G_t + mu M_t.
    ns_steps, ns_coeffs, ns_dtype, eps: the Newton-Schulz iteration (see `newton_schulz`).
    rms_scale: 0.2 scales O_t by 0.2 * sqrt(max(A, B)) (Moonlight's AdamW-RMS match); None leaves O_t as is.
    mu_dtype: dtype of the momentum buffer (fp32 by default, also for bf16 parameters).
    shardings: None, or a pytree with the parameters' paths whose leaves are the `NamedSharding`s the parameters
      (and so the gradients) have, e.g. `kimi_jax.sharding.state_shardings(...)`; Newton-Schulz then shares each
      leaf's matrices out over all devices of its mesh (see `newton_schulz`). Leaves are matched by path name:
      the tree may cover more parameters than this transform sees, but every leaf it sees needs an entry.
    Updates come out in the gradients' dtype.
    """
    sharding_by_name = None if shardings is None else flatten_by_path(
        shardings, is_leaf=lambda s: isinstance(s, NamedSharding))

    def init_fn(params):
        def zeros(path, p):
            if p.ndim < 2:
                raise ValueError(f"scale_by_muon: parameter {path_str(path)!r} of shape {p.shape} is not a "
                                 "matrix (needs ndim >= 2)")
            return jnp.zeros_like(p, dtype=mu_dtype)  # keeps the parameter's sharding
        return ScaleByMuonState(momentum=jax.tree_util.tree_map_with_path(zeros, params))

    def direction(path, g, m):
        u = g.astype(mu_dtype) + momentum * m if nesterov else m
        sharding = None
        if sharding_by_name is not None:
            name = path_str(path)
            if name not in sharding_by_name:
                raise ValueError(f"scale_by_muon: parameter {name!r} has no entry in `shardings`")
            sharding = sharding_by_name[name]
        o = newton_schulz(u, steps=ns_steps, coeffs=ns_coeffs, eps=eps, dtype=ns_dtype, sharding=sharding)
        if rms_scale is not None:
            o = o * rms_match_scale(g.shape, rms_scale)
        return o.astype(g.dtype)

    def update_fn(updates, state, params=None):
        del params
        new_m = jax.tree.map(lambda g, m: (momentum * m + g.astype(mu_dtype)).astype(mu_dtype),
                             updates, state.momentum)
        out = jax.tree_util.tree_map_with_path(direction, updates, new_m)
        return out, ScaleByMuonState(momentum=new_m)

    return optax.GradientTransformation(init_fn, update_fn)
