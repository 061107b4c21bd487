"""Tests for the orbax training checkpointer: async save/keep, resharded restore, resume, SIGTERM."""
import errno
import gc
import json
import logging
import os
import re
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time
import types
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from kimi_jax.checkpoint import orbax_io
from kimi_jax.checkpoint.orbax_io import CheckpointMismatchError, SigtermFlag, TrainCheckpointer
from kimi_jax.sharding import make_mesh


class Moments(NamedTuple):
    mu: jax.Array
    nu: jax.Array


def host_state(step):
    """Numpy values that depend on the step, so checkpoints of different steps differ.

    ``w`` is large enough (2 KiB per shard) that orbax stores its chunks apart from the metadata.
    """
    w = np.arange(64 * 64, dtype=np.float32).reshape(64, 64) / 7 + step
    emb = (np.arange(32, dtype=np.float32).reshape(16, 2) - step).astype(jnp.bfloat16)
    return {"params": {"w": w, "emb": emb},
            "opt": Moments(mu=w * 0.5, nu=w * w),
            "step": np.int32(step),
            "rng": np.stack([np.uint32([step, 7]), np.uint32([3, step])])}


def specs():
    """PartitionSpecs of the state on a (data, fsdp, expert, tensor) mesh."""
    return {"params": {"w": P(("data", "fsdp"), "expert"), "emb": P("expert")},
            "opt": Moments(mu=P(("data", "fsdp")), nu=P(None, "expert")),
            "step": P(), "rng": P()}


def device_state(step, mesh):
    """The step's state on `mesh`; `rng` is a typed threefry key array of shape (2,)."""
    values = host_state(step)
    values["rng"] = jax.random.wrap_key_data(values["rng"])
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs())
    return jax.tree.map(jax.device_put, values, shardings)


def abstract(step_state, sharding_of):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_of(x)), step_state)


def as_host(state):
    """State as numpy, typed keys as their uint32 data."""
    def leaf(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)
    return jax.tree.map(leaf, state)


def assert_state_equal(state, step):
    want, got = host_state(step), as_host(state)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)


def save_steps(directory, steps, mesh, **kwargs):
    with TrainCheckpointer(directory, **kwargs) as ckpt:
        for step in steps:
            ckpt.save(step, device_state(step, mesh), {"data": {"position": step * 10}}, force=True)


def test_async_save_keep_and_restore_onto_other_meshes(tmp_path):
    mesh = make_mesh(2, 2, 2, 1)
    ckpt = TrainCheckpointer(tmp_path, keep=2, save_every=3)
    assert ckpt.latest_step() is None
    started = [ckpt.save(s, device_state(s, mesh), {"data": {"position": s * 10}, "loss": 1.5})
               for s in range(1, 10)]
    assert started == [s % 3 == 0 for s in range(1, 10)]
    assert not ckpt.save(9, device_state(9, mesh), {}, force=True)  # already saved
    ckpt.wait()
    assert ckpt.all_steps() == [6, 9]
    ckpt.close()

    resumed = TrainCheckpointer(tmp_path, keep=2, save_every=3)
    assert resumed.latest_step() == 9
    target_mesh = make_mesh(8, 1, 1, 1)
    on_8x1 = abstract(device_state(0, target_mesh), lambda x: x.sharding)
    state, extra = resumed.restore(on_8x1)
    assert extra == {"data": {"position": 90}, "loss": 1.5}
    assert_state_equal(state, 9)
    assert state["rng"].dtype == device_state(0, mesh)["rng"].dtype
    assert state["params"]["w"].sharding == on_8x1["params"]["w"].sharding
    assert state["params"]["w"].sharding.spec == P(("data", "fsdp"), "expert")

    device = jax.devices()[5]
    on_one = abstract(device_state(0, target_mesh), lambda x: SingleDeviceSharding(device))
    state, extra = resumed.restore(on_one, step=6)
    assert extra["data"]["position"] == 60
    assert_state_equal(state, 6)
    assert all(x.sharding == SingleDeviceSharding(device) for x in jax.tree.leaves(state))
    resumed.close()


