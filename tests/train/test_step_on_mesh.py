"""The train step on meshes: compiled once, Pallas paths included; dropped assignments reported; memory that does
not grow with vocabulary x tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from experiments.configs import small
from experiments.configs.base import override
from kimi_jax import sharding
from kimi_jax.train import loop
from kimi_jax.train.step import make_train_step

PALLAS = {"model.attention_impl": "pallas", "model.moe_impl": "pallas", "model.pallas_backend": "tpu",
          "model.pallas_interpret": True}


def built_step(overrides, mesh_shape):
    config = override(small.get_config(), {"mesh.data": mesh_shape[0], "mesh.fsdp": mesh_shape[1],
                                           "mesh.expert": mesh_shape[2], "mesh.tensor": mesh_shape[3],
                                           **overrides})
    cfg = loop.model_config(config.model)
    mesh = loop.make_mesh(config.mesh)
    graphdef, state, tx, lr = loop.init_state(config, cfg, mesh)
    step = jax.jit(make_train_step(graphdef, cfg, tx, lr, microbatches=config.train.microbatches,
                                   qk_clip_tau=config.optimizer.qk_clip_tau), donate_argnums=0)
    b, s = config.data.global_batch_size, config.data.seq_len
    rows = NamedSharding(mesh, sharding.logical_to_spec(("batch", "seq"), mesh))
    ids = jax.random.randint(jax.random.key(0), (b, s + 1), 0, cfg.vocab_size)
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:],
             "positions": jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)),
             "segment_ids": jnp.ones((b, s), jnp.int32), "loss_mask": jnp.ones((b, s), jnp.float32)}
    return step, state, jax.device_put(batch, rows)


@pytest.mark.parametrize("overrides", [{}, PALLAS], ids=["xla", "pallas"])
def test_one_compile_per_train_step(overrides):
    step, state, batch = built_step({"train.microbatches": 2, **overrides}, (1, 2, 2, 2))
    for _ in range(2):
        state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    assert step._cache_size() == 1


def test_dropped_token_fraction_is_logged():
    """An expert-parallel buffer below the mean load drops assignments, and the step reports the share."""
    step, state, batch = built_step({"model.expert_parallel_capacity_factor": 0.25}, (1, 1, 8, 1))
    _, metrics = step(state, batch)
    assert 0.5 < float(metrics["dropped_token_fraction"]) < 1.0     # at most 1/4 of the mean load kept
    step, state, batch = built_step({}, (1, 1, 8, 1))
    _, metrics = step(state, batch)
    assert float(metrics["dropped_token_fraction"]) == 0.0


def test_step_memory_does_not_grow_with_vocab_times_tokens():
    """At K2's vocabulary (163,840), doubling the tokens adds far less temp memory than one fp32 logits array of
    the extra tokens would (the chunked cross entropy materialises [128 tokens, vocab] blocks, never more)."""
    temps = []
    for seq in (256, 512):
        config = override(small.get_config(), {"model.vocab_size": 163840, "data.seq_len": seq,
                                               "mesh.data": 1, "mesh.fsdp": 8})
        cfg = loop.model_config(config.model)
        mesh = loop.make_mesh(config.mesh)
        graphdef, state, tx, lr = loop.abstract_train_state(config, cfg, mesh)
        rows = NamedSharding(mesh, sharding.logical_to_spec(("batch", "seq"), mesh))
        batch = {k: jax.ShapeDtypeStruct((8, seq), jnp.float32 if k == "loss_mask" else jnp.int32, sharding=rows)
                 for k in ("input_ids", "targets", "positions", "segment_ids", "loss_mask")}
        step = make_train_step(graphdef, cfg, tx, lr, qk_clip_tau=100.0, ce_chunk=128)
        temps.append(jax.jit(step).lower(state, batch).compile().memory_analysis().temp_size_in_bytes)
    extra_logits = 8 * 256 * 163840 * 4 / 8                         # fp32 logits of the added tokens, per device
    assert temps[1] - temps[0] < 0.25 * extra_logits, temps     # activations grow; [tokens, vocab] would be >= 1x


@pytest.mark.parametrize("mesh_shape", [(1, 64, 16, 1), (1, 128, 8, 1)])
def test_k2_optimizer_state_per_device_is_the_ideal_share(mesh_shape):
    """MuonClip's state (Muon momentum, AdamW moments) of K2 on 1,024 devices: each leaf above 1 MiB is laid out
    like its parameter, and per device the state is within 5% of total / devices (expert and non-expert apart)."""
    from experiments.configs.kimi_k2_1t import get_config
    config = get_config()
    cfg = loop.model_config(config.model)
    mesh = jax.sharding.AbstractMesh(mesh_shape, sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)
    _, state, _, _ = loop.abstract_train_state(config, cfg, mesh)
    keys = lambda path: tuple(getattr(k, "key", None) for k in path)
    by_path = {keys(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    total, local = {True: 0, False: 0}, {True: 0, False: 0}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
        if np.prod(leaf.shape) * leaf.dtype.itemsize <= 2 ** 20:
            continue
        param = next(by_path[keys(path)[i:]] for i in range(len(path)) if keys(path)[i:] in by_path)
        assert leaf.shape == param.shape and leaf.sharding.spec == param.sharding.spec, jax.tree_util.keystr(path)
        expert = "experts" in jax.tree_util.keystr(path)
        total[expert] += np.prod(leaf.shape)
        local[expert] += np.prod(leaf.sharding.shard_shape(leaf.shape))
    for expert in (True, False):
        assert local[expert] == pytest.approx(total[expert] / np.prod(mesh_shape), rel=0.05), expert
