"""Building models: abstractly (no allocation) or directly sharded on a mesh (no full copy on one device)."""

from __future__ import annotations

import jax
from flax import nnx

from kimi_jax import sharding
from kimi_jax.config import ModelConfig
from kimi_jax.model.transformer import Transformer


def abstract_model(cfg: ModelConfig, mesh=None) -> Transformer:
    """A Transformer whose parameters are jax.ShapeDtypeStruct (nothing allocated)."""
    if mesh is not None:
        sharding.check_mesh(cfg, mesh)
    return nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0), mesh=mesh))


def create_model(cfg: ModelConfig, mesh=None, seed: int = 0) -> Transformer:
    """Randomly initialised Transformer; with a mesh every parameter is created already sharded."""
    graphdef, abstract_state = nnx.split(abstract_model(cfg, mesh))
    out_shardings = (sharding.state_shardings(abstract_state, mesh, sharding.rules_for(cfg)) if mesh is not None
                     else None)

    @jax.jit
    def init():
        return nnx.state(Transformer(cfg, nnx.Rngs(seed), mesh=mesh))

    if out_shardings is not None:
        init = jax.jit(init.__wrapped__, out_shardings=out_shardings)
    return nnx.merge(graphdef, init())
