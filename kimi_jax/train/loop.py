"""The training loop: build (or resume) the state, run jitted steps, log, checkpoint, sample at the end.

`train(config, workdir)` takes an ml_collections config (experiments/configs/*.py, get_config()) and:
  - checks the config (check_config: a ValueError names the field) and builds the mesh (config.mesh) and the
    model directly sharded on it,
  - resumes from the newest usable checkpoint in <workdir>/checkpoints (params, optimizer state, step, data
    iterator state), or starts fresh,
  - runs `config.steps` steps of kimi_jax.train.step, logging every `config.log_every` steps to the console
    (progress bar), <workdir>/tensorboard and <workdir>/metrics.jsonl (one line per step: on resume, the lines
    of steps after the checkpoint, logged by the run that died, are removed first),
  - saves asynchronously every `config.checkpoint_every` steps, at the end and on SIGTERM,
  - stops with a clear error after `config.train.max_consecutive_nonfinite` skipped (NaN/Inf) steps in a row,
  - prints a sample from the trained model.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from kimi_jax import sharding
from kimi_jax.checkpoint.orbax_io import SigtermFlag, TrainCheckpointer
from kimi_jax.config import PRESETS, MeshConfig, ModelConfig, RopeScaling
from kimi_jax.data import Prefetcher
from kimi_jax.model import Transformer, abstract_model
from kimi_jax.train import data_input
from kimi_jax.train.checkpointing import save_run_config
from kimi_jax.train.metrics import MetricsWriter, flops_per_token, peak_flops_per_device
from kimi_jax.train.optimizer import make_optimizer
from kimi_jax.train.step import TrainState, make_train_step

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a NaN/Inf loss or gradient."""


def model_config(model_cfg) -> ModelConfig:
    """ModelConfig from a config.model section: `preset` plus any ModelConfig field overrides."""
    fields = dict(model_cfg)
    preset = fields.pop("preset", None)
    base = PRESETS[preset]() if preset else ModelConfig()
    if fields.get("rope_scaling") is not None and not isinstance(fields["rope_scaling"], RopeScaling):
        fields["rope_scaling"] = RopeScaling(**dict(fields["rope_scaling"]))
    unknown = set(fields) - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        raise ValueError(f"config.model has unknown fields {sorted(unknown)} (ModelConfig uses the HF names, "
                         f"e.g. num_hidden_layers)")
    return base.replace(**fields)


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
    """The (data, fsdp, expert, tensor) mesh of config.mesh (kimi_jax.config.MeshConfig: one axis may be -1, the
    remaining devices) over `devices` (default: all of jax.devices()).

    TPU devices of several slices (multi-slice, their `slice_index`) get a hybrid mesh: each axis spans
    config.mesh.dcn_<axis> slices over DCN (data by default) and the rest of it inside each slice over ICI,
    laid out by mesh_utils.create_hybrid_device_mesh. Anything else gets sharding.make_mesh (GPU devices in
    process order: the last axes, tensor then expert, are the ones inside a node)."""
    devices = jax.devices() if devices is None else list(devices)
    slices = num_slices(devices)
    sizes, dcn = MeshConfig.from_config(mesh_cfg).resolve(len(devices), slices)
    if slices == 1:
        return sharding.make_mesh(**sizes, devices=devices)
    from jax.experimental import mesh_utils
    ici = [sizes[a] // dcn[a] for a in sharding.MESH_AXES]
    array = mesh_utils.create_hybrid_device_mesh(ici, [dcn[a] for a in sharding.MESH_AXES], devices,
                                                 allow_split_physical_axes=True)
    return jax.sharding.Mesh(array, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * len(sharding.MESH_AXES))


def num_slices(devices) -> int:
    """How many TPU slices the devices span (1 for anything that is not TPU multi-slice)."""
    if getattr(devices[0], "platform", "") != "tpu":
        return 1
    return len({getattr(d, "slice_index", 0) for d in devices})


def step_kwargs(config) -> dict[str, Any]:
    """make_train_step's keyword arguments from a training config (the loop's and ahead-of-time compiles')."""
    return dict(microbatches=config.train.microbatches, balance_loss_alpha=config.train.balance_loss_alpha,
                router_bias_update_rate=config.train.router_bias_update_rate,
                qk_clip_tau=config.optimizer.qk_clip_tau if config.optimizer.name == "muonclip" else None,
                ce_chunk=config.train.cross_entropy_chunk or None)


def abstract_train_state(config, cfg: ModelConfig, mesh):
    """(graphdef, TrainState of ShapeDtypeStructs with their shardings, tx, lr schedule); nothing is allocated.
    The target of a restore, and the out_shardings of a fresh init."""
    graphdef, state = nnx.split(abstract_model(cfg, mesh))
    is_var = lambda x: isinstance(x, nnx.Variable)
    axes = _pure(jax.tree.map(lambda v: v.get_metadata()["axes"], state, is_leaf=is_var))
    shardings = sharding.state_shardings(state, mesh, sharding.rules_for(cfg))
    params = nnx.to_pure_dict(jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), state,
                                           shardings, is_leaf=is_var))
    tx, lr = make_optimizer(config.optimizer, config.steps, axes=axes,
                            shardings=jax.tree.map(lambda x: x.sharding, params))
    opt_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                             jax.eval_shape(tx.init, params), opt_state_shardings(tx, params, mesh))
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))
    return graphdef, TrainState(scalar, params, opt_state, scalar, scalar), tx, lr


