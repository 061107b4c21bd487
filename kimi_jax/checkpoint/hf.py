"""Hugging Face safetensors import / export for Kimi K2, DeepSeek-V3 and Moonlight checkpoints.

The mapping is one table (`tensor_map`): each model parameter (its nnx.state path) and the HF tensor names it
holds, per stacked layer (and per expert). Kernels are stored [in, out]; HF weights are [out, in].
Import reads tensor by tensor, and for a sharded model each device's shard only (never the whole checkpoint in
host memory); block-FP8 weights (`*.weight_scale_inv`) are dequantised on the way in. Export streams one HF
tensor at a time into a temporary directory that replaces the target only when complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Iterator

import jax
import ml_dtypes
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kimi_jax import sharding
from kimi_jax.checkpoint.safetensors_io import CheckpointReader, quantize_fp8_blocks, weight_block_size
from kimi_jax.checkpoint.safetensors_io import INDEX_FILE, SINGLE_FILE, write_checkpoint, write_order
from kimi_jax.config import ModelConfig
from kimi_jax.model.build import abstract_model
from kimi_jax.model.transformer import Transformer

LAYER_PARAMS = {  # path inside a decoder layer -> (HF suffix, transposed)
    "input_layernorm.weight": ("input_layernorm.weight", False),
    "post_attention_layernorm.weight": ("post_attention_layernorm.weight", False),
    "self_attn.q_proj.kernel": ("self_attn.q_proj.weight", True),
    "self_attn.q_a_proj.kernel": ("self_attn.q_a_proj.weight", True),
    "self_attn.q_a_layernorm.weight": ("self_attn.q_a_layernorm.weight", False),
    "self_attn.q_b_proj.kernel": ("self_attn.q_b_proj.weight", True),
    "self_attn.kv_a_proj_with_mqa.kernel": ("self_attn.kv_a_proj_with_mqa.weight", True),
    "self_attn.kv_a_layernorm.weight": ("self_attn.kv_a_layernorm.weight", False),
    "self_attn.kv_b_proj.kernel": ("self_attn.kv_b_proj.weight", True),
    "self_attn.o_proj.kernel": ("self_attn.o_proj.weight", True),
    "mlp.gate_proj.kernel": ("mlp.gate_proj.weight", True),
    "mlp.up_proj.kernel": ("mlp.up_proj.weight", True),
    "mlp.down_proj.kernel": ("mlp.down_proj.weight", True),
    "mlp.gate.kernel": ("mlp.gate.weight", True),
    "mlp.gate.e_score_correction_bias": ("mlp.gate.e_score_correction_bias", False),
    "mlp.shared_experts.gate_proj.kernel": ("mlp.shared_experts.gate_proj.weight", True),
    "mlp.shared_experts.up_proj.kernel": ("mlp.shared_experts.up_proj.weight", True),
    "mlp.shared_experts.down_proj.kernel": ("mlp.shared_experts.down_proj.weight", True),
    "mlp.experts.gate_proj": ("mlp.experts.{e}.gate_proj.weight", True),
    "mlp.experts.up_proj": ("mlp.experts.{e}.up_proj.weight", True),
    "mlp.experts.down_proj": ("mlp.experts.{e}.down_proj.weight", True),
}
TOP_PARAMS = {
    "embed_tokens.embedding": ("model.embed_tokens.weight", False),
    "norm.weight": ("model.norm.weight", False),
    "lm_head.kernel": ("lm_head.weight", True),
}
# HF tensors that carry no parameters of ours
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# never quantised in the released block-FP8 checkpoints
FP8_EXCLUDED = ("embed_tokens", "lm_head", "norm", "layernorm", "mlp.gate.")


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One model parameter and where its pieces live in the HF checkpoint.

    `names[i]` is the HF name of slice i of the parameter's leading (stack) dims, flattened: for a
    [L, ...] layer parameter i = layer; for [L, E, ...] experts i = layer * E + expert; top-level: one name.
    """
    path: str
    shape: tuple[int, ...]
    n_stack: int                    # number of leading stack dims (0, 1 or 2)
    transposed: bool
    names: tuple[str, ...]


def _path_str(key_path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "name", k))) for k in key_path)


