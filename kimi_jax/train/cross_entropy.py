"""Cross entropy over a large vocabulary without materialising the [tokens, vocab] logits.

`chunked_cross_entropy(x, kernel, targets, mask)` equals kimi_jax.train.step.cross_entropy of the logits
jnp.dot(x, kernel, preferred_element_type=f32) (fp32 logits, fp32 logsumexp), but computes the logits one block
of tokens at a time, in the forward pass and again in the backward pass (a jax.custom_vjp), so the compiled
loss + gradient holds the logits of one block, [b, block_s, V], never [b, s, V]. At the Kimi K2 vocabulary
(163,840) the full fp32 logits of one 4k-token sequence are 2.7 GB.

Blocks run along the sequence: x [b, s, h] -> [n_blocks, b, block_s, h], scanned over n_blocks, so every block
keeps the batch axis (and its sharding over the mesh's batch axes) whole. Per device and step that is
b_local * block_s * V_local * 4 bytes of logits (plus their softmax in the backward pass).

Sharding (GSPMD, plain jit): x sharded over the batch, kernel [hidden, V] over (fsdp on hidden, tensor on
vocab). With `mesh` given, the kernel's fsdp shards are gathered once before the scan (not once per block), the
logits are laid out [batch-sharded, ..., vocab on tensor], and the kernel gradient is accumulated per batch shard
([batch shards, hidden, V], the leading axis sharded like the batch) and summed over the batch shards once after
the scan, so the blocks add no collective over the batch axes: one reduction of the kernel gradient per call, as
in the plain version.

Gradients: the softmax and d loss / d logits are computed in fp32 from the recomputed fp32 logits, then rounded
to the compute dtype (x's) as the operand of the two backward matmuls, which accumulate in fp32: the usual mixed
precision for a bf16 lm_head, and with fp32 compute exactly plain autodiff. (Plain autodiff of the fp32-output
dot would multiply the fp32 cotangent with the bf16 kernel, which makes XLA hold an fp32 copy of the kernel and
run fp32 matmuls on GPU; on TPU at default precision it rounds the operands to bf16 anyway.) dx is returned in
x's dtype; dkernel is accumulated over blocks in fp32 and returned in the kernel's own dtype (pass the fp32
master kernel to keep the fp32 sum, or the compute-dtype one to round it as plain autodiff does).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from kimi_jax import sharding

DEFAULT_CHUNK_TOKENS = 512      # tokens of each sequence per block


def chunked_cross_entropy(x: jax.Array, kernel: jax.Array, targets: jax.Array, mask: jax.Array, *,
                          chunk_tokens: int = DEFAULT_CHUNK_TOKENS, mesh=None) -> tuple[jax.Array, jax.Array]:
    """x [b, s, hidden] (compute dtype), kernel [hidden, V] (any float dtype; cast to x's dtype for the matmuls),
    targets int [b, s], mask [b, s] -> (sum of masked token losses fp32 [], number of tokens fp32 []).

    chunk_tokens: at most this many tokens of each sequence per block; the sequence is split into
    ceil(s / chunk_tokens) equal blocks (padded at the end when s does not divide). mesh: the model's mesh (or
    None); only adds sharding constraints, the result is the same."""
    if x.ndim != 3 or kernel.ndim != 2 or targets.shape != x.shape[:2] or mask.shape != x.shape[:2]:
        raise ValueError(f"expected x [b, s, h], kernel [h, V], targets/mask [b, s]; got x {x.shape}, "
                         f"kernel {kernel.shape}, targets {targets.shape}, mask {mask.shape}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    losses = token_losses(x, kernel, targets, chunk_tokens=chunk_tokens, mesh=mesh)
    mask = mask.astype(jnp.float32)
    return jnp.sum(losses * mask), jnp.sum(mask)


def token_losses(x, kernel, targets, *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, mesh=None) -> jax.Array:
    """Unmasked per-token losses logsumexp(x @ kernel) - (x @ kernel)[target], fp32 [b, s], computed blockwise."""
    b, s, _ = x.shape
    n_blocks = math.ceil(s / chunk_tokens)
    block_s = math.ceil(s / n_blocks)
    groups = sharding.batch_divisor(mesh)
    if b % groups:
        raise ValueError(f"batch size {b} is not divisible by the mesh's batch split {groups}")
    return _token_losses(x, kernel, targets.astype(jnp.int32), _Layout(n_blocks, block_s, groups, mesh))


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Static blocking of [b, s] tokens: n_blocks x block_s along the sequence, the batch as groups x b/groups
    (groups = the mesh's batch split: the kernel gradient is accumulated per group)."""
    n_blocks: int
    block_s: int
    groups: int
    mesh: Any

    def constrain(self, a, axes):
        return sharding.constrain(a, axes, self.mesh)

    def to_blocks(self, a):
        """[b, s, ...] -> [n_blocks, groups, b/groups, block_s, ...] (the sequence zero-padded)."""
        b, s = a.shape[:2]
        pad = self.n_blocks * self.block_s - s
        if pad:
            a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2), )
        a = a.reshape(self.groups, b // self.groups, self.n_blocks, self.block_s, *a.shape[2:])
        a = jnp.moveaxis(a, 2, 0)
        return self.constrain(a, (None, "batch") + (None,) * (a.ndim - 2))

    def from_blocks(self, a, s):
        """Inverse of to_blocks: [n_blocks, groups, b/groups, block_s, ...] -> [b, s, ...]."""
        a = jnp.moveaxis(a, 0, 2)
        g, bl, nb, bs = a.shape[:4]
        return a.reshape(g * bl, nb * bs, *a.shape[4:])[:, :s]

    def kernel(self, kernel, dtype):
        """The kernel in the compute dtype, its fsdp (hidden) shards gathered once for all blocks."""
        return self.constrain(kernel.astype(dtype), (None, "vocab"))

    def logits(self, xb, kc):
        """xb [groups, b/groups, block_s, h] @ kc [h, V] -> fp32 [groups, b/groups, block_s, V]."""
        out = lax.dot_general(xb, kc, (((3,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return self.constrain(out, ("batch", None, None, "vocab"))


def _is_target(logits, targets):
    """Boolean [..., V]: vocab index == target (elementwise, so vocab-sharded logits need no gather)."""
    return lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == targets[..., None]


def _forward(x, kernel, targets, layout: _Layout):
    kc = layout.kernel(kernel, x.dtype)

    def body(_, blk):
        xb, tb = blk
        logits = layout.logits(xb, kc)
        logz = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.sum(jnp.where(_is_target(logits, tb), logits, 0.0), axis=-1)
        return None, (logz, logz - picked)

    _, (logz, losses) = lax.scan(body, None, (layout.to_blocks(x), layout.to_blocks(targets)))
    return logz, losses


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _token_losses(x, kernel, targets, layout):
    _, losses = _forward(x, kernel, targets, layout)
    return layout.from_blocks(losses, x.shape[1])


def _token_losses_fwd(x, kernel, targets, layout):
    logz, losses = _forward(x, kernel, targets, layout)
    return layout.from_blocks(losses, x.shape[1]), (x, kernel, targets, logz)


def _token_losses_bwd(layout, res, g):
    x, kernel, targets, logz = res
    kc = layout.kernel(kernel, x.dtype)
    h, vocab = kc.shape

    def body(dk, blk):
        xb, tb, lzb, gb = blk
        logits = layout.logits(xb, kc)
        # d loss / d logits = softmax - onehot(target), times the token's cotangent (0 for padding)
        dlogits = (jnp.exp(logits - lzb[..., None]) - _is_target(logits, tb)) * gb[..., None]
        dlogits = dlogits.astype(kc.dtype)          # the matmuls' operand in the compute dtype (see the top)
        dx = lax.dot_general(dlogits, kc, (((3,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        dk = dk + lax.dot_general(xb, dlogits, (((1, 2), (1, 2)), ((0,), (0,))),
                                  preferred_element_type=jnp.float32)
        dx = layout.constrain(dx.astype(x.dtype), ("batch", None, None, None))
        return layout.constrain(dk, ("batch", None, "vocab")), dx

    dk0 = layout.constrain(jnp.zeros((layout.groups, h, vocab), jnp.float32), ("batch", None, "vocab"))
    blocks = (layout.to_blocks(x), layout.to_blocks(targets), logz,
              layout.to_blocks(g.astype(jnp.float32)))
    dk, dx = lax.scan(body, dk0, blocks)
    dkernel = layout.constrain(jnp.sum(dk, axis=0).astype(kernel.dtype), ("embed", "vocab"))
    return layout.from_blocks(dx, x.shape[1]), dkernel, None


_token_losses.defvjp(_token_losses_fwd, _token_losses_bwd)
