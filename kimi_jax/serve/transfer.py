"""Disaggregated trainer -> engine weight sync: a trainer process pushes versions of its parameters to an engine
process (other devices, another mesh) in buckets, pipelined like checkpoint-engine, verified before use.

Transport. Data: jax.experimental.transfer. Each process starts a PJRT transfer server; the trainer offers a packed
bucket with `await_pull(uuid, [buffer])` and the engine fetches it with `connection.pull(uuid, [spec])` straight
onto one of its devices. Control: one TCP connection carrying JSON lines (manifest, each bucket's uuid and
checksums, acknowledgements, the engine's verdict). Why not collectives in a shared `jax.distributed` job (gloo on
CPU): tried here with jax 0.12 and two processes, when one process of a distributed job dies the coordination
service terminates the others ("Terminating process because the JAX distributed service detected fatal errors",
SIGABRT) even though the gloo collective itself raised a Python error; a killed trainer would take the engine and
its old version down with it. A distributed job also makes every transfer an SPMD program both sides enter in
lockstep over one global device view, which ties the engine's schedule to the trainer's. The transfer server works
between independent processes on CPU (the tests) and is jax's DCN transfer path on TPU; on GPU it stages through
host memory unless the raw-buffer transport is enabled (not tried here).

Protocol of one version:
    trainer -> engine  {"manifest": version, "tensors": [[name, shape, dtype, bucket, offset, nbytes], ...],
                        "buckets": [nbytes, ...]}
    bucket i           the trainer packs it (jit: cast to the engine dtype, gather onto one device, bytes at the
                       plan's offsets, checksums), offers it and sends {"bucket": i, "uuid", "checksums"}; the
                       engine pulls it onto its landing device, verifies the checksums, answers {"ack": i}, copies
                       it to every device of its mesh and unpacks it into the engine's shardings (jit).
    trainer -> engine  {"end": version};   engine -> trainer {"loaded": version} | {"failed": version, "error"}
Pipelining (double buffering, two bucket buffers per side): the trainer packs bucket i+1 while bucket i is in flight
and offers bucket i+1 once bucket i is acknowledged; the engine then pulls bucket i+1 while bucket i is unpacked.

Atomicity: the engine assembles every tensor of the version and only then calls on_version(state, version) (e.g.
Engine.load_weights). Any failure before that (checksum mismatch, a manifest that does not fit the engine, the
trainer's connection closing, no message or data within timeout_s) raises WeightSyncError naming the version, bucket
and tensors, tells the trainer where it still can, and leaves the engine's version as it was.
"""

from __future__ import annotations

import datetime
import json
import socket
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import transfer
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from kimi_jax.serve.weight_sync import (DEFAULT_BUCKET_BYTES, Slot, SyncStats, WeightSyncError, build_state,
                                        bucket_nbytes, buckets_of, bytes_in_use, checksums, engine_layout, flat_params,
                                        place, plan_buckets, tensor_name, zeros_like_leaf)


class Channel:
    """JSON lines over a TCP socket; every wait has a timeout and names what it waited for."""

    def __init__(self, sock: socket.socket, peer: str):
        self._sock, self.peer, self._buffer = sock, peer, b""

    def send(self, message: dict) -> None:
        try:
            self._sock.sendall(json.dumps(message).encode() + b"\n")
        except OSError as e:
            raise WeightSyncError(f"sending to {self.peer} failed: {e}") from e

    def recv(self, timeout_s: float, waiting_for: str) -> dict:
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buffer:
            self._sock.settimeout(max(deadline - time.monotonic(), 1e-3))
            try:
                data = self._sock.recv(1 << 16)
            except TimeoutError:
                raise WeightSyncError(f"no {waiting_for} from {self.peer} within {timeout_s} s") from None
            except OSError as e:
                raise WeightSyncError(f"connection to {self.peer} failed waiting for {waiting_for}: {e}") from e
            if not data:
                raise WeightSyncError(f"{self.peer} closed the connection; was waiting for {waiting_for}")
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        self._sock.close()


def _transfer_server(host: str):
    return transfer.start_transfer_server(jax.local_devices()[0].client, f"{host}:0",
                                          [f"{host}:0"] * jax.local_device_count())


