"""An OpenAI-compatible server over the rollout engine.

    python launch/serve.py --model=workdir/tiny --port=8000
    python launch/serve.py --model=/path/to/hf_dir --port=8000 --dtype=bfloat16 --tensor=8 --num_pages=8192

--model is a training workdir (its newest checkpoint) or a Hugging Face directory (config.json + safetensors).
The tokenizer comes with it: a workdir's training tokenizer, the byte tokenizer for the byte vocabulary (272),
else the directory's tiktoken.model; --tokenizer overrides. The engine runs on its own mesh (--expert x --tensor
devices; --fsdp splits the decode batch too). Endpoints: see kimi_jax/serve/server.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_MODEL = flags.DEFINE_string("model", None, "Training workdir or Hugging Face checkpoint directory.", required=True)
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on.")
_NAME = flags.DEFINE_string("served_model_name", None, "Model id in the API (default: --model's base name).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "'byte' or a tiktoken.model path (default: see above).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter and compute dtype (HF).")
_FSDP = flags.DEFINE_integer("fsdp", 1, "Engine mesh: batch split.")
_EXPERT = flags.DEFINE_integer("expert", 1, "Engine mesh: expert parallelism.")
_TENSOR = flags.DEFINE_integer("tensor", 1, "Engine mesh: tensor parallelism (attention heads).")
_MAX_SLOTS = flags.DEFINE_integer("max_slots", 16, "Samples decoded together.")
_PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "Tokens per cache page.")
_NUM_PAGES = flags.DEFINE_integer("num_pages", 1024, "Pages in the cache pool.")
_MAX_SEQ_LEN = flags.DEFINE_integer("max_seq_len", 2048, "Longest prompt + completion of one sample.")
_PREFILL_CHUNK = flags.DEFINE_integer("prefill_chunk", 128, "Prompt tokens per prefill step.")
_DECODE_IMPL = flags.DEFINE_enum("decode_impl", "auto", ["auto", "xla", "pallas"],
                                  "Attention over the paged cache (auto: the Pallas kernel on TPU/GPU).")
_MAX_PENDING = flags.DEFINE_integer("max_pending", 256, "Bounded queue: requests waiting or running.")


def build_engine(model_path: str, *, dtype: str, mesh, engine_config, tokenizer_spec=None):
    """(Engine, tokenizer) for a workdir or HF directory on `mesh`."""
    from kimi_jax.data import ByteTokenizer, load_tokenizer
    from kimi_jax.serve import Engine
    from kimi_jax import chat
    if not os.path.isdir(model_path):
        raise app.UsageError(f"--model={model_path} is not a directory")
    if os.path.isfile(os.path.join(model_path, "config.json")) and os.path.isdir(
            os.path.join(model_path, "checkpoints")):
        from kimi_jax.train.checkpointing import load_run_config, restore_model
        model = restore_model(model_path, mesh)
        spec = tokenizer_spec or load_run_config(model_path).data.tokenizer
    elif os.path.isfile(os.path.join(model_path, "config.json")):
        import jax.numpy as jnp
        from kimi_jax import load_hf
        model = load_hf(model_path, dtype=jnp.dtype(dtype), mesh=mesh)
        spec = tokenizer_spec or ("byte" if model.cfg.vocab_size == ByteTokenizer.vocab_size else model_path)
    else:
        raise app.UsageError(f"--model={model_path} is neither a training workdir (config.json + checkpoints/) nor "
                             f"a Hugging Face directory (config.json + safetensors)")
    tokenizer = load_tokenizer(spec)
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise app.UsageError(f"tokenizer {spec!r} has {tokenizer.vocab_size} ids, the model only "
                             f"{model.cfg.vocab_size}")
    return Engine(model, engine_config, stop_token_ids=chat.stop_token_ids(tokenizer)), tokenizer


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    import jax
    import uvicorn
    from kimi_jax import sharding
    from kimi_jax.serve import EngineConfig
    from kimi_jax.serve.async_engine import AsyncEngine
    from kimi_jax.serve.server import create_app
    size = _FSDP.value * _EXPERT.value * _TENSOR.value
    mesh = None if size == 1 else sharding.make_mesh(fsdp=_FSDP.value, expert=_EXPERT.value, tensor=_TENSOR.value,
                                                     devices=jax.devices()[:size])
    config = EngineConfig(max_slots=_MAX_SLOTS.value, page_size=_PAGE_SIZE.value, num_pages=_NUM_PAGES.value,
                          max_seq_len=_MAX_SEQ_LEN.value, prefill_chunk=_PREFILL_CHUNK.value,
                          decode_impl=_DECODE_IMPL.value)
    engine, tokenizer = build_engine(_MODEL.value, dtype=_DTYPE.value, mesh=mesh, engine_config=config,
                                     tokenizer_spec=_TOKENIZER.value)
    name = _NAME.value or os.path.basename(os.path.normpath(_MODEL.value))
    app_ = create_app(AsyncEngine(engine, max_pending=_MAX_PENDING.value).start(), tokenizer, model_name=name)
    print(f"serving {name!r} on http://{_HOST.value}:{_PORT.value}/v1 ({config})", flush=True)
    uvicorn.run(app_, host=_HOST.value, port=_PORT.value, log_level="warning")


if __name__ == "__main__":
    app.run(main)