def tensor_map(cfg: ModelConfig, abstract_state) -> list[TensorMap]:
    """The full parameter <-> HF table for `cfg` (abstract_state: nnx.state of an abstract model)."""
    out = []
    leaves = jax.tree_util.tree_flatten_with_path(abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    for key_path, var in leaves[0]:
        path = _path_str(key_path)
        if path.endswith(".value"):
            path = path[: -len(".value")]
        shape = tuple(sharding.value_of(var).shape)
        if path in TOP_PARAMS:
            name, transposed = TOP_PARAMS[path]
            out.append(TensorMap(path, shape, 0, transposed, (name,)))
            continue
        prefix, _, rest = path.partition(".")
        first = {"dense_layers": 0, "moe_layers": cfg.first_k_dense_replace}.get(prefix)
        if first is None or rest not in LAYER_PARAMS:
            raise KeyError(f"model parameter {path} has no Hugging Face tensor mapping")
        suffix, transposed = LAYER_PARAMS[rest]
        layers = [first + i for i in range(shape[0])]
        if "{e}" in suffix:
            names = tuple(f"model.layers.{n}." + suffix.format(e=e) for n in layers for e in range(shape[1]))
            out.append(TensorMap(path, shape, 2, transposed, names))
        else:
            out.append(TensorMap(path, shape, 1, transposed, tuple(f"model.layers.{n}.{suffix}" for n in layers)))
    return out


def _hf_shape(t: TensorMap) -> tuple[int, ...]:
    inner = t.shape[t.n_stack:]
    return inner[::-1] if t.transposed else inner


def _read_block(reader: CheckpointReader, t: TensorMap, index: tuple[slice, ...], dtype) -> np.ndarray:
    """The numpy block param[index] assembled from the HF tensors it covers."""
    index = tuple(index) + (slice(None),) * (len(t.shape) - len(index))
    stack_idx, inner_idx = index[:t.n_stack], index[t.n_stack:]
    hf_idx = inner_idx[::-1] if t.transposed else inner_idx

    def one(name):
        block = reader.read_dequantized(name, hf_idx, dtype=np.float32)
        return (block.T if t.transposed else block).astype(dtype)

    if t.n_stack == 0:
        return one(t.names[0])
    ranges = [range(*s.indices(n)) for s, n in zip(stack_idx, t.shape[:t.n_stack])]
    if t.n_stack == 1:
        return np.stack([one(t.names[i]) for i in ranges[0]])
    n_e = t.shape[1]
    return np.stack([np.stack([one(t.names[i * n_e + e]) for e in ranges[1]]) for i in ranges[0]])


def _check_names(reader: CheckpointReader, table: list[TensorMap], path, num_hidden_layers: int) -> None:
    expected = {n: t for t in table for n in t.names}
    present = set(reader.names())
    missing = sorted(set(expected) - present)
    if missing:
        raise ValueError(f"checkpoint {path} is missing {len(missing)} tensor(s), first: {missing[:5]}")

    def ignorable(name):
        parts = name.split(".")
        is_mtp = len(parts) > 2 and parts[1] == "layers" and int(parts[2]) >= num_hidden_layers
        return is_mtp or name.endswith(IGNORED_SUFFIXES)

    unexpected = sorted(n for n in present - set(expected) if not ignorable(n))
    if unexpected:
        raise ValueError(f"checkpoint {path} has {len(unexpected)} unexpected tensor(s), first: {unexpected[:5]}")
    for name, t in expected.items():
        if tuple(reader.shape(name)) != _hf_shape(t):
            raise ValueError(f"checkpoint {path}: tensor {name} has shape {tuple(reader.shape(name))}, expected "
                             f"{_hf_shape(t)} (model parameter {t.path})")


def load_hf(path: str | os.PathLike, dtype=jnp.float32, mesh=None, **runtime) -> Transformer:
    """Import an HF checkpoint directory (config.json + safetensors, single or sharded, bf16/fp32/block-FP8).

    dtype: parameter and compute dtype of the model. mesh: a (data, fsdp, expert, tensor) mesh to build the
    model directly sharded on (each device reads only its shard). runtime: other ModelConfig run-time fields.
    """
    dtype_name = jnp.dtype(dtype).name
    with open(os.path.join(path, "config.json")) as f:
        hf_config = json.load(f)
    cfg = ModelConfig.from_hf(hf_config, **{"dtype": dtype_name, "param_dtype": dtype_name, **runtime})
    graphdef, abs_state = nnx.split(abstract_model(cfg, mesh))
    table = {t.path: t for t in tensor_map(cfg, abs_state)}
    if mesh is not None:
        shardings = sharding.state_shardings(abs_state, mesh, sharding.rules_for(cfg))
    else:
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abs_state,
                                 is_leaf=lambda x: isinstance(x, nnx.Variable))
    single = os.path.join(path, SINGLE_FILE)
    source = single if os.path.isfile(single) and not os.path.isfile(os.path.join(path, INDEX_FILE)) else path
    with CheckpointReader(source, weight_block_size=weight_block_size(hf_config)) as reader:
        _check_names(reader, list(table.values()), path, cfg.num_hidden_layers)

        def load(key_path, var, shard):
            t = table[_path_str(key_path).removesuffix(".value")]
            np_dtype = np.float32 if sharding.value_of(var).dtype == jnp.float32 else sharding.value_of(var).dtype
            value = jax.make_array_from_callback(t.shape, shard,
                                                 lambda idx: _read_block(reader, t, idx, np_dtype))
            return var.replace(value.astype(sharding.value_of(var).dtype))

        is_var = lambda x: isinstance(x, nnx.Variable)
        state = jax.tree_util.tree_map_with_path(load, abs_state, shardings, is_leaf=is_var)
    return nnx.merge(graphdef, state)