class WeightSender:
    """The trainer side: listens on (host, port) for one engine; push(params, version) sends a version and returns
    when the engine has loaded it (WeightSyncError when the engine rejected it or went away).

    engine_cfg: the engine's ModelConfig (its param_dtype is the dtype sent). in_transit: test hook
    (bucket index, packed uint8 buffer) -> the buffer offered, called after the checksums were taken and the
    previous bucket was acknowledged.
    """

    def __init__(self, engine_cfg, bucket_bytes: int = DEFAULT_BUCKET_BYTES, host: str = "127.0.0.1", port: int = 0,
                 timeout_s: float = 60.0, in_transit: Callable[[int, jax.Array], jax.Array] | None = None):
        self._leaves = engine_layout(engine_cfg)[2]
        self.slots = plan_buckets(self._leaves, bucket_bytes)
        self._buckets = buckets_of(self.slots)
        self.bucket_bytes, self.timeout_s, self._in_transit = bucket_bytes, timeout_s, in_transit
        self._listener = socket.create_server((host, port))
        self.address = f"{host}:{self._listener.getsockname()[1]}"
        self._server = _transfer_server(host)
        self._channel: Channel | None = None
        self._uuid = 0
        self._programs: dict = {}
        self.stats: SyncStats | None = None

    def _connect(self) -> Channel:
        if self._channel is None:
            self._listener.settimeout(self.timeout_s)
            try:
                sock, peer = self._listener.accept()
            except TimeoutError:
                raise WeightSyncError(f"no engine connected to {self.address} within {self.timeout_s} s") from None
            self._channel = Channel(sock, f"engine {peer[0]}:{peer[1]}")
            self._channel.send({"transfer_address": self._server.address()})
        return self._channel

    def push(self, params, version: int) -> SyncStats:
        """params: the trainer's pure-dict parameters (TrainState.params) -> the engine loads them as `version`."""
        start, devices = time.perf_counter(), jax.local_devices()
        before = peak = bytes_in_use(devices)
        flat = flat_params(params, self._leaves)
        channel = self._connect()
        channel.send({"manifest": version, "buckets": [bucket_nbytes(b) for b in self._buckets],
                      "tensors": [[tensor_name(s.path), s.rows, list(s.shape), s.dtype.name, s.bucket, s.offset,
                                   s.nbytes] for s in self.slots]})
        packed = {0: self._pack(self._buckets[0], flat)}
        for i in range(len(self._buckets)):
            if i + 1 < len(self._buckets):           # dispatched now: runs while bucket i is in flight
                packed[i + 1] = self._pack(self._buckets[i + 1], flat)
            buffer, sums, _ = packed.pop(i)
            sums = np.asarray(sums)
            peak = max(peak, bytes_in_use(devices) + (packed[i + 1][2] if packed else 0))
            if i > 0:
                self._await(channel, version, {"ack": i - 1})
            if self._in_transit is not None:
                buffer = self._in_transit(i, buffer)
            self._uuid += 1
            self._server.await_pull(self._uuid, [buffer])
            channel.send({"bucket": i, "uuid": self._uuid, "checksums": sums.tolist()})
        channel.send({"end": version})
        self._await(channel, version, {"ack": len(self._buckets) - 1})
        self._await(channel, version, {"loaded": version})
        largest = max(bucket_nbytes(b) for b in self._buckets)
        self.stats = SyncStats(time.perf_counter() - start, sum(s.nbytes for s in self.slots), len(self._buckets),
                               peak, before + 4 * largest)
        return self.stats

    def _await(self, channel: Channel, version: int, expected: dict) -> None:
        reply = channel.recv(self.timeout_s, f"{expected} of version {version}")
        if "failed" in reply:
            raise WeightSyncError(f"the engine rejected version {version}: {reply['error']}")
        if reply != expected:
            raise WeightSyncError(f"the engine answered {reply} to version {version}, expected {expected}")

    def _pack(self, bucket: list[Slot], flat) -> tuple[jax.Array, jax.Array, int]:
        """Bucket tensors (training sharding) -> (uint8 [bucket_nbytes] on this process's first device, uint32
        [tensors, 2] checksums, the packing program's temporary bytes per device); dispatched asynchronously. The
        buffer is packed split over the training mesh (one slice per device), then gathered onto the first
        device."""
        leaves = [flat[s.path] for s in bucket]
        key = (tuple(bucket), *(x.sharding for x in leaves))
        if key not in self._programs:
            mesh = leaves[0].sharding.mesh
            split = P(mesh.axis_names) if bucket_nbytes(bucket) % mesh.size == 0 else P()
            pack = jax.jit(lambda xs: _pack_bytes(xs, bucket),
                           out_shardings=(NamedSharding(mesh, split), NamedSharding(mesh, P())))
            self._programs[key] = pack.lower(leaves).compile()
        program = self._programs[key]
        buffer, sums = program(leaves)
        return (jax.device_put(buffer, SingleDeviceSharding(jax.local_devices()[0])), sums,
                program.memory_analysis().temp_size_in_bytes)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._listener.close()


