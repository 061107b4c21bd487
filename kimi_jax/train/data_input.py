"""The loop's view of the data and of sampling: batches from kimi_jax.data, text from kimi_jax.infer."""

from __future__ import annotations

import jax
import numpy as np

from kimi_jax.config import ModelConfig
from kimi_jax.data import DataConfig, Prefetcher, load_tokenizer, make_train_iterator
from kimi_jax.infer import SamplingParams, generate


def make_input(data_cfg, cfg: ModelConfig, *, seed: int):
    """This process's batch iterator (dicts of [B_local, S] numpy arrays; get_state / set_state / global_state),
    produced `data_cfg.prefetch` batches ahead in a background thread (a Prefetcher; close() it when done)."""
    tokenizer = load_tokenizer(data_cfg.tokenizer)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer {data_cfg.tokenizer!r} has vocab_size {tokenizer.vocab_size} > "
                         f"ModelConfig.vocab_size {cfg.vocab_size}")
    if data_cfg.global_batch_size % jax.process_count():
        raise ValueError(f"config.data.global_batch_size ({data_cfg.global_batch_size}) is not divisible by the "
                         f"number of processes ({jax.process_count()})")
    iterator = make_train_iterator(data_cfg.to_dict(), seed=seed, tokenizer=tokenizer)
    prefetch = DataConfig.from_any(data_cfg).prefetch
    return Prefetcher(iterator, prefetch) if prefetch else iterator


def sample_text(model, tokenizer, sample_cfg, *, seed: int) -> str:
    """Continue sample_cfg.prompt with the model (temperature / top-k / top-p) and decode it."""
    prompt = tokenizer.encode(sample_cfg.prompt)
    if getattr(tokenizer, "bos_id", None) is not None:
        prompt = [tokenizer.bos_id] + prompt
    params = SamplingParams(temperature=float(sample_cfg.temperature), top_k=int(sample_cfg.top_k),
                            top_p=float(sample_cfg.top_p))
    out = generate(model, [prompt], max_new_tokens=int(sample_cfg.max_new_tokens), sampling=params,
                   key=jax.random.key(seed), eos_id=tokenizer.eos_id)
    new = np.asarray(out.tokens[0][: int(out.num_tokens[0])]).tolist()
    return sample_cfg.prompt + tokenizer.decode(new)
