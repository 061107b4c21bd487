"""Moonlight-16B-A3B shape with the published Muon setup (bf16 compute, fp32 master weights); Pallas attention
(backend by the mesh's platform), expert-parallel buffers at 1.25x the mean load and full remat, as K2's config."""

from experiments.configs.base import base_config


def get_config():
    c = base_config("moonlight_16b_a3b")
    c.model.dtype = "bfloat16"
    c.model.remat_policy = "full"
    c.model.attention_impl = "pallas"
    c.model.expert_parallel_capacity_factor = 1.25
    c.mesh.update(data=1, fsdp=-1, expert=8, tensor=1)
    c.data.seq_len = 8192
    c.data.global_batch_size = 512
    c.optimizer.learning_rate = 4.2e-4
    c.optimizer.warmup_steps = 500
    c.steps = 100_000
    c.sample.max_new_tokens = 0
    return c