def _pack_bytes(leaves: list[jax.Array], bucket: list[Slot]) -> tuple[jax.Array, jax.Array]:
    parts, end = [], 0
    for slot, x in zip(bucket, leaves):
        parts.append(jnp.zeros((slot.offset - end,), jnp.uint8))
        parts.append(jax.lax.bitcast_convert_type(slot.take(x).astype(slot.dtype), jnp.uint8).reshape(-1))
        end = slot.offset + slot.nbytes
    parts.append(jnp.zeros((bucket_nbytes(bucket) - end,), jnp.uint8))
    buffer = jnp.concatenate(parts)
    return buffer, checksums(buffer, bucket)


def _unpack_bytes(buffer: jax.Array, partial: list[jax.Array], bucket: list[Slot]) -> list[jax.Array]:
    pieces = []
    for slot in bucket:
        raw = buffer[slot.offset:slot.offset + slot.nbytes]
        if slot.dtype.itemsize > 1:
            raw = raw.reshape(-1, slot.dtype.itemsize)
        pieces.append(jax.lax.bitcast_convert_type(raw, slot.dtype).reshape(slot.shape))
    return place(bucket, pieces, partial)


def _joined(ranges: list[tuple[int, int]]) -> tuple[int, int] | None:
    """Sorted [start, stop) ranges -> their union when they follow each other without gap or overlap, else None."""
    if not ranges or any(a[1] != b[0] for a, b in zip(ranges, ranges[1:])):
        return None
    return ranges[0][0], ranges[-1][1]