def test_typed_key_and_raw_key_data_interchange(tmp_path):
    mesh = make_mesh(2, 2, 2, 1)
    save_steps(tmp_path, [4], mesh)  # rng saved as a typed key array
    typed = abstract(device_state(0, mesh), lambda x: x.sharding)
    raw = dict(typed, rng=jax.ShapeDtypeStruct((2, 2), jnp.uint32, sharding=typed["rng"].sharding))
    with TrainCheckpointer(tmp_path) as ckpt:
        state, _ = ckpt.restore(raw)
        assert state["rng"].dtype == jnp.uint32
        np.testing.assert_array_equal(np.asarray(state["rng"]), host_state(4)["rng"])
        ckpt.save(6, dict(state, step=jnp.int32(6)), {}, force=True)  # rng saved as uint32 data
        ckpt.wait()
        state, _ = ckpt.restore(typed, step=6)
    assert jax.dtypes.issubdtype(state["rng"].dtype, jax.dtypes.prng_key)
    assert jax.random.key_impl(state["rng"]) == jax.random.key_impl(jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(state["rng"])),
                                  host_state(4)["rng"])
    assert int(state["step"]) == 6


def test_mismatched_target_names_the_tensor_and_keeps_the_checkpoint(tmp_path):
    mesh = make_mesh(2, 2, 2, 1)
    save_steps(tmp_path, [2], mesh)
    with TrainCheckpointer(tmp_path) as ckpt:
        target = abstract(device_state(0, mesh), lambda x: x.sharding)
        wrong_shape = dict(target, params=dict(target["params"], w=jax.ShapeDtypeStruct(
            (64, 32), jnp.float32, sharding=target["params"]["w"].sharding)))
        with pytest.raises(CheckpointMismatchError, match=r"'params\.w' is float32\[64, 64\] in "
                                                          r"the checkpoint but float32\[64, 32\]"):
            ckpt.restore(wrong_shape)
        extra_leaf = dict(target, bias=target["step"])
        with pytest.raises(CheckpointMismatchError, match=r"\['bias'\] of the restore target"):
            ckpt.restore(extra_leaf)
        unsharded = dict(target, step=jax.ShapeDtypeStruct((), jnp.int32))
        with pytest.raises(ValueError, match="restore target 'step' has no sharding"):
            ckpt.restore(unsharded)
        assert ckpt.latest_step() == 2
        state, _ = ckpt.restore(target)
    assert_state_equal(state, 2)


def test_extra_must_be_json(tmp_path):
    with TrainCheckpointer(tmp_path, async_save=False) as ckpt:
        with pytest.raises(TypeError, match="extra must be a JSON-serialisable dict"):
            ckpt.save(1, {"x": jnp.zeros(2)}, {"bad": np.float32(1)}, force=True)
        assert ckpt.latest_step() is None


def largest_data_file(directory):
    """The largest file in a ``d/`` folder of the OCDBT store: array chunks of ``params.w``."""
    files = [p for p in directory.rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


def errors_of_checkpointer(caplog):
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.ERROR and r.name == "kimi_jax.checkpoint.orbax_io"]


