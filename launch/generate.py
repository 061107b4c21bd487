"""Sample text from a model: a Hugging Face checkpoint directory or a training workdir.

    python launch/generate.py --checkpoint=/path/to/hf_dir --prompt="def main(" --prompt="import " \
        --max_new_tokens=64 --temperature=0.8 --top_p=0.95 --seed=0
    python launch/generate.py --workdir=workdir/tiny --prompt="def "

Prompts are encoded with --tokenizer ("byte", or a tiktoken.model file / a directory holding one); by default
a workdir's training tokenizer (config.data.tokenizer), "byte" for models with the byte tokenizer's vocab (272),
else the checkpoint directory's tiktoken.model. The tokenizer's BOS is prepended (as the training pipeline does)
and generation of a sample stops at the tokenizer's EOS. Generation uses the compressed MLA cache
(kimi_jax.infer.generate); --temperature=0 is greedy.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Hugging Face checkpoint directory (config.json + "
                                  "safetensors).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir: its latest orbax checkpoint is sampled.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt; repeat the flag for a batch.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt (at most).")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus: keep the smallest set of tokens with this mass (1 = off).")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed for sampling.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "'byte' or a tiktoken.model path (default: see above).")
_ADD_BOS = flags.DEFINE_bool("add_bos", True, "Prepend the tokenizer's BOS to every prompt.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter and compute dtype (HF).")
_DECODE_IMPL = flags.DEFINE_enum("decode_impl", "xla", ["xla", "pallas"], "Attention over the cache.")


def load_model(checkpoint: str | None, workdir: str | None, dtype: str):
    """Exactly one of checkpoint (HF directory) / workdir (training run) -> Transformer."""
    if (checkpoint is None) == (workdir is None):
        raise app.UsageError("pass exactly one of --checkpoint (HF directory) or --workdir (training run)")
    if checkpoint is not None:
        import jax.numpy as jnp
        from kimi_jax import load_hf
        return load_hf(checkpoint, dtype=jnp.dtype(dtype))
    from kimi_jax.train.checkpointing import restore_model
    return restore_model(workdir)


def pick_tokenizer(spec: str | None, vocab_size: int, checkpoint: str | None, workdir: str | None):
    """The tokenizer named by spec, or the default for this model (see the module docstring)."""
    from kimi_jax.data import ByteTokenizer, load_tokenizer
    if spec is None:
        if workdir is not None:
            from kimi_jax.train.checkpointing import load_run_config
            spec = load_run_config(workdir).data.tokenizer
        elif vocab_size == ByteTokenizer.vocab_size:
            spec = "byte"
        elif checkpoint is not None and os.path.isfile(os.path.join(checkpoint, "tiktoken.model")):
            spec = checkpoint
        else:
            raise app.UsageError(f"the model's vocab_size is {vocab_size}: pass --tokenizer (a tiktoken.model)")
    tokenizer = load_tokenizer(spec)
    if tokenizer.vocab_size > vocab_size:
        raise app.UsageError(f"tokenizer {spec!r} has {tokenizer.vocab_size} ids, the model only {vocab_size}")
    return tokenizer


def sample_texts(model, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float, top_k: int,
                 top_p: float, seed: int, add_bos: bool = True, decode_impl: str = "xla") -> list[str]:
    """Each prompt followed by its sampled continuation (decoded up to and without the EOS)."""
    import jax
    from kimi_jax.infer import SamplingParams, generate
    ids = [([tokenizer.bos_id] if add_bos else []) + tokenizer.encode(p) for p in prompts]
    out = generate(model, ids, max_new_tokens=max_new_tokens, key=jax.random.key(seed),
                   sampling=SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p),
                   eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, decode_impl=decode_impl)
    texts = []
    for row, prompt in enumerate(prompts):
        new = out.tokens[row, :out.num_tokens[row]].tolist()
        texts.append(prompt + tokenizer.decode(new[:-1] if new and new[-1] == tokenizer.eos_id else new))
    return texts


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not _PROMPT.value:
        raise app.UsageError("pass at least one --prompt")
    model = load_model(_CHECKPOINT.value, _WORKDIR.value, _DTYPE.value)
    tokenizer = pick_tokenizer(_TOKENIZER.value, model.cfg.vocab_size, _CHECKPOINT.value, _WORKDIR.value)
    start = time.perf_counter()
    texts = sample_texts(model, tokenizer, _PROMPT.value, max_new_tokens=_MAX_NEW_TOKENS.value,
                         temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value,
                         add_bos=_ADD_BOS.value, decode_impl=_DECODE_IMPL.value)
    seconds = time.perf_counter() - start
    for i, text in enumerate(texts):
        print(f"---- sample {i} ----")
        print(text)
    print(f"---- {len(texts)} samples, up to {_MAX_NEW_TOKENS.value} new tokens each, {seconds:.1f} s "
          f"(compilation included) ----")


if __name__ == "__main__":
    app.run(main)