class WeightReceiver:
    """The engine side: connects to a WeightSender at `sender_address` ("host:port"); receive() takes one version
    and hands it to on_version(state, version) (state: an nnx.State of create_model(engine_cfg, engine_mesh), in
    the engine's shardings) once every bucket arrived and verified.

    timeout_s: the longest wait for any one message or bucket. `version` is the last loaded version (0: none).
    """

    def __init__(self, engine_cfg, engine_mesh, sender_address: str,
                 on_version: Callable[[nnx.State, int], None], timeout_s: float = 60.0):
        self.graphdef, self._template, leaves = engine_layout(engine_cfg, engine_mesh)
        self._local = {tensor_name(leaf.path): leaf for leaf in leaves}
        self._mesh, self._landing = engine_mesh, engine_mesh.devices.flat[0]
        self.on_version, self.timeout_s = on_version, timeout_s
        self.version, self.stats = 0, None
        self._programs: dict = {}
        host, port = sender_address.rsplit(":", 1)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                sock = socket.create_connection((host, int(port)), timeout=timeout_s)
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise WeightSyncError(f"no trainer listening at {sender_address} within {timeout_s} s") from None
                time.sleep(0.1)
        self._channel = Channel(sock, f"trainer {sender_address}")
        hello = self._channel.recv(timeout_s, "the trainer's transfer address")
        self._server = _transfer_server(sock.getsockname()[0])
        self._connection = self._server.connect(hello["transfer_address"])

    def receive(self) -> int:
        """Receives the next version; returns it after on_version ran. On any failure: WeightSyncError, the trainer
        is told (where the connection still works), and `version` and the engine's weights stay as they were."""
        version = None
        try:
            message = self._channel.recv(self.timeout_s, "a version manifest")
            while "manifest" not in message:         # the rest of a version that failed on this side
                message = self._channel.recv(self.timeout_s, "a version manifest")
            version = message["manifest"]
            return self._receive(version, message)
        except WeightSyncError as e:
            failed = WeightSyncError(f"version {version} not loaded (still version {self.version}): {e}")
            try:
                self._channel.send({"failed": version, "error": str(e)})
            except WeightSyncError:
                pass
            raise failed from e

    def _receive(self, version: int, manifest: dict) -> int:
        start = time.perf_counter()
        devices = list(self._mesh.devices.flat)
        before = peak = bytes_in_use(devices)
        buckets = buckets_of(self._slots(version, manifest))
        values, unpacked = {}, []
        for i, bucket in enumerate(buckets):
            message = self._channel.recv(self.timeout_s, f"bucket {i} of version {version}")
            if message.get("bucket") != i:
                raise WeightSyncError(f"expected bucket {i} of version {version}, got {message}")
            spec = jax.ShapeDtypeStruct((manifest["buckets"][i],), jnp.uint8,
                                        sharding=SingleDeviceSharding(self._landing))
            deadline = datetime.datetime.now() + datetime.timedelta(seconds=self.timeout_s)
            try:
                buffer = self._connection.pull(message["uuid"], [spec], timeout=deadline)[0]
                sums = np.asarray(self._program("checksums", bucket)(buffer))
            except jax.errors.JaxRuntimeError as e:
                raise WeightSyncError(f"pulling bucket {i} of version {version} failed: {e}") from e
            bad = [s.name for s, got, sent in zip(bucket, sums, message["checksums"]) if list(got) != sent]
            if bad:
                raise WeightSyncError(f"checksum mismatch in bucket {i} of version {version}: {', '.join(bad)}")
            self._channel.send({"ack": i})
            jax.block_until_ready(unpacked)          # bucket i-1's unpack, so at most two buckets are in flight
            replicated = jax.device_put(buffer, NamedSharding(self._mesh, P()))
            partial = [values.pop(s.path) if s.path in values else zeros_like_leaf(self._local[tensor_name(s.path)])
                       for s in bucket if s.rows is not None]
            unpacked = self._program("unpack", bucket)(replicated, partial)
            peak = max(peak, bytes_in_use(devices))
            values.update(zip((s.path for s in bucket), unpacked))
        end = self._channel.recv(self.timeout_s, f"the end of version {version}")
        if end != {"end": version}:
            raise WeightSyncError(f"expected the end of version {version}, got {end}")
        state = build_state(self._template, values)
        jax.block_until_ready(state)
        self.on_version(state, version)
        self.version = version
        self._channel.send({"loaded": version})
        largest = max(manifest["buckets"])
        self.stats = SyncStats(time.perf_counter() - start, sum(s.nbytes for s in sum(buckets, [])), len(buckets),
                               peak, before + self._engine_bytes_per_device() + 3 * largest)
        return version

    def _slots(self, version: int, manifest: dict) -> list[Slot]:
        """The manifest's tensors, checked against this engine's model: each one present with its dtype, every
        piece's shape its rows of the tensor, every tensor's rows covered once."""
        if version <= self.version:
            raise WeightSyncError(f"version {version} is not newer than the loaded version {self.version}")
        slots, covered = [], {name: [] for name in self._local}
        for name, rows, shape, dtype, bucket, offset, nbytes in manifest["tensors"]:
            if name not in self._local:
                raise WeightSyncError(f"version {version} has tensor {name}, which the engine's model does not")
            leaf = self._local[name]
            full = tuple(leaf.spec.shape)
            want = full if rows is None else (rows[1] - rows[0], *full[1:])
            if tuple(shape) != want or np.dtype(dtype) != np.dtype(leaf.spec.dtype):
                raise WeightSyncError(f"tensor {name} (rows {rows}) of version {version} is {dtype}{list(shape)}, "
                                      f"the engine's is {np.dtype(leaf.spec.dtype).name}{list(want)}")
            covered[name].append((0, full[0] if full else 1) if rows is None else tuple(rows))
            suffix = "" if rows is None else f"[{rows[0]}:{rows[1]}]"
            slots.append(Slot(name + suffix, leaf.path, want, np.dtype(dtype), bucket, offset, nbytes,
                              None if rows is None else tuple(rows)))
        extent = {name: (0, leaf.spec.shape[0] if leaf.spec.shape else 1) for name, leaf in self._local.items()}
        wrong = sorted(name for name, ranges in covered.items() if _joined(sorted(ranges)) != extent[name])
        if wrong:
            raise WeightSyncError(f"version {version} does not cover tensors {wrong} exactly once")
        return slots

    def _program(self, kind: str, bucket: list[Slot]):
        key = (kind, tuple(bucket))
        if key not in self._programs:
            if kind == "checksums":
                self._programs[key] = jax.jit(lambda b: checksums(b, bucket))
            else:
                shardings = [self._local[tensor_name(s.path)].spec.sharding for s in bucket]
                self._programs[key] = jax.jit(lambda b, partial: _unpack_bytes(b, partial, bucket),
                                              out_shardings=shardings, donate_argnums=1)
        return self._programs[key]

    def _engine_bytes_per_device(self) -> int:
        return sum(int(np.prod(leaf.spec.sharding.shard_shape(leaf.spec.shape), dtype=np.int64))
                   * np.dtype(leaf.spec.dtype).itemsize for leaf in self._local.values())

    def close(self) -> None:
        self._channel.close()
