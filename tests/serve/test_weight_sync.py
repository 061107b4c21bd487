"""Trainer -> engine weight sync: colocated (offload, bucketed cast + reshard, restore) and disaggregated (a trainer
process pushing to this process over jax.experimental.transfer): the engine's greedy output equals the trainer's own
forward token for token, a corrupted bucket is caught by its checksum, a killed sync keeps the old version."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from kimi_jax import sharding
from kimi_jax.infer.generate import generate
from kimi_jax.serve import Engine, EngineConfig, Request
from kimi_jax.serve.transfer import WeightReceiver, _pack_bytes
from kimi_jax.serve.weight_sync import (ALIGN, ColocatedSync, WeightSyncError, bucket_nbytes, buckets_of, checksums,
                                        engine_layout, plan_buckets)
from kimi_jax.train import loop

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from weight_sync_trainer import (MAX_NEW_TOKENS, PROMPTS, build_trainer, engine_config, reference,  # noqa: E402
                                 training_config)

ROOT = pathlib.Path(__file__).resolve().parents[2]
TRAINER = pathlib.Path(__file__).parent / "weight_sync_trainer.py"
BUCKET_BYTES = 48 << 10     # the stacked experts ([2, 8, 32, 64] bf16, 64 KiB) go in pieces of one layer
LARGE_BUCKET_BYTES = 160 << 10                 # 3 buckets: fewer programs to compile where pieces do not matter
ENGINE_CFG = engine_config(loop.model_config(training_config().model))


def engine_mesh(devices):
    """The engine's decode layout: expert x tensor parallel (the trainer's is fsdp x expert)."""
    return sharding.make_mesh(expert=2, tensor=len(devices) // 2, devices=devices)


def test_plan_buckets_are_bounded_and_aligned():
    leaves = engine_layout(ENGINE_CFG)[2]
    slots = plan_buckets(leaves, 20_000)
    bias = [s for s in slots if s.name.endswith("e_score_correction_bias")]
    assert [s.dtype for s in bias] == [np.float32]                       # the router bias keeps fp32
    assert {s.dtype for s in slots if s not in bias} == {np.dtype(jnp.bfloat16)}
    for bucket in buckets_of(slots):
        assert all(s.offset % ALIGN == 0 for s in bucket)
        assert all(a.offset + a.nbytes <= b.offset for a, b in zip(bucket, bucket[1:]))
        assert bucket[-1].offset + bucket[-1].nbytes <= 20_000 or len(bucket) == 1
    by_path = {}
    for s in slots:
        by_path.setdefault(s.path, []).append(s)
    assert list(by_path) == [leaf.path for leaf in leaves]              # every tensor, in the state's order
    experts = by_path[("moe_layers", "mlp", "experts", "down_proj")]      # [2, 8, 32, 64] bf16: 64 KiB
    assert [(s.name.split(".")[-1], s.rows, s.shape) for s in experts] == [
        ("down_proj[0:1]", (0, 1), (1, 8, 32, 64)), ("down_proj[1:2]", (1, 2), (1, 8, 32, 64))]
    embed = by_path[("embed_tokens", "embedding")]                        # [272, 64] bf16, not stacked: whole
    assert [(s.rows, s.nbytes) for s in embed] == [(None, 272 * 64 * 2)]
    assert sum(s.nbytes for s in slots) == sum(np.prod(leaf.spec.shape) * leaf.spec.dtype.itemsize
                                               for leaf in leaves)


def test_checksums_name_the_corrupted_tensor():
    bucket = max(buckets_of(plan_buckets(engine_layout(ENGINE_CFG)[2], 1 << 20)), key=len)
    leaves = [jax.random.normal(jax.random.key(i), s.shape).astype(s.dtype) for i, s in enumerate(bucket)]
    buffer, sums = jax.jit(lambda xs: _pack_bytes(xs, bucket))(leaves)
    assert buffer.shape == (bucket_nbytes(bucket),)
    np.testing.assert_array_equal(checksums(buffer, bucket), sums)
    for target in (0, len(bucket) // 2, len(bucket) - 1):
        start = bucket[target].offset
        words = buffer[start:start + 8]
        corruptions = [buffer.at[start].set(buffer[start] ^ 0x80),                      # first byte
                       buffer.at[start + bucket[target].nbytes - 1].add(1),              # last byte
                       buffer.at[start:start + 8].set(jnp.roll(words, 4))]              # two words swapped
        for corrupted in corruptions:
            differs = np.any(np.asarray(checksums(corrupted, bucket)) != np.asarray(sums), axis=1)
            assert differs.tolist() == [i == target for i in range(len(bucket))]


def test_colocated_offload_sync_restore():
    """Train 2 steps on (fsdp=4, expert=2), offload the TrainState to host, build the engine's bf16 weights on
    (expert=2, tensor=4) bucket by bucket, generate; restore the trainer with one copy."""
    cfg, state, step, batch = build_trainer(fsdp=4, expert=2)
    for _ in range(2):
        state, _ = step(state, batch)
    train_mesh = jax.tree.leaves(state.params)[0].sharding.mesh
    expected = reference(cfg, state.params, train_mesh)
    saved = jax.device_get(state)

    mesh = engine_mesh(jax.devices())
    sync = ColocatedSync(ENGINE_CFG, mesh, bucket_bytes=BUCKET_BYTES)
    host = sync.offload(state)
    assert all(x.is_deleted() for x in jax.tree.leaves(state))
    assert {x.sharding.memory_kind for x in jax.tree.leaves(host)} == {"pinned_host"}
    engine_state, version = sync.to_engine(host.params)
    assert version == 1 and sync.stats.buckets > 1 and any(s.rows for s in sync.slots)
    assert sync.stats.peak_bytes <= sync.stats.bound_bytes, sync.stats

    trainer = traverse_util.flatten_dict(saved.params)
    layout = {leaf.path: leaf.spec for leaf in engine_layout(ENGINE_CFG, mesh)[2]}
    for path, var in nnx.to_flat_state(engine_state):
        value = var.get_value()
        assert value.dtype == (jnp.float32 if path[-1] == "e_score_correction_bias" else jnp.bfloat16)
        assert value.sharding.is_equivalent_to(layout[path].sharding, value.ndim), path
        np.testing.assert_array_equal(np.asarray(value), trainer[path].astype(value.dtype), err_msg=str(path))

    out = generate(nnx.merge(sync.graphdef, engine_state), PROMPTS, max_new_tokens=MAX_NEW_TOKENS,
                   return_logits=True)
    np.testing.assert_array_equal(out.tokens, expected.tokens)
    np.testing.assert_allclose(out.logits[:, 0], expected.logits[:, 0], rtol=1e-5, atol=1e-5)

    restored = sync.restore(host)
    assert {x.sharding.memory_kind for x in jax.tree.leaves(restored)} == {"device"}
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(np.asarray(a), b)
    state, metrics = step(restored, batch)                                 # training goes on
    assert np.isfinite(float(metrics["loss"]))


class Trainer:
    """weight_sync_trainer.py in a subprocess with 4 CPU devices; its JSON lines one at a time."""

    def __init__(self, *flags, bucket_bytes=BUCKET_BYTES):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
                   PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen([sys.executable, str(TRAINER), f"--bucket_bytes={bucket_bytes}", *flags],
                                     cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.log = []

    def next(self, key):
        for line in self.proc.stdout:
            self.log.append(line)
            if line.startswith("{") and key in (message := json.loads(line)):
                return message
        raise AssertionError(f"the trainer exited (code {self.proc.wait()}) before printing {key!r}:\n"
                             + "".join(self.log[-30:]))

    def finish(self):
        out, _ = self.proc.communicate(timeout=300)
        return self.proc.returncode, "".join(self.log) + out


def receiver(trainer, loaded, timeout_s=120.0):
    address = trainer.next("listening")["listening"]
    return WeightReceiver(ENGINE_CFG, engine_mesh(jax.devices()[4:]), address,
                          lambda state, version: loaded.append((version, state)), timeout_s=timeout_s)


def test_disaggregated_sync_after_training():
    """Two versions, 2 training steps apart, each loaded into a running Engine (which serves the old version until
    the new one is complete): its greedy output equals the trainer's own forward, token for token."""
    trainer = Trainer("--versions=2", "--steps_per_version=2", "--reference")
    loaded = []
    receiving = receiver(trainer, loaded)
    serving, first_logprobs = None, []
    for version in (1, 2):
        expected = trainer.next("tokens")
        assert receiving.receive() == version and receiving.version == version
        assert trainer.next("pushed")["pushed"] == version
        assert loaded[-1][0] == version and receiving.stats.buckets > 1
        if serving is None:
            serving = Engine(nnx.merge(receiving.graphdef, loaded[-1][1]), EngineConfig(
                max_slots=4, page_size=8, num_pages=16, max_seq_len=16, decode_steps=4), weight_version=version)
        else:
            serving.load_weights(loaded[-1][1], version)                   # swapped between two steps
        ids = [serving.add_request(Request(p, max_tokens=MAX_NEW_TOKENS)) for p in PROMPTS]
        serving.run()
        for row, rid in enumerate(ids):
            sample = serving.result(rid).samples[0]
            assert sample.tokens == list(expected["tokens"][row]) and sample.weight_versions == [version]
            want = jax.nn.log_softmax(jnp.asarray(expected["logits"][row], jnp.float32))[sample.tokens[0]]
            np.testing.assert_allclose(sample.logprobs[0], float(want), atol=1e-4)
        first_logprobs.append([serving.result(rid).samples[0].logprobs[0] for rid in ids])
    assert np.max(np.abs(np.subtract(*first_logprobs))) > 1e-4               # training moved the weights
    code, log = trainer.finish()
    assert code == 0, log[-3000:]