def _quantisable(name: str) -> bool:
    return name.endswith(".weight") and not any(x in name for x in FP8_EXCLUDED)


def _fetch(array: jax.Array, idx: tuple) -> np.ndarray:
    """array[idx] as a host array. An array spread over several processes is all-gathered: every process must
    then fetch the same tensors in the same order."""
    if array.is_fully_addressable:
        return np.asarray(jax.device_get(array[idx] if idx else array))
    part = jax.jit(lambda a: a[idx])(array) if idx else array
    return np.asarray(multihost_utils.process_allgather(part, tiled=True))


def hf_tensors(model: Transformer, fp8: bool = False) -> Iterator[tuple[str, tuple, np.dtype, Callable]]:
    """(HF name, shape, dtype, producer) for every tensor of the HF checkpoint of `model`, in HF order."""
    cfg = model.cfg
    state = nnx.state(model)
    table = tensor_map(cfg, state)
    values = {_path_str(k).removesuffix(".value"): sharding.value_of(v) for k, v in jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]}
    for t in table:
        array = values[t.path]
        for i, name in enumerate(t.names):
            idx = (i,) if t.n_stack == 1 else divmod(i, t.shape[1]) if t.n_stack == 2 else ()

            def produce(array=array, idx=idx, t=t):
                block = _fetch(array, idx)
                return block.T.copy() if t.transposed else block

            dtype = np.dtype(array.dtype)
            if fp8 and _quantisable(name):
                yield from _fp8_pair(name, _hf_shape(t), produce)
            else:
                yield name, _hf_shape(t), dtype, produce


def _fp8_pair(name, shape, produce):
    """The block-FP8 weight and its `_scale_inv`, quantised once whichever is written first."""
    cache = {}

    def get(key):
        if key not in cache:
            cache["q"], cache["s"] = quantize_fp8_blocks(produce().astype(np.float32))
        return cache.pop(key)

    blocks = (-(-shape[0] // 128), -(-shape[1] // 128))
    yield name, shape, np.dtype(ml_dtypes.float8_e4m3fn), lambda: get("q")
    yield name + "_scale_inv", blocks, np.dtype(np.float32), lambda: get("s")


def save_hf(model: Transformer, path: str | os.PathLike, *, max_shard_bytes: int | None = 5 * 2**30,
            fp8: bool = False) -> None:
    """Export `model` as an HF checkpoint directory (config.json + safetensors, sharded above max_shard_bytes).

    fp8=True writes block-FP8 (e4m3, 128x128 blocks, `weight_scale_inv`) for the weights the released K2
    checkpoints quantise. The directory appears only when complete.

    Multi-host: call it on every process. Parameters spread over processes are all-gathered one tensor at a
    time (all processes fetch in the writer's order); process 0 writes; every process returns once the
    directory is in place.
    """
    config = model.cfg.to_hf()
    if fp8:
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [128, 128]}
    tensors = list(hf_tensors(model, fp8=fp8))
    if jax.process_index() == 0:
        write_checkpoint(path, tensors, max_shard_bytes=max_shard_bytes,
                         extra_files={"config.json": json.dumps(config, indent=2)})
    else:
        for spec in write_order(tensors, max_shard_bytes):
            spec.producer()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"save_hf {os.fspath(path)}")
