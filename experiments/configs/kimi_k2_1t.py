"""Kimi K2 pre-training shape: WSD 2e-4 (warm-up 500), weight decay 0.1, context 4096, MuonClip tau 100,
bf16 compute, bf16 parameters with fp32 gradient accumulation and fp32 Muon momentum (K2's published setup),
experts split 16 ways (K2 used 16-way EP). 64 microbatches of 256 sequences (one per chip of a v5p-512) with
full remat: the step fits a v5p-512 chip with ~23% of HBM to spare (experiments/results/k2_memory_plan.md).

Attention is the Pallas flash kernel (backend by the mesh's platform: Mosaic TPU on TPU, Mosaic GPU on Hopper,
the XLA reference on CPU), never the O(s^2) XLA path on an accelerator. Expert-parallel receive buffers hold
1.25x the mean load (dropped assignments are logged as dropped_token_fraction), not the EP x worst case."""

from experiments.configs.base import base_config


def get_config():
    c = base_config("kimi_k2_1t")
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"
    c.model.remat_policy = "full"
    c.model.expert_parallel_impl = "ragged_all_to_all"
    c.model.expert_parallel_capacity_factor = 1.25
    c.model.attention_impl = "pallas"
    c.mesh.update(data=1, fsdp=-1, expert=16, tensor=1)
    c.data.seq_len = 4096
    c.data.global_batch_size = 16384          # 67M tokens per step, as K2
    c.train.microbatches = 64
    c.optimizer.learning_rate = 2e-4
    c.optimizer.warmup_steps = 500
    c.optimizer.decay_fraction = 0.35         # 10T constant, then cosine over 5.5T of 15.5T tokens
    c.optimizer.end_lr_ratio = 0.1            # 2e-4 -> 2e-5
    c.steps = 231_000                         # 15.5T tokens / 67M
    c.sample.max_new_tokens = 0
    return c