def test_corrupted_bucket_is_rejected_and_the_old_version_kept():
    trainer = Trainer("--versions=2", "--steps_per_version=0", "--corrupt=2:1", bucket_bytes=LARGE_BUCKET_BYTES)
    loaded = []
    engine = receiver(trainer, loaded)
    assert engine.receive() == 1
    first_of_bucket_1 = buckets_of(plan_buckets(engine_layout(ENGINE_CFG)[2], LARGE_BUCKET_BYTES))[1][0].name
    with pytest.raises(WeightSyncError, match=rf"version 2 not loaded \(still version 1\): checksum mismatch in "
                                              rf"bucket 1 of version 2: {first_of_bucket_1}$"):
        engine.receive()
    assert engine.version == 1 and [v for v, _ in loaded] == [1]
    assert "checksum mismatch in bucket 1" in trainer.next("rejected")["error"]
    assert engine.receive() == 2                                           # the clean retry of version 2
    assert [v for v, _ in loaded] == [1, 2]
    code, log = trainer.finish()
    assert code == 0, log[-3000:]


def test_killed_sync_keeps_the_old_version():
    """The trainer is SIGKILLed in the middle of version 2 (before offering bucket 1)."""
    trainer = Trainer("--versions=2", "--steps_per_version=0", "--kill_at=2:1", bucket_bytes=LARGE_BUCKET_BYTES)
    loaded = []
    engine = receiver(trainer, loaded)
    assert engine.receive() == 1
    old = [np.asarray(v.get_value()) for _, v in nnx.to_flat_state(loaded[0][1])]
    with pytest.raises(WeightSyncError, match=r"version 2 not loaded \(still version 1\): trainer .* closed the "
                                              r"connection; was waiting for bucket 1 of version 2"):
        engine.receive()
    assert engine.version == 1 and [v for v, _ in loaded] == [1]
    for a, (_, b) in zip(old, nnx.to_flat_state(loaded[0][1])):
        np.testing.assert_array_equal(a, np.asarray(b.get_value()))
    code, _ = trainer.finish()
    assert code == -9
