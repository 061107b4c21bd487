"""Serving and rollouts: the continuous-batching engine over a paged latent cache, and its OpenAI-compatible
server (`kimi_jax.serve.server`, `launch/serve.py`).

    Engine(model, EngineConfig(...), stop_token_ids=...) .add_request(Request) .step() .run() .load_weights()
"""

from kimi_jax.serve.engine import (Completion, Engine, EngineConfig, Request, RequestError, SampleOutput,
                                   TokenEvent)
from kimi_jax.serve.forward import trace_count
from kimi_jax.serve.paged_cache import BlockAllocator, OutOfPages, init_pages, pool_bytes

__all__ = ["BlockAllocator", "Completion", "Engine", "EngineConfig", "OutOfPages", "Request", "RequestError",
           "SampleOutput", "TokenEvent", "init_pages", "pool_bytes", "trace_count"]
