"""Trainer -> inference-engine weight sync (K2 section 3.3 and appendix G), colocated case; the plan both cases share.

K2 colocates trainer and inference on the same devices. During rollout the trainer's parameters and optimizer state
wait in host memory and come back with one host-to-device copy; the engine needs its own dtype (bf16) and sharding
(e.g. tensor / expert parallel for decode), so the parameters are converted and resharded, a bucket at a time.

The plan (`plan_buckets`): the engine's tensors in a fixed order (`nnx.to_flat_state` of the engine's state),
each with its HF-style name ("moe_layers.mlp.experts.down_proj"), shape and engine dtype, grouped into buckets of at
most `bucket_bytes` engine bytes, each tensor at a 256-byte aligned offset of its bucket (checkpoint-engine's
alignment). A stacked tensor (scanned layers: leading "layers" axis, never sharded) larger than a bucket is cut
into pieces of whole layers, so a bucket bounds the work of one step down to one layer (K2's routed experts,
[60, 384, 7168, 2048] per projection, are 10.5 GiB a layer in bf16, split over the expert axis); a piece is
written into its rows of the engine tensor in place (a donated dynamic_update_slice). The disaggregated sync
(kimi_jax/serve/transfer.py) packs a bucket into one uint8 buffer with these offsets and
checks `checksums` on arrival.

ColocatedSync, one rollout round:
    host = sync.offload(train_state)             # device -> pinned_host, device buffers freed
    state, version = sync.to_engine(host.params) # bucket by bucket: host -> device, cast, reshard (jit)
    engine.load_weights(state, version); ...rollout...; del state
    train_state = sync.restore(host)             # one host -> device copy of the whole TrainState

Peak device memory of `to_engine` (per device): what was resident before + the engine's parameters (they
accumulate) + the transient of one bucket, at most 3 x the largest bucket (bucket_bytes, or a larger tensor that
cannot be cut: the embedding and lm_head, split over `tensor` on the vocabulary, get a bucket each, as in
checkpoint-engine, whose buckets are at least the largest tensor): the bucket's pieces moved to device memory
(fp32: 2 x its engine bytes where a tensor is replicated) plus XLA's temporaries of the cast and reshard, at most
one gathered bucket (XLA falls back to "involuntary full rematerialization", a full copy of the tensor on every
device, when it finds no cheap path between two layouts, e.g. (fsdp x expert) on one dimension -> expert and
tensor on two others). `SyncStats.peak_bytes` is measured at every bucket and `SyncStats.bound_bytes` is that
bound. Buckets run one after another (each waited for), so no two buckets' transients overlap.

Donation: the partial engine tensors that pieces are written into are donated (updated in place). jax 0.12 cannot
donate across memory kinds ("Donation across different memory kinds is not implemented"), so `offload` and
`restore` copy, wait for the copy, then delete the source buffers; the trainer's own device-resident parameters
are never donated.

On CPU, `pinned_host` exists (the same DRAM as the "device" memory): offloading is a memcpy that moves the arrays
to the host memory kind and frees the device-kind buffers, so the sequence and the byte counts are those of an
accelerator, not the savings.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from kimi_jax import sharding
from kimi_jax.model import abstract_model

ALIGN = 256
DEFAULT_BUCKET_BYTES = 512 << 20


class WeightSyncError(RuntimeError):
    """A sync did not produce a complete, verified version (the old version stays in place)."""


@dataclasses.dataclass(frozen=True)
class Slot:
    """One engine tensor, or rows [start, stop) of a stacked one (leading "layers" axis; rows is None for a whole
    tensor), in a bucket: name (the state path joined by ".", "[start:stop]" for rows), shape (of the piece),
    engine dtype, and its bytes [offset, offset + nbytes) in the bucket."""

    name: str
    path: tuple
    shape: tuple[int, ...]
    dtype: np.dtype
    bucket: int
    offset: int
    nbytes: int
    rows: tuple[int, int] | None = None

    def take(self, x):
        """This slot's piece of the whole tensor x."""
        return x if self.rows is None else x[self.rows[0]:self.rows[1]]


