"""The trainer process of the disaggregated weight-sync tests: trains the small K2-shaped model
(experiments/configs/small.py, the tiny preset shrunk; 3 layers here) on a (fsdp=2, expert=2) mesh of its 4 CPU
devices and pushes a version after every --steps_per_version steps to the engine that connects to it.

Prints JSON lines on stdout: {"listening": address}; per version, before pushing and with --reference,
{"version": v, "tokens": ..., "logits": ...} (greedy tokens of the trainer's own forward with the parameters cast to
the engine's dtypes, on its own mesh, and the logits of each prompt's first token); after it, {"pushed": v} or
{"rejected": v, "error": ...} (a rejected version is pushed once more).
--corrupt=V:I flips a bit of byte 5 of bucket I of version V's first push after its checksums were taken;
--kill_at=V:I SIGKILLs this process when bucket I of version V is about to be offered (bucket I-1 was
received).
"""

import json
import os
import signal

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from experiments.configs import small
from experiments.configs.base import override
from kimi_jax.infer.generate import generate
from kimi_jax.model import abstract_model
from kimi_jax.serve.transfer import WeightSender
from kimi_jax.serve.weight_sync import WeightSyncError
from kimi_jax.train import loop
from kimi_jax.train.step import make_train_step

PROMPTS = [[1, 2, 3, 4], [40, 41], [7]]
MAX_NEW_TOKENS = 8

_VERSIONS = flags.DEFINE_integer("versions", 2, "versions to push")
_STEPS = flags.DEFINE_integer("steps_per_version", 2, "train steps before each version")
_BUCKET_BYTES = flags.DEFINE_integer("bucket_bytes", 48 << 10, "bucket size in engine bytes")
_REFERENCE = flags.DEFINE_bool("reference", False, "print each version's greedy tokens and first logits")
_CORRUPT = flags.DEFINE_string("corrupt", "", "V:I: corrupt bucket I of version V's first push")
_KILL_AT = flags.DEFINE_string("kill_at", "", "V:I: SIGKILL this process before offering bucket I of version V")


def engine_config(cfg):
    """The engine's ModelConfig: bf16 parameters (fp32 compute keeps greedy decoding free of near-ties)."""
    return cfg.replace(param_dtype="bfloat16")


def emit(**message):
    print(json.dumps(message), flush=True)


def training_config(fsdp: int = 1, expert: int = 1):
    """small.py with 3 layers (two stacked MoE layers, so a stack can be cut into pieces of one layer), on a
    (fsdp, expert) mesh, no warmup."""
    return override(small.get_config(), {"model.num_hidden_layers": 3, "mesh.data": 1, "mesh.fsdp": fsdp,
                                         "mesh.expert": expert, "mesh.tensor": 1, "optimizer.warmup_steps": 0,
                                         "optimizer.learning_rate": 1e-2})


def build_trainer(fsdp: int, expert: int):
    """(ModelConfig, TrainState, jitted step, batch): the small model on a (fsdp, expert) mesh, a fixed batch."""
    config = training_config(fsdp, expert)
    cfg = loop.model_config(config.model)
    graphdef, state, tx, lr = loop.init_state(config, cfg, loop.make_mesh(config.mesh))
    step = jax.jit(make_train_step(graphdef, cfg, tx, lr), donate_argnums=0)
    b, s = config.data.global_batch_size, config.data.seq_len
    ids = jax.random.randint(jax.random.key(1), (b, s + 1), 0, cfg.vocab_size)
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:],
             "positions": jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)),
             "segment_ids": jnp.ones((b, s), jnp.int32), "loss_mask": jnp.ones((b, s), jnp.float32)}
    return cfg, state, step, batch


def reference(cfg, params, mesh):
    """The trainer's own forward, its parameters cast to the engine's dtypes, on `mesh`: greedy GenerateOutput
    with logits."""
    engine_graphdef, engine_state = nnx.split(abstract_model(engine_config(cfg), mesh))
    dtypes = nnx.to_pure_dict(jax.tree.map(lambda v: v.dtype, engine_state))
    cast = jax.tree.map(lambda x, d: x.astype(d), params, dtypes)
    return generate(nnx.merge(engine_graphdef, cast), PROMPTS, max_new_tokens=MAX_NEW_TOKENS, return_logits=True)


def main(_):
    cfg, state, step, batch = build_trainer(fsdp=2, expert=2)
    current = {"version": 0, "corrupted": False}
    corrupt = tuple(map(int, _CORRUPT.value.split(":"))) if _CORRUPT.value else None
    kill_at = tuple(map(int, _KILL_AT.value.split(":"))) if _KILL_AT.value else None

    def in_transit(bucket, buffer):
        if (current["version"], bucket) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if (current["version"], bucket) == corrupt and not current["corrupted"]:
            current["corrupted"] = True
            return buffer.at[5].set(buffer[5] ^ 0x10)          # in the bucket's first tensor
        return buffer

    sender = WeightSender(engine_config(cfg), _BUCKET_BYTES.value, timeout_s=120, in_transit=in_transit)
    emit(listening=sender.address)
    for version in range(1, _VERSIONS.value + 1):
        for _ in range(_STEPS.value):
            state, _ = step(state, batch)
        if _REFERENCE.value:
            out = reference(cfg, state.params, next(iter(jax.tree.leaves(state.params))).sharding.mesh)
            emit(version=version, tokens=out.tokens.tolist(), logits=out.logits[:, 0].tolist())
        current["version"] = version
        try:
            sender.push(state.params, version)
        except WeightSyncError as e:
            emit(rejected=version, error=str(e))
            sender.push(state.params, version)
        emit(pushed=version, seconds=sender.stats.seconds, buckets=sender.stats.buckets)
    sender.close()


if __name__ == "__main__":
    app.run(main)
