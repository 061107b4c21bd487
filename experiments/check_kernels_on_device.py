"""On an accelerator: the model with the Pallas kernels (attention_impl / moe_impl = "pallas", backend "auto")
and the XLA paths (on GPU also the warp-specialised kernels), all in bf16 compute, against the fp32 XLA model: max relative errors of logits and gradients
(the kernels' errors should be those of bf16 XLA) and fwd+bwd step times.

    python experiments/check_kernels_on_device.py
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import kimi_jax  # noqa: E402

CFG = kimi_jax.tiny(param_dtype="float32").replace(hidden_size=512, num_attention_heads=8, q_lora_rank=256, kv_lora_rank=128,
                              qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, intermediate_size=1024,
                              moe_intermediate_size=256, n_routed_experts=16, num_experts_per_tok=4,
                              vocab_size=8192, max_position_embeddings=8192, dtype="bfloat16")


def run(cfg, params, ids, seg):
    graphdef, _ = nnx.split(kimi_jax.abstract_model(cfg))

    def loss(p):
        logits = nnx.merge(graphdef, p)(ids, segment_ids=seg)
        return jnp.mean(logits.astype(jnp.float32) ** 2), logits

    f = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (_, logits), grads = f(params)
    jax.block_until_ready(grads)
    start = time.perf_counter()
    for _ in range(5):
        out = f(params)
    jax.block_until_ready(out)
    return logits, grads, (time.perf_counter() - start) / 5


def rel(a, b):
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-12))


def main():
    print("device:", jax.devices()[0].device_kind)
    params = nnx.to_pure_dict(nnx.state(kimi_jax.create_model(CFG, seed=0)))
    ids = jax.random.randint(jax.random.key(0), (4, 2048), 0, CFG.vocab_size)
    seg = jnp.ones(ids.shape, jnp.int32).at[:, 1500:].set(2)
    ref_logits, ref_grads, _ = run(CFG.replace(dtype="float32"), params, ids, seg)
    _, _, ref_t = run(CFG, params, ids, seg)
    variants = [{}, {"attention_impl": "pallas"}, {"moe_impl": "pallas"},
                {"attention_impl": "pallas", "moe_impl": "pallas"}]
    if jax.default_backend() == "gpu":
        variants.append({"attention_impl": "pallas", "moe_impl": "pallas", "pallas_warp_specialized": True})
    for changes in variants:
        logits, grads, t = run(CFG.replace(**changes), params, ids, seg)
        grad_err = max(rel(a, b) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)))
        print(f"{changes}: logits rel err {rel(logits, ref_logits):.2e}, max grad rel err {grad_err:.2e}, "
              f"fwd+bwd {t * 1e3:.1f} ms ({ref_t / t:.2f}x bf16 xla)")


if __name__ == "__main__":
    main()