class Leaf(NamedTuple):
    """An engine tensor: state path, ShapeDtypeStruct (with the engine sharding when a mesh was given), and whether
    its leading axis is the scanned "layers" axis (never sharded, so a slice of rows is local on every device)."""

    path: tuple
    spec: jax.ShapeDtypeStruct
    stacked: bool


class SyncStats(NamedTuple):
    """seconds: wall time of the sync; bytes: engine bytes produced; buckets: how many; peak_bytes: most bytes in
    use on one device during the sync (allocator statistics where the backend has them, else live arrays plus the
    bucket program's temporaries); bound_bytes: the stated bound on peak_bytes (module docstring)."""

    seconds: float
    bytes: int
    buckets: int
    peak_bytes: int
    bound_bytes: int


def engine_layout(engine_cfg, engine_mesh=None) -> tuple[Any, nnx.State, list[Leaf]]:
    """(graphdef, abstract nnx.State, [Leaf]) of `create_model(engine_cfg, engine_mesh)`, nothing allocated."""
    graphdef, state = nnx.split(abstract_model(engine_cfg, engine_mesh))
    flat = nnx.to_flat_state(state)
    shardings = ([None] * len(flat) if engine_mesh is None else
                 [s for _, s in nnx.to_flat_state(sharding.state_shardings(state, engine_mesh,
                                                                           sharding.rules_for(engine_cfg)))])
    leaves = [Leaf(tuple(path), jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=s),
                   (var.get_metadata().get("axes") or (None,))[0] == "layers")
              for (path, var), s in zip(flat, shardings)]
    return graphdef, state, leaves


def tensor_name(path: tuple) -> str:
    return ".".join(map(str, path))