# orbax abandons the reads of the other shards once one fails; their late errors ("RuntimeError:
# Event loop is closed" from tensorstore callbacks, coroutines collected unfinished, asyncio's
# "exception was never retrieved") must not reach the user: an unraisable exception fails the test.
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_corrupt_latest_data_falls_back_to_previous(tmp_path, caplog, capsys, damage):
    mesh = make_mesh(2, 2, 2, 1)
    save_steps(tmp_path, [3, 5], mesh)
    victim = largest_data_file(tmp_path / "5" / "state")
    if damage == "delete":
        victim.unlink()
    else:
        os.truncate(victim, victim.stat().st_size // 2)

    ckpt = TrainCheckpointer(tmp_path)
    assert ckpt.latest_step() == 5  # the metadata is intact: only reading the arrays fails
    with caplog.at_level(logging.WARNING):
        state, extra = ckpt.restore(abstract(device_state(0, mesh), lambda x: x.sharding))
        time.sleep(0.5)          # let the abandoned reads finish and be collected
        gc.collect()
        # the same noise as it may arrive at any later time: a tensorstore callback finding
        # orbax's event loop closed, and asyncio reporting an abandoned read of orbax's
        sys.unraisablehook(types.SimpleNamespace(
            exc_type=RuntimeError, exc_value=RuntimeError("Event loop is closed"),
            exc_traceback=None, err_msg=None, object=None))
        logging.getLogger("asyncio").error(
            "Task exception was never retrieved\nfuture: <Task finished coro=<_read_array_index_"
            "and_device_put() done, defined at .../orbax/checkpoint/_src/serialization/"
            "serialization.py:272> exception=Exception('Encountered error')>")
    assert_state_equal(state, 3)
    assert extra == {"data": {"position": 30}}
    errors = errors_of_checkpointer(caplog)
    assert len(errors) == 1, errors
    assert "step 5" in errors[0] and "corrupt" in errors[0] and "using step 3 instead" in errors[0]
    assert re.search(r"(Truncated|OUT_OF_RANGE|NOT_FOUND|DATA_LOSS)", errors[0]), errors[0]
    noise = caplog.text + capsys.readouterr().err
    for text in ("Event loop is closed", "never retrieved", "Exception ignored", "Traceback"):
        assert text not in noise, noise[-3000:]
    assert not [r for r in caplog.records if r.name == "asyncio"]
    assert ckpt.latest_step() == 3 and ckpt.all_steps() == [3]
    assert [p.name.split("-")[0] for p in (tmp_path / "corrupt").iterdir()] == ["5"]

    assert ckpt.save(5, device_state(5, mesh), {"data": {"position": 50}}, force=True)
    ckpt.close()
    with TrainCheckpointer(tmp_path) as again:
        state, _ = again.restore(abstract(device_state(0, mesh), lambda x: x.sharding))
    assert_state_equal(state, 5)


def test_unreadable_latest_metadata_is_skipped_on_construction(tmp_path, caplog):
    mesh = make_mesh(2, 2, 2, 1)
    save_steps(tmp_path, [3, 5], mesh)
    os.truncate(tmp_path / "5" / "state" / "_METADATA", 10)
    with caplog.at_level(logging.WARNING, logger="kimi_jax.checkpoint.orbax_io"):
        ckpt = TrainCheckpointer(tmp_path)
    assert ckpt.latest_step() == 3
    errors = errors_of_checkpointer(caplog)
    assert len(errors) == 1 and "step 5" in errors[0], errors
    assert "metadata unreadable (JSONDecodeError" in errors[0]
    assert "using step 3 instead" in errors[0]
    state, _ = ckpt.restore(abstract(device_state(0, mesh), lambda x: x.sharding))
    assert_state_equal(state, 3)
    ckpt.close()


def failing(call, errors):
    """`call` that raises the given exceptions first, one per call, then calls through."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(args)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return call(*args, **kwargs)

    wrapped.calls = calls
    return wrapped


def test_other_read_errors_are_retried_then_raised_leaving_the_checkpoint(tmp_path, caplog,
                                                                          monkeypatch):
    mesh = make_mesh(2, 2, 2, 1)
    save_steps(tmp_path, [3, 5], mesh)
    target = abstract(device_state(0, mesh), lambda x: x.sharding)
    ckpt = TrainCheckpointer(tmp_path, read_attempts=3, retry_delay=0.0)
    real_read = orbax_io._read_item

    # A transient I/O error twice, then the read works: step 5 is restored, nothing moved aside.
    eio = OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(orbax_io, "_read_item", failing(real_read, [eio, eio]))
    with caplog.at_level(logging.WARNING, logger="kimi_jax.checkpoint.orbax_io"):
        state, _ = ckpt.restore(target)
    assert_state_equal(state, 5)
    retries = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(retries) == 2 and "attempt 1 of 3" in retries[0]
    assert "Input/output error" in retries[0]

    # An error that says nothing about missing or corrupt data, every time: raised after 3 attempts.
    reset = [RuntimeError("connection reset by peer")] * 3
    monkeypatch.setattr(orbax_io, "_read_item", failing(real_read, reset))
    with pytest.raises(RuntimeError, match="connection reset by peer"):
        ckpt.restore(target)
    assert len(orbax_io._read_item.calls) == 3
    assert ckpt.all_steps() == [3, 5] and not (tmp_path / "corrupt").exists()
    assert not errors_of_checkpointer(caplog)
    ckpt.close()

    # The same on construction, while checking the newest step's metadata.
    monkeypatch.setattr(orbax_io, "_read_tree_metadata", failing(orbax_io._read_tree_metadata,
                                                                 [eio] * 2))
    with pytest.raises(OSError, match="Input/output error"):
        TrainCheckpointer(tmp_path, read_attempts=2, retry_delay=0.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3", "5"]


def json_error():
    try:
        json.loads('{"data": ')
    except json.JSONDecodeError as e:
        return e


def chained(outer, inner):
    try:
        raise outer from inner
    except Exception as e:  # noqa: BLE001
        return e


@pytest.mark.parametrize("error, corrupt", [
    (json_error(), True),
    (FileNotFoundError("File /ckpt/5/extra/metadata not found."), True),
    (FileNotFoundError(errno.ENOENT, "No such file", "/elsewhere/tokenizer.model"), False),
    (chained(Exception("Encountered error while reading array index: (slice(0, 8, 1),)"),
             ValueError('OUT_OF_RANGE: Error reading "w/0.0" in OCDBT database at local file '
                        '"/ckpt/5/state/": Requested byte range [0, 9) is not valid')), True),
    (ValueError('FAILED_PRECONDITION: Error reading "w/0": Truncated Zstd-compressed'), True),
    (ValueError('DATA_LOSS: Error decoding local file "/ckpt/5/state/manifest.ocdbt"'), True),
    (ValueError('NOT_FOUND: Metadata at "w/.zarray" does not exist'), True),
    (OSError(errno.EIO, "Input/output error"), False),
    (RuntimeError("connection reset by peer"), False),
    (ValueError('UNAVAILABLE: Error reading "/runs/corrupt_truncated/5/state/d/ab"'), False),
])
def test_only_recognisable_corruption_counts_as_corrupt(error, corrupt):
    assert (orbax_io._corruption(error, orbax_io.epath.Path("/ckpt/5")) is not None) == corrupt


def test_leftover_temporary_folder_is_reported_and_ignored(tmp_path, caplog):
    mesh = make_mesh(2, 2, 2, 1)
    save_steps(tmp_path, [3, 5], mesh)
    # An interrupted save of step 7: a partial copy never renamed to its final name.
    partial = tmp_path / "7.orbax-checkpoint-tmp"
    (tmp_path / "5").rename(partial)
    largest_data_file(partial).unlink()
    with caplog.at_level(logging.WARNING, logger="kimi_jax.checkpoint.orbax_io"):
        ckpt = TrainCheckpointer(tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step 7" in w and "interrupted save" in w for w in warnings), warnings
    assert ckpt.latest_step() == 3
    state, extra = ckpt.restore(abstract(device_state(0, mesh), lambda x: x.sharding))
    assert_state_equal(state, 3)
    assert ckpt.save(7, device_state(7, mesh), {"data": {"position": 70}}, force=True)
    ckpt.close()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name[0].isdigit()) == ["3", "7"]


WORKER = textwrap.dedent("""
    import sys, time
    import jax
    directory, num_processes, process_id, port = sys.argv[1], *map(int, sys.argv[2:])
    if num_processes > 1:
        jax.distributed.initialize(f"localhost:{port}", num_processes, process_id)
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from kimi_jax.checkpoint.orbax_io import SigtermFlag, TrainCheckpointer
    from kimi_jax.sharding import make_mesh

    def state(step, mesh, specs):
        values = {"w": np.arange(64 * 64, dtype=np.float32).reshape(64, 64) + step,
                  "step": np.int32(step)}
        return {k: jax.make_array_from_callback(v.shape, NamedSharding(mesh, specs[k]),
                                                lambda i, v=v: v[i]) for k, v in values.items()}

    mesh = make_mesh(2, 2, jax.device_count() // 4, 1)
    specs = {"w": P(("data", "fsdp"), "expert"), "step": P()}
    ckpt = TrainCheckpointer(directory, keep=2, save_every=1000)
    stop = SigtermFlag()
    step = 0
    while True:
        step += 1
        ckpt.save(step, state(step, mesh, specs), {"position": step})
        if step == 3:
            print("running", flush=True)
        if stop.should_stop(step):
            break
        time.sleep(0.01)
    ckpt.save(step, state(step, mesh, specs), {"position": step}, force=True)
    ckpt.close()

    resumed = TrainCheckpointer(directory)
    other = make_mesh(jax.device_count(), 1, 1, 1)
    target = state(0, other, {"w": P("data"), "step": P()})
    restored, extra = resumed.restore(jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target))
    want = state(step, other, {"w": P("data"), "step": P()})
    same = all(np.array_equal(a.data, b.data) for k in want
               for a, b in zip(restored[k].addressable_shards, want[k].addressable_shards))
    print("saved", step, "resumed", resumed.latest_step(), extra["position"], same, flush=True)
""")


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def read_until(proc, line, timeout):
    """Stdout of `proc` up to and including `line` (other lines, e.g. from gloo, may precede it)."""
    deadline, out = time.monotonic() + timeout, b""
    while line not in out.decode().splitlines():
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(proc.stdout.fileno(), 4096) if ready else b""
        if not chunk:
            pytest.fail(f"no line {line!r} from the worker within {timeout} s: {out.decode()}")
        out += chunk
    return out.decode()


@pytest.mark.parametrize("num_processes", [1, 2])
def test_sigterm_saves_and_exits_cleanly(tmp_path, num_processes):
    """SIGTERM to process 0 only: every process stops at the same step, saves it and exits 0."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    port, logs = free_port(), [tmp_path / f"stderr_{i}.txt" for i in range(num_processes)]
    directory = tmp_path / "checkpoints"
    log_files = [log.open("w") for log in logs]
    procs = [subprocess.Popen(
        [sys.executable, "-c", WORKER, str(directory), str(num_processes), str(i), str(port)],
        stdout=subprocess.PIPE, stderr=log_file, env=env) for i, log_file in enumerate(log_files)]
    try:
        for proc in procs:
            read_until(proc, "running", timeout=120)
        procs[0].send_signal(signal.SIGTERM)
        outputs = [proc.communicate(timeout=120)[0].decode() for proc in procs]
    finally:
        for proc, log_file in zip(procs, log_files):
            proc.kill()
            proc.communicate()
            log_file.close()
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log.read_text()[-3000:]
    lines = [out.strip().splitlines()[-1].split() for out in outputs]
    step = int(lines[0][1])
    assert step >= 3
    assert all(line == ["saved", str(step), "resumed", str(step), str(step), "True"]
               for line in lines), lines

    mesh = make_mesh(2, 2, 2, 1)
    target = {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32,
                                        sharding=NamedSharding(mesh, P("expert", "data"))),
              "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))}
    with TrainCheckpointer(directory) as ckpt:
        assert ckpt.latest_step() == step
        state, extra = ckpt.restore(target)
    assert extra == {"position": step}
    assert int(state["step"]) == step
    np.testing.assert_array_equal(
        np.asarray(state["w"]), np.arange(64 * 64, dtype=np.float32).reshape(64, 64) + step)


AGREEMENT_WORKER = textwrap.dedent("""
    import errno, os, sys
    import jax
    directory, port, process_id = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    jax.distributed.initialize(f"localhost:{port}", 2, process_id)
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P
    from kimi_jax.checkpoint import orbax_io
    from kimi_jax.checkpoint.orbax_io import TrainCheckpointer
    from kimi_jax.sharding import make_mesh

    sharding = NamedSharding(make_mesh(jax.device_count(), 1, 1, 1), P("data"))
    noise = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)

    def state(step):
        return {"w": jax.make_array_from_callback((64, 64), sharding, lambda i: (noise + step)[i])}

    with TrainCheckpointer(directory, async_save=False) as ckpt:
        for step in (3, 5):
            ckpt.save(step, state(step), {"step": step}, force=True)
    target = {"w": jax.ShapeDtypeStruct((64, 64), np.float32, sharding=sharding)}

    # A transient error on process 1 only: both processes read again, step 5 is restored.
    ckpt = TrainCheckpointer(directory, retry_delay=0.0)
    real_read, calls = orbax_io._read_item, []
    def flaky(*args, **kwargs):
        calls.append(1)
        if process_id == 1 and len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error")
        return real_read(*args, **kwargs)
    orbax_io._read_item = flaky
    _, extra = ckpt.restore(target)
    orbax_io._read_item = real_read
    ckpt.close()
    print("reads", len(calls), flush=True)
    print("retried", extra["step"], flush=True)

    # Step 5's arrays truncated where only process 1 reads them: both move it aside, restore 3.
    multihost_utils.sync_global_devices("before_truncating")
    if process_id == 1:
        data = os.path.join(directory, "5", "state", "ocdbt.process_1", "d")
        for name in os.listdir(data):
            os.truncate(os.path.join(data, name), os.path.getsize(os.path.join(data, name)) // 2)
    multihost_utils.sync_global_devices("after_truncating")
    with TrainCheckpointer(directory, retry_delay=0.0) as ckpt:
        restored, extra = ckpt.restore(target)
        same = all(np.array_equal(np.asarray(s.data), (noise + 3)[s.index])
                   for s in restored["w"].addressable_shards)
        print("fallback", extra["step"], same, ckpt.all_steps(), flush=True)
""")


def test_processes_agree_to_retry_and_to_move_a_corrupt_step_aside(tmp_path):
    """2 processes: an error on one makes both retry; corruption one sees makes both fall back."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    port, directory = free_port(), tmp_path / "checkpoints"
    procs = [subprocess.Popen(
        [sys.executable, "-c", AGREEMENT_WORKER, str(directory), str(port), str(i)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True) for i in range(2)]
    try:
        outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    # process 0 read state and extra twice (its first good read was discarded when process 1
    # failed), process 1 failed once and then read both
    for proc, out, reads in zip(procs, outputs, ["reads 4", "reads 3"]):
        assert proc.returncode == 0, out[-3000:]
        lines = [line for line in out.splitlines()
                 if line.startswith(("reads", "retried", "fallback"))]
        assert lines == [reads, "retried 5", "fallback 3 True [3]"], out[-3000:]
    assert "unusable: corrupt on another process" in outputs[0]     # process 0 read it fine
    assert [p.name.split("-")[0] for p in (directory / "corrupt").iterdir()] == ["5"]
    assert "Event loop is closed" not in outputs[0] + outputs[1]


def test_sigterm_flag_is_set_by_the_signal_and_uninstalls():
    before = signal.getsignal(signal.SIGTERM)
    flag = SigtermFlag()
    try:
        assert not flag.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.should_stop(2)
    finally:
        flag.uninstall()
    assert signal.getsignal(signal.SIGTERM) == before
