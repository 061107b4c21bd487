"""HF checkpoint export/import: bit-exact round trip, sharded import, block-FP8, errors that name the tensor."""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kimi_jax
from kimi_jax import sharding
from kimi_jax.checkpoint import hf
from kimi_jax.checkpoint.safetensors_io import CheckpointReader, write_checkpoint

CFG = kimi_jax.tiny().replace(num_hidden_layers=3)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = kimi_jax.create_model(CFG, seed=5)
    path = tmp_path_factory.mktemp("hf") / "ckpt"
    kimi_jax.save_hf(model, path, max_shard_bytes=200_000)
    return model, path


def leaves(model):
    return jax.tree.leaves(nnx.state(model))


def test_round_trip_is_bit_exact(exported):
    model, path = exported
    assert (path / "model.safetensors.index.json").exists()
    loaded = kimi_jax.load_hf(path)
    assert loaded.cfg == CFG
    for a, b in zip(leaves(model), leaves(loaded)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_export_uses_hf_names_and_layout(exported):
    model, path = exported
    with CheckpointReader(path) as r:
        names = set(r.names())
        assert "model.layers.1.mlp.experts.7.down_proj.weight" in names
        assert "model.layers.0.mlp.gate_proj.weight" in names
        assert r.shape("model.layers.0.self_attn.q_b_proj.weight") == (
            CFG.num_attention_heads * CFG.qk_head_dim, CFG.q_lora_rank)
        w = r.read("model.layers.2.mlp.experts.3.up_proj.weight")
        np.testing.assert_array_equal(w, np.asarray(model.moe_layers.mlp.experts.up_proj[...][1, 3]).T)
        assert len(names) == sum(len(t.names) for t in hf.tensor_map(CFG, nnx.state(model)))
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == CFG.model_type and config["num_hidden_layers"] == 3


def test_bf16_round_trip(tmp_path):
    model = kimi_jax.create_model(CFG.replace(param_dtype="bfloat16", dtype="bfloat16"), seed=1)
    kimi_jax.save_hf(model, tmp_path / "bf16")
    with CheckpointReader(tmp_path / "bf16" / "model.safetensors") as r:
        assert r.dtype("model.embed_tokens.weight") == jnp.bfloat16
    loaded = kimi_jax.load_hf(tmp_path / "bf16", dtype=jnp.bfloat16)
    for a, b in zip(leaves(model), leaves(loaded)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_sharded_import(exported):
    model, path = exported
    mesh = sharding.make_mesh(1, 2, 2, 2)
    loaded = kimi_jax.load_hf(path, mesh=mesh)
    experts = loaded.moe_layers.mlp.experts.gate_proj[...]
    assert experts.sharding.spec == jax.sharding.PartitionSpec(None, "expert", "fsdp", "tensor")
    assert experts.addressable_shards[0].data.shape[1] == CFG.n_routed_experts // 2
    for a, b in zip(leaves(model), leaves(loaded)):
        np.testing.assert_array_equal(a, b)


def test_fp8_export_and_import(tmp_path, exported):
    model, _ = exported
    kimi_jax.save_hf(model, tmp_path / "fp8", fp8=True)
    with CheckpointReader(tmp_path / "fp8") as r:
        assert r.is_quantized("model.layers.1.mlp.experts.0.gate_proj.weight")
        assert not r.is_quantized("model.layers.1.mlp.gate.weight")
        assert not r.is_quantized("lm_head.weight")
    loaded = kimi_jax.load_hf(tmp_path / "fp8")
    w = np.asarray(model.moe_layers.mlp.experts.gate_proj[...])
    got = np.asarray(loaded.moe_layers.mlp.experts.gate_proj[...])
    # e4m3 keeps 3 mantissa bits: error <= 2^-4 of each 128x128 block's max (here one block per matrix)
    bound = np.abs(w).max(axis=(-2, -1), keepdims=True) * 2.0 ** -4
    assert np.all(np.abs(got - w) <= bound + 1e-12)
    np.testing.assert_array_equal(loaded.lm_head.kernel[...], model.lm_head.kernel[...])


def rewrite(src, dst, drop=(), add=None, reshape=None):
    """Copy checkpoint src to dst, dropping / adding / re-shaping tensors."""
    with CheckpointReader(src) as r:
        tensors = [(n, r.shape(n), r.dtype(n), lambda n=n: r.read(n)) for n in r.names() if n not in drop]
        if reshape:
            tensors = [(n, (s[1], s[0]), d, lambda p=p: p().T.copy()) if n == reshape else (n, s, d, p)
                       for n, s, d, p in tensors]
        if add:
            tensors.append((add, (2,), np.float32, lambda: np.zeros(2, np.float32)))
        write_checkpoint(dst, tensors, extra_files={"config.json": (src / "config.json").read_text()})


@pytest.mark.parametrize("kind", ["missing", "unexpected", "shape"])
def test_bad_checkpoints_name_the_tensor(exported, tmp_path, kind):
    _, path = exported
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    if kind == "missing":
        rewrite(path, tmp_path / "bad", drop=(name,))
    elif kind == "unexpected":
        rewrite(path, tmp_path / "bad", add="model.layers.1.self_attn.mystery.weight")
        name = "mystery"
    else:
        rewrite(path, tmp_path / "bad", reshape=name)
    with pytest.raises(ValueError, match=name.replace(".", r"\.") if kind != "unexpected" else name):
        kimi_jax.load_hf(tmp_path / "bad")


def test_failed_export_keeps_the_previous_checkpoint(exported, tmp_path, monkeypatch):
    model, path = exported
    target = tmp_path / "ckpt"
    shutil.copytree(path, target)
    before = sorted(p.name for p in target.iterdir())
    calls = {"n": 0}
    real = jax.device_get

    def failing(x):
        calls["n"] += 1
        if calls["n"] == 10:
            raise OSError("disk full")
        return real(x)

    monkeypatch.setattr(hf.jax, "device_get", failing)
    with pytest.raises(OSError, match="disk full"):
        kimi_jax.save_hf(model, target)
    monkeypatch.undo()
    assert sorted(p.name for p in target.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    for a, b in zip(leaves(model), leaves(kimi_jax.load_hf(target))):
        np.testing.assert_array_equal(a, b)


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


MULTIHOST_WORKER = textwrap.dedent("""
    import sys
    import jax
    out, port, process_id = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", 2, process_id)
    from flax import nnx
    import kimi_jax
    from kimi_jax import sharding
    cfg = kimi_jax.tiny().replace(num_hidden_layers=3)
    mesh = sharding.make_mesh(1, 4, 2, 1)  # 8 devices over both processes: nothing is on one host
    model = kimi_jax.create_model(cfg, mesh=mesh, seed=5)
    assert not any(x.is_fully_addressable for x in jax.tree.leaves(nnx.state(model)))
    kimi_jax.save_hf(model, out + "/fp32", max_shard_bytes=200_000)
    kimi_jax.save_hf(model, out + "/fp8", max_shard_bytes=200_000, fp8=True)
    print("exported", flush=True)
""")


@pytest.mark.slow
def test_multihost_export_equals_single_process(exported, tmp_path):
    """2 processes x 4 CPU devices (gloo), parameters sharded across both: save_hf all-gathers tensor by tensor
    in the writer's order and writes the same checkpoint as one process does (fp32 and block-FP8)."""
    model, path = exported
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    procs = [subprocess.Popen([sys.executable, "-c", MULTIHOST_WORKER, str(tmp_path), str(port), str(i)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    outputs = [p.communicate(timeout=600)[0].decode() for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0 and "exported" in out, out[-3000:]
    kimi_jax.save_hf(model, tmp_path / "fp8_single", max_shard_bytes=200_000, fp8=True)
    for multi, single in ((tmp_path / "fp32", path), (tmp_path / "fp8", tmp_path / "fp8_single")):
        assert sorted(p.name for p in multi.iterdir()) == sorted(p.name for p in single.iterdir())
        with CheckpointReader(multi) as a, CheckpointReader(single) as b:
            assert a.names() == b.names() and a.scale_names() == b.scale_names()
            for name in b.names() + b.scale_names():
                np.testing.assert_array_equal(a.read(name), b.read(name), err_msg=name)
        for file in single.iterdir():  # same bytes, so the same layout and metadata too
            assert (multi / file.name).read_bytes() == file.read_bytes(), file.name