def plan_buckets(leaves: list[Leaf], bucket_bytes: int) -> list[Slot]:
    """Leaves in order -> Slots: consecutive tensors share a bucket while its aligned size stays <= bucket_bytes;
    a stacked tensor larger than bucket_bytes is cut into pieces of as many layers as fit (at least one), any
    other larger tensor gets a bucket of its own (rows of it would be split over devices: not a local slice)."""
    if bucket_bytes < ALIGN:
        raise ValueError(f"bucket_bytes must be >= {ALIGN}, got {bucket_bytes}")
    slots, bucket, used = [], 0, 0
    for leaf in leaves:
        dtype, shape = np.dtype(leaf.spec.dtype), tuple(leaf.spec.shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        pieces = [None]
        if leaf.stacked and nbytes > bucket_bytes:
            step = max(1, bucket_bytes // (nbytes // shape[0]))
            pieces = [(start, min(start + step, shape[0])) for start in range(0, shape[0], step)]
        for rows in pieces:
            piece = shape if rows is None else (rows[1] - rows[0], *shape[1:])
            size = int(np.prod(piece, dtype=np.int64)) * dtype.itemsize
            if used and used + size > bucket_bytes:
                bucket, used = bucket + 1, 0
            name = tensor_name(leaf.path) + ("" if rows is None else f"[{rows[0]}:{rows[1]}]")
            slots.append(Slot(name, leaf.path, piece, dtype, bucket, used, size, rows))
            used += -(-size // ALIGN) * ALIGN
    return slots


def buckets_of(slots: list[Slot]) -> list[list[Slot]]:
    out: list[list[Slot]] = []
    for slot in slots:
        if slot.bucket == len(out):
            out.append([])
        out[slot.bucket].append(slot)
    return out


def bucket_nbytes(bucket: list[Slot]) -> int:
    """Bytes of a packed bucket: its last tensor's end, rounded up to ALIGN."""
    end = bucket[-1].offset + bucket[-1].nbytes
    return -(-end // ALIGN) * ALIGN


def checksums(buffer: jax.Array, bucket: list[Slot]) -> jax.Array:
    """uint8 [bucket_nbytes] -> uint32 [tensors, 2]: per tensor, over its bytes as uint32 words w_i (zero padded
    to 4 bytes), sum_i w_i (2i + 1) and sum_i rotl(w_i, 7) (2i + 1), modulo 2^32. The odd weights make every change
    confined to one word visible in both sums, and swapped words visible; not cryptographic."""
    out = []
    for slot in bucket:
        end = slot.offset + -(-slot.nbytes // 4) * 4
        words = jax.lax.bitcast_convert_type(buffer[slot.offset:end].reshape(-1, 4), jnp.uint32)
        weights = 2 * jnp.arange(words.shape[0], dtype=jnp.uint32) + 1
        rotated = (words << 7) | (words >> 25)
        out.append(jnp.stack([jnp.sum(words * weights, dtype=jnp.uint32),
                              jnp.sum(rotated * weights, dtype=jnp.uint32)]))
    return jnp.stack(out)


def flat_params(params, leaves: list[Leaf]) -> dict[tuple, Any]:
    """The trainer's pure-dict parameters by path, checked against the engine's tensors (missing tensor or other
    shape: a WeightSyncError naming the tensor)."""
    flat = traverse_util.flatten_dict(params)
    for leaf in leaves:
        name, shape = tensor_name(leaf.path), tuple(leaf.spec.shape)
        if leaf.path not in flat:
            raise WeightSyncError(f"the trainer's parameters have no tensor {name}")
        if tuple(flat[leaf.path].shape) != shape:
            raise WeightSyncError(f"tensor {name} has shape {tuple(flat[leaf.path].shape)} in the trainer, "
                                  f"{shape} in the engine")
    return flat


def zeros_like_leaf(leaf: Leaf) -> jax.Array:
    """The engine tensor a stacked tensor's pieces are written into, allocated in its engine sharding."""
    return jax.jit(lambda: jnp.zeros(leaf.spec.shape, leaf.spec.dtype), out_shardings=leaf.spec.sharding)()


def place(bucket: list[Slot], pieces: list[jax.Array], partial: list[jax.Array]) -> list[jax.Array]:
    """Inside a jitted program: each slot's piece becomes its output; a stacked tensor's piece is written into its
    rows of the (donated) partial engine tensor, in order."""
    partial, out = list(partial), []
    for slot, piece in zip(bucket, pieces):
        out.append(piece if slot.rows is None else partial.pop(0).at[slot.rows[0]:slot.rows[1]].set(piece))
    return out


def build_state(template: nnx.State, values: dict[tuple, jax.Array]) -> nnx.State:
    """An nnx.State like `template` (the engine's abstract state) holding `values` by path."""
    return nnx.from_flat_state([(path, var.replace(values[tuple(path)]))
                                for path, var in nnx.to_flat_state(template)])


def bytes_in_use(devices) -> int:
    """Most bytes in use on one of `devices`: the allocator's count where the backend keeps one (GPU, TPU), else
    the live jax.Arrays' shards in device memory (CPU)."""
    stats = [d.memory_stats() for d in devices]
    if all(s and "bytes_in_use" in s for s in stats):
        return max(s["bytes_in_use"] for s in stats)
    per_device = dict.fromkeys(devices, 0)
    for array in jax.live_arrays():
        if array.is_deleted() or array.sharding.memory_kind not in (None, "device"):
            continue
        shard = int(np.prod(array.sharding.shard_shape(array.shape), dtype=np.int64)) * array.dtype.itemsize
        for device in array.sharding.addressable_devices:
            if device in per_device:
                per_device[device] += shard
    return max(per_device.values())


def host_memory_kind(device) -> str:
    """"pinned_host" where the device has it (GPU, TPU, and CPU in jax 0.12), else "unpinned_host"."""
    kinds = {m.kind for m in device.addressable_memories()}
    for kind in ("pinned_host", "unpinned_host"):
        if kind in kinds:
            return kind
    raise WeightSyncError(f"device {device} has no host memory kind to offload to (memories: {sorted(kinds)})")


class ColocatedSync:
    """Trainer parameters (fp32 master, training sharding; on device or offloaded) -> the engine's nnx.State
    (engine_cfg's dtypes, engine_mesh's sharding), bucket by bucket, and the trainer's state to host and back.

    engine_cfg: the trainer's ModelConfig with the engine's param_dtype (bf16); engine_mesh: the engine's mesh over
    the same devices as the trainer's. `graphdef` merges with a produced state: nnx.merge(sync.graphdef, state).
    """

    def __init__(self, engine_cfg, engine_mesh, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        self.graphdef, self._template, self._leaves = engine_layout(engine_cfg, engine_mesh)
        self.slots = plan_buckets(self._leaves, bucket_bytes)
        self.bucket_bytes = bucket_bytes
        self._by_path = {leaf.path: leaf for leaf in self._leaves}
        self._devices = list(engine_mesh.devices.flat)
        self._programs: dict[tuple, Any] = {}
        self.version = 0
        self.stats: SyncStats | None = None

    def to_engine(self, params, version: int | None = None) -> tuple[nnx.State, int]:
        """params: the trainer's pure-dict parameters (TrainState.params), on device or offloaded to host (left
        untouched) -> (engine nnx.State, version). version: default the previous one + 1."""
        start, before = time.perf_counter(), bytes_in_use(self._devices)
        flat = flat_params(params, self._leaves)
        values, peak = {}, before
        for bucket in buckets_of(self.slots):
            sources = [flat[s.path] for s in bucket]
            partial = [values.pop(s.path) if s.path in values else zeros_like_leaf(self._by_path[s.path])
                       for s in bucket if s.rows is not None]
            program = self._program(bucket, sources)
            analysis = program.memory_analysis()
            peak = max(peak, bytes_in_use(self._devices) + analysis.output_size_in_bytes
                       - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)
            outputs = program(sources, partial)
            jax.block_until_ready(outputs)
            values.update(zip((s.path for s in bucket), outputs))
        engine_bytes = sum(s.nbytes for s in self.slots)
        self.version = self.version + 1 if version is None else version
        largest = max(bucket_nbytes(b) for b in buckets_of(self.slots))
        self.stats = SyncStats(time.perf_counter() - start, engine_bytes, self.slots[-1].bucket + 1, peak,
                               before + self._engine_bytes_per_device() + 3 * largest)
        return build_state(self._template, values), self.version

    def _program(self, bucket: list[Slot], sources: list[jax.Array]):
        """The compiled program of one bucket (cached by the inputs' shardings): each slot's piece is taken where
        its tensor is (host or device), moved to device memory, cast in its training sharding (what moves between
        devices is engine bytes), resharded to the engine's sharding; pieces of stacked tensors are written into
        the donated partial engine tensors in place."""
        key = (bucket[0].bucket, *(x.sharding for x in sources))
        if key not in self._programs:
            on_device = [x.sharding.with_memory_kind("device") for x in sources]

            def convert(xs, partial):
                pieces = [jax.lax.with_sharding_constraint(
                              jax.device_put(slot.take(x), target).astype(slot.dtype), target)
                          for slot, x, target in zip(bucket, xs, on_device)]
                return place(bucket, pieces, partial)

            convert = jax.jit(convert, out_shardings=[self._by_path[s.path].spec.sharding for s in bucket],
                              donate_argnums=1)
            partial = [self._by_path[s.path].spec for s in bucket if s.rows is not None]
            self._programs[key] = convert.lower(sources, partial).compile()
        return self._programs[key]

    def _engine_bytes_per_device(self) -> int:
        return sum(int(np.prod(leaf.spec.sharding.shard_shape(leaf.spec.shape), dtype=np.int64))
                   * np.dtype(leaf.spec.dtype).itemsize for leaf in self._leaves)

    @staticmethod
    def offload(tree):
        """Every array of `tree` (e.g. the TrainState: parameters and optimizer state) -> the same sharding in host
        memory (host_memory_kind); the device buffers are deleted once the copy is done."""
        leaves, treedef = jax.tree.flatten(tree)
        kinds = [host_memory_kind(next(iter(x.sharding.device_set))) for x in leaves]
        host = jax.device_put(leaves, [x.sharding.with_memory_kind(k) for x, k in zip(leaves, kinds)])
        jax.block_until_ready(host)
        for x in leaves:
            x.delete()
        return jax.tree.unflatten(treedef, host)

    @staticmethod
    def restore(tree):
        """The inverse of offload: one host -> device copy of every array (a single batched device_put); the host
        buffers are deleted once the copy is done."""
        leaves, treedef = jax.tree.flatten(tree)
        device = jax.device_put(leaves, [x.sharding.with_memory_kind("device") for x in leaves])
        jax.block_until_ready(device)
        for x in leaves:
            x.delete()
        return jax.tree.unflatten(treedef, device)
