"""Serving and rollouts: the continuous-batching engine over a paged latent cache, and its OpenAI-compatible
server (`kimi_jax.serve.server`, `launch/serve.py`).

    Engine(model, EngineConfig(...), stop_token_ids=...) .add_request(Request) .step() .run() .load_weights()
    Request(prompt, ..., enforcer=ToolCallEnforcer(tools, tokenizer))   tool-call sections held to well-formed calls
    ColocatedSync(engine_cfg, engine_mesh).to_engine(params) -> (state, version)   trainer and engine on one mesh
    WeightSender(engine_cfg).push(params, version) / WeightReceiver(..., on_version=engine.load_weights).receive()
"""

from kimi_jax.serve.enforcer import EnforcerConfig, ToolCallEnforcer, UnsupportedSchema
from kimi_jax.serve.engine import (Completion, Engine, EngineConfig, Request, RequestError, SampleOutput,
                                   TokenEvent)
from kimi_jax.serve.forward import trace_count
from kimi_jax.serve.paged_cache import BlockAllocator, OutOfPages, init_pages
from kimi_jax.serve.transfer import WeightReceiver, WeightSender
from kimi_jax.serve.weight_sync import ColocatedSync, SyncStats, WeightSyncError

__all__ = ["BlockAllocator", "ColocatedSync", "Completion", "Engine", "EngineConfig", "EnforcerConfig", "OutOfPages",
           "Request", "RequestError", "SampleOutput", "SyncStats", "TokenEvent", "ToolCallEnforcer",
           "UnsupportedSchema", "WeightReceiver", "WeightSender", "WeightSyncError", "init_pages", "trace_count"]
