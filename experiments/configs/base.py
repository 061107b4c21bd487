"""Shared defaults of the training configs: every field the loop reads, with its default."""

import dataclasses

import ml_collections

from kimi_jax.config import PRESETS, MeshConfig


def model_section(preset: str, **overrides) -> ml_collections.ConfigDict:
    """config.model: the preset's ModelConfig fields (HF names), overridable one by one from the command line,
    e.g. --config.model.num_hidden_layers=4."""
    cfg = PRESETS[preset]()
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "rope_scaling"}
    fields.update(overrides)
    section = ml_collections.ConfigDict(fields)
    section.preset = preset
    return section


def base_config(preset: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.steps = 1000
    c.log_every = 10
    c.checkpoint_every = 200
    c.keep_checkpoints = 3
    c.async_checkpoint = True
    c.model = model_section(preset)
    c.mesh = ml_collections.ConfigDict(dataclasses.asdict(MeshConfig()))   # axis sizes; dcn_*: slices per axis
    c.data = ml_collections.ConfigDict({   # kimi_jax.data.DataConfig fields
        "source": "stdlib",           # "stdlib" (the Python standard library's sources), "text", "array_record"
                                      # or "sft" (synthesis shards: loss on assistant tokens only)
        "paths": (),                  # files / dirs / globs for "text", "array_record" and "sft"
        "tokenizer": "byte",          # "byte" or a Kimi tiktoken.model file
        "seq_len": 256,
        "global_batch_size": 16,
        "max_corpus_bytes": 8_000_000,
        "shuffle": True,
        "add_bos": True,
        "prefetch": 2,                # batches made ahead in a background thread (0: none)
        "split_documents": True,      # False: a document (a conversation) that fits in a row is never split
    })
    c.optimizer = ml_collections.ConfigDict({
        "name": "muonclip",           # "muonclip" or "adamw"
        "learning_rate": 2e-4,
        "schedule": "wsd",            # "wsd", "cosine" or "constant"
        "warmup_steps": 500,
        "decay_fraction": 0.35,
        "end_lr_ratio": 0.1,
        "decay_type": "cosine",
        "weight_decay": 0.1,
        "grad_clip": 1.0,
        "momentum": 0.95,
        "nesterov": False,
        "qk_clip_tau": 100.0,
    })
    c.train = ml_collections.ConfigDict({
        "microbatches": 1,
        "cross_entropy_chunk": 512,    # tokens of each sequence per lm_head block (0: full [b, s, vocab] logits)
        "balance_loss_alpha": 1e-4,
        "router_bias_update_rate": 1e-3,
        "max_consecutive_nonfinite": 5,
        "peak_flops_per_device": 0.0,  # 0: from the device kind (kimi_jax/train/metrics.py)
    })
    c.sample = ml_collections.ConfigDict({"prompt": "def ", "max_new_tokens": 200, "temperature": 0.8,
                                          "top_k": 0, "top_p": 0.95})
    return c


def override(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    """Sets dotted keys ({"model.hidden_size": 64, "steps": 10}) on config, as --config.<key>=<value> would."""
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config
