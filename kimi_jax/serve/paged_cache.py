"""The paged latent cache: pages of c_kv + k_rope, a block allocator with reference counts, and the XLA paged
attention.

MLA caches two things per token and layer (see kimi_jax/infer/cache.py): the normed kv latent c_kv
(kv_lora_rank values) and the rotated shared key k_rope (qk_rope_head_dim values). Here they live in a pool of
fixed-size pages shared by all running sequences,

    c_kv  [L, num_pages, page_size, kv_lora_rank]     k_rope [L, num_pages, page_size, qk_rope_head_dim]

one pair per layer stack ("dense_layers", "moe_layers"), and a sequence's page table (block table) lists its
pages in order: position t lives at page table[t // page_size], offset t % page_size.

Page 0 is the null page: it is never handed out; padded rows and padded tokens write there and nothing valid ever
reads it. Pages are reference counted so the K samples of one prompt share its prefilled pages (`share`); a page
returns to the free list when its last holder releases it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kimi_jax.config import ModelConfig
from kimi_jax.infer.cache import layer_stacks

NULL_PAGE = 0


class PagePool(NamedTuple):
    """pages: {"dense_layers" | "moe_layers": (c_kv [L, N, P, kv_lora_rank], k_rope [L, N, P, dr])}."""

    pages: dict[str, tuple[jax.Array, jax.Array]]


def init_pages(cfg: ModelConfig, num_pages: int, page_size: int, dtype=None) -> PagePool:
    """Zeroed pages for every layer stack (dtype: cfg.dtype, what the projections produce)."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    return PagePool({name: (jnp.zeros((n, num_pages, page_size, cfg.kv_lora_rank), dtype),
                            jnp.zeros((n, num_pages, page_size, cfg.qk_rope_head_dim), dtype))
                     for name, n in layer_stacks(cfg)})


class OutOfPages(Exception):
    """Raised by BlockAllocator.allocate when fewer pages are free than asked (nothing is allocated then)."""


class BlockAllocator:
    """Host-side page bookkeeping: a free list and a reference count per page (page 0, the null page, excluded).

    allocate(n) -> n fresh pages (count 1) or OutOfPages with nothing taken; share(pages) adds a holder;
    release(pages) drops one holder each and frees pages whose count reaches 0.
    """

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(f"EngineConfig.num_pages must be >= 2 (page 0 is the null page), got {num_pages}")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, NULL_PAGE, -1))       # pop() hands out the lowest page first
        self._refs = [0] * num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def capacity(self) -> int:
        """Pages that can ever be allocated (all but the null page)."""
        return self.num_pages - 1

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfPages(f"asked for {n} pages, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._refs[p] = 1
        return pages

    def share(self, pages: list[int]) -> None:
        for p in pages:
            if self._refs[p] <= 0:
                raise ValueError(f"page {p} is not allocated; cannot share it")
            self._refs[p] += 1

    def release(self, pages: list[int]) -> None:
        for p in pages:
            if self._refs[p] <= 0:
                raise ValueError(f"page {p} released more often than it was held")
            self._refs[p] -= 1
            if self._refs[p] == 0:
                self._free.append(p)

    def refcount(self, page: int) -> int:
        return self._refs[page]


def paged_attention_xla(q_latent, q_rope, c_pages, r_pages, table, q_positions, *, sm_scale: float):
    """Absorbed MLA attention of s queries per sequence over its pages, causal by position (fp32 softmax).

    q_latent [b, s, h, c], q_rope [b, s, h, dr]; c_pages [N, P, c], r_pages [N, P, dr]; table int32 [b, M];
    q_positions int32 [b, s]: query (b, i) attends cache entries t <= q_positions[b, i] -> o_latent [b, s, h, c].
    The sequence's pages are gathered into [b, M * P, .] (M is the bucketed table width, so this costs what the
    longest sequence of the batch needs).
    """
    f32 = jnp.float32
    b, m = table.shape
    c_kv = c_pages[table].reshape(b, m * c_pages.shape[1], c_pages.shape[2])
    k_rope = r_pages[table].reshape(b, m * r_pages.shape[1], r_pages.shape[2])
    logits = (jnp.einsum("bshc,bnc->bshn", q_latent, c_kv, preferred_element_type=f32)
              + jnp.einsum("bshd,bnd->bshn", q_rope, k_rope, preferred_element_type=f32)) * sm_scale
    valid = jnp.arange(c_kv.shape[1])[None, None, None, :] <= q_positions[:, :, None, None]
    logits = jnp.where(valid, logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    o = jnp.einsum("bshn,bnc->bshc", probs.astype(c_kv.dtype), c_kv, preferred_element_type=f32)
    return o.astype(q_latent.dtype)