def init_state(config, cfg: ModelConfig, mesh):
    """(graphdef, TrainState, tx, lr schedule) for a fresh run, every array created already sharded."""
    graphdef, abstract, tx, lr = abstract_train_state(config, cfg, mesh)

    def init():
        params = nnx.to_pure_dict(nnx.state(Transformer(cfg, nnx.Rngs(config.seed), mesh=mesh)))
        zero = jnp.zeros((), jnp.int32)
        return TrainState(zero, params, tx.init(params), zero, zero)

    state = jax.jit(init, out_shardings=jax.tree.map(lambda x: x.sharding, abstract))()
    return graphdef, state, tx, lr


def opt_state_shardings(tx, params, mesh):
    """Shardings for tx.init(params): a leaf that mirrors a parameter (momentum, Adam moments: same shape, its
    path ends with the parameter's path) takes that parameter's sharding; everything else (step counts) is
    replicated on the mesh. XLA cannot infer this: zeros_like has no operand to propagate a sharding from."""
    key = lambda k: getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
    by_path = {tuple(map(key, path)): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    replicated = NamedSharding(mesh, P())

    def pick(path, leaf):
        keys = tuple(map(key, path))
        for start in range(len(keys)):
            param = by_path.get(keys[start:])
            if param is not None and tuple(param.shape) == tuple(leaf.shape):
                return param.sharding
        return replicated

    return jax.tree_util.tree_map_with_path(pick, jax.eval_shape(tx.init, params))


def _pure(axes_state) -> dict:
    """An nnx.State of axis tuples -> nested dict with the same keys as nnx.to_pure_dict(State)."""
    out = {}
    for path, value in nnx.to_flat_state(axes_state):
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def check_config(config, mesh: jax.sharding.Mesh | None = None) -> None:
    """Raises a ValueError naming the config field when a value would only fail later (a reshape error, a
    division by zero, an error deep in the model's trace) or silently misbehave: steps >= 0; log_every,
    checkpoint_every, keep_checkpoints, data.global_batch_size and train.microbatches >= 1; the per-step batch
    divisible by train.microbatches and, with `mesh`, each microbatch by the mesh's batch split (data x fsdp x
    expert, the ways the batch rows are sharded)."""
    positive = {"config.log_every": config.log_every, "config.checkpoint_every": config.checkpoint_every,
                "config.keep_checkpoints": config.keep_checkpoints,
                "config.data.global_batch_size": config.data.global_batch_size,
                "config.train.microbatches": config.train.microbatches}
    for name, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not isinstance(config.steps, int) or config.steps < 0:
        raise ValueError(f"config.steps must be an integer >= 0, got {config.steps!r}")
    batch, microbatches = config.data.global_batch_size, config.train.microbatches
    if batch % microbatches:
        raise ValueError(f"config.train.microbatches ({microbatches}) must divide the per-step batch "
                         f"config.data.global_batch_size ({batch})")
    split = sharding.batch_divisor(mesh)
    if batch % split:
        raise ValueError(f"config.data.global_batch_size ({batch}) must be divisible by the mesh's batch split "
                         f"data x fsdp x expert = {split} (mesh {dict(mesh.shape)})")
    if batch // microbatches % split:
        raise ValueError(f"config.train.microbatches ({microbatches}) leaves {batch // microbatches} rows per "
                         f"microbatch, not divisible by the mesh's batch split data x fsdp x expert = {split} "
                         f"(mesh {dict(mesh.shape)})")


def _check_streak(step: int, streak, limit: int) -> None:
    streak = int(streak)
    if streak >= limit:
        raise NonFiniteLossError(
            f"{streak} consecutive steps up to step {step} had a non-finite loss or gradient (each was skipped); "
            f"stopping. Lower config.optimizer.learning_rate or check the data.")


def train(config, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) training; returns a summary {"step", "loss", "sample", ...}."""
    workdir = os.path.abspath(workdir)
    cfg = model_config(config.model)
    mesh = make_mesh(config.mesh)
    check_config(config, mesh)
    ckpt = TrainCheckpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints,
                             save_every=config.checkpoint_every, async_save=config.async_checkpoint)
    resume = ckpt.latest_step() is not None
    graphdef, state, tx, lr = (abstract_train_state if resume else init_state)(config, cfg, mesh)
    step_fn = jax.jit(make_train_step(graphdef, cfg, tx, lr, **step_kwargs(config)), donate_argnums=0)
    data = data_input.make_input(config.data, cfg, seed=config.seed)
    save_run_config(config, workdir)
    if resume:                                     # straight into the abstract state: no throwaway init
        state, extra = ckpt.restore(state)
        data.set_state(extra["data"])
        logger.info("Resumed from step %d in %s", int(state.step), workdir)
    start = int(state.step)
    writer = MetricsWriter(workdir, config.steps, initial_step=start)
    sigterm = SigtermFlag()
    batch_sharding = NamedSharding(mesh, sharding.logical_to_spec(("batch", "seq"), mesh))
    tokens_per_step = config.data.global_batch_size * config.data.seq_len
    flops = flops_per_token(cfg, config.data.seq_len) * tokens_per_step
    peak = peak_flops_per_device(config.train.peak_flops_per_device) * jax.device_count()
    step, last_metrics, window_start, window_steps = start, {}, time.perf_counter(), 0
    pending = None  # (step, nonfinite_streak) of the previous step: read one step late so dispatch runs ahead
    try:
        while step < config.steps:
            batch = {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in next(data).items()}
            state, metrics = step_fn(state, batch)
            step += 1
            if pending is not None:
                _check_streak(*pending, config.train.max_consecutive_nonfinite)
            pending = (step, metrics["nonfinite_streak"])
            window_steps += 1
            writer.advance()
            last_step = step == config.steps
            if step % config.log_every == 0 or last_step:
                metrics = jax.device_get(metrics)
                elapsed = time.perf_counter() - window_start
                metrics.update(tokens_per_s=window_steps * tokens_per_step / elapsed,
                               mfu=window_steps * flops / elapsed / peak,
                               skipped_total=int(state.nonfinite_total))
                writer.write(step, metrics)
                last_metrics = metrics
                window_start, window_steps = time.perf_counter(), 0
            if last_step or step % config.checkpoint_every == 0:
                ckpt.save(step, state, {"data": data.global_state()}, force=True)
            if sigterm.should_stop(step):
                ckpt.save(step, state, {"data": data.global_state()}, force=True)
                logger.warning("Saved step %d after SIGTERM; exiting.", step)
                break
        if pending is not None:
            _check_streak(*pending, config.train.max_consecutive_nonfinite)
        ckpt.wait()
    finally:
        sigterm.uninstall()
        ckpt.close()
        writer.close()
        if isinstance(data, Prefetcher):
            data.close()
    summary = {"step": step, **{k: float(v) for k, v in last_metrics.items() if np.ndim(v) == 0}}
    if config.sample.max_new_tokens > 0 and step == config.steps:
        model = nnx.merge(graphdef, state.params)
        summary["sample"] = data_input.sample_text(model, data.tokenizer, config.sample, seed=config.seed)
    return summary
