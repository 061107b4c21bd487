"""Which kernel backend the model's Pallas paths use, decided by the platform of the mesh's devices.

The platform is the mesh's, not `jax.default_backend()`: compiling ahead of time for a TPU pod on a CPU host
must put TPU kernels (and TPU collectives) into the TPU program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kimi_jax.config import ModelConfig


def platform(mesh) -> str:
    """"tpu", "gpu", "cpu", ...: the platform of the mesh's devices (the default backend without a mesh)."""
    if mesh is None or isinstance(mesh, jax.sharding.AbstractMesh):
        return jax.default_backend()
    return mesh.devices.flat[0].platform


def pallas_backend(cfg: ModelConfig, mesh, dtype) -> str:
    """cfg.pallas_backend with "auto" resolved: "tpu" on TPU, "gpu" on GPU for 16-bit compute, else "xla"."""
    if cfg.pallas_backend != "auto":
        return cfg.pallas_backend
    p = platform(mesh)
    if p == "tpu":
        return "tpu"
    if p in ("gpu", "cuda") and jnp.dtype(dtype).itemsize == 2:
        return "gpu"
    return "xla"


def resolved(cfg: ModelConfig, mesh) -> ModelConfig:
    """cfg with pallas_backend resolved for the mesh's platform and the compute dtype."""
    return cfg.replace(pallas_backend=pallas_backend(cfg, mesh, cfg.dtype))
