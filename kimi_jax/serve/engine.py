"""The rollout engine: continuous batching over the paged latent cache, with prefix sharing and weight versions.

    engine = Engine(model, EngineConfig(max_slots=8, page_size=16, num_pages=512), stop_token_ids=(eos,))
    rid = engine.add_request(Request(prompt=[...], max_tokens=64, temperature=1.0, n=8, seed=3))
    while engine.has_work: events = engine.step()         # TokenEvent per new token
    engine.result(rid).samples[i].tokens / .logprobs / .finish_reason / .weight_versions

Each `step()`:
1. installs weights handed to `load_weights` (so a step never mixes two versions);
2. admits waiting requests in arrival order while there are free slots and pages for them (a request that does
   not fit waits; one that could never fit was refused by `add_request` with an error naming the limit);
3. runs one chunk of `prefill_chunk` prompt tokens for up to `prefill_batch` prefilling prompts (chunked prefill,
   interleaved with decode);
4. runs one decode step over every decoding sample: feed its last token, sample the next one.

Prefix sharing: a request with n samples prefills its prompt once (all but the last prompt token); its samples
share the full prefilled pages (reference counted) and get their own copy of the partial last page (copy on
write), then each feeds the last prompt token in its first decode step and samples from there.

Pages are reserved when a request is admitted: ceil((prompt + max_tokens - 1) / page_size) per sample, minus the
shared prompt pages. So a running request never runs out of pages and never touches another's; the price is that
an admitted request holds its worst case until it finishes (preemption would reclaim that; not done here).

Sampling: sample i of a request with seed s draws its token t from fold_in(PRNGKey(s + i), t), so it equals a
request with n = 1 and seed s + i, whatever else runs in the batch. Log-probabilities are those of the model's
own distribution (log-softmax of the logits before temperature and filters): what a trainer recomputes.

Constrained tool calls: a request with `enforcer` (kimi_jax.serve.enforcer.ToolCallEnforcer) gives each sample
an automaton fed with its tokens. While any running sample is inside a tool-call section, a decode step makes
one token per compiled call and passes a [rows, vocab] mask (the constrained rows' allowed tokens, all True for
the others): sampling and greedy argmax see the masked logits, the returned logprobs stay the model's own (so
a trainer using them sees the unconstrained policy). Otherwise decoding runs `decode_steps` at a time as
usual; a sample that opens a section mid-call keeps the tokens up to <|tool_calls_section_begin|> and drops
the rest of that call (they were sampled unconstrained; their cache entries are overwritten). So the
unconstrained path is unchanged, and an unconstrained request's tokens do not depend on its neighbours.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import threading
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kimi_jax import sharding
from kimi_jax.infer.decode import DecodeAttention
from kimi_jax.model import kernels
from kimi_jax.serve import forward
from kimi_jax.serve.paged_cache import NULL_PAGE, BlockAllocator, init_pages


class RequestError(ValueError):
    """A request the engine refuses (the message names the field and the limit); other requests are unaffected."""


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """max_slots: samples decoded together (the largest batch bucket); page_size tokens per page; num_pages in the
    pool (page 0 is the null page); max_seq_len: longest prompt + generation of one sample; prefill_chunk: prompt
    tokens per prefill step; prefill_batch: prompts prefilled together; decode_steps: decode steps per compiled
    call (one host round trip; new requests join between calls); decode_impl "auto" | "xla" | "pallas"
    (the paged Pallas kernel; "auto" takes it on TPU, and on GPU for 16-bit compute with pages of a multiple of
    64 tokens, XLA elsewhere; backend and interpret from the model config)."""

    max_slots: int = 8
    page_size: int = 16
    num_pages: int = 256
    max_seq_len: int = 1024
    prefill_chunk: int = 64
    prefill_batch: int = 4
    decode_steps: int = 8
    decode_impl: str = "auto"

    def __post_init__(self):
        for name in ("max_slots", "page_size", "num_pages", "max_seq_len", "prefill_chunk", "prefill_batch",
                     "decode_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.decode_impl not in ("auto", "xla", "pallas"):
            raise ValueError(f"EngineConfig.decode_impl must be 'auto', 'xla' or 'pallas', got {self.decode_impl!r}")

    @property
    def max_pages_per_seq(self) -> int:
        return math.ceil(self.max_seq_len / self.page_size)


@dataclasses.dataclass(frozen=True)
class Request:
    """prompt: token ids; n samples of up to max_tokens tokens each; temperature 0 = greedy; top_k 0 / top_p 1 =
    off; stop_token_ids end a sample (added to the engine's own); the stop token is the last token returned.
    enforcer: None, or a ToolCallEnforcer (kimi_jax.serve.enforcer) that constrains each sample's tool-call
    section to well-formed calls of its tools (module docstring); max_tokens must leave room for the section
    (ToolCallEnforcer.grammar.max_section_tokens() bounds it), or a cut-off section stays unterminated."""

    prompt: Sequence[int]
    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    n: int = 1
    stop_token_ids: tuple[int, ...] = ()
    enforcer: Any = None


@dataclasses.dataclass
class SampleOutput:
    """tokens and logprobs of one sample; finish_reason None (running), "stop", "length" or "abort";
    weight_versions: the versions that produced its tokens (one unless weights changed mid-sample)."""

    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    weight_versions: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Completion:
    request_id: int
    prompt: list[int]
    samples: list[SampleOutput]

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """One new token of one sample (finish_reason set on its last token, or on an abort with token None)."""

    request_id: int
    index: int
    token: int | None
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None
    finish_reason: str | None
    weight_version: int


@dataclasses.dataclass
class _Sample:
    request_id: int
    index: int
    table: list[int]                # pages, in order
    position: int                   # where the next fed token goes (= tokens cached so far)
    next_token: int                 # the token to feed
    slot: int = -1
    constraint: Any = None          # the sample's EnforcerState (requests with an enforcer)


@dataclasses.dataclass
class _Group:
    request_id: int
    request: Request
    shared: list[int]               # full prompt pages every sample holds
    samples: list[_Sample]
    prefilled: int = 0              # prompt tokens [0, prefilled) are in the pages

    @property
    def prefill_len(self) -> int:   # everything but the last prompt token
        return len(self.request.prompt) - 1


def _bucket(n: int, limit: int, multiple: int = 1) -> int:
    """Smallest power of two >= n (times `multiple`), capped at limit."""
    return min(max(multiple, multiple * 2 ** math.ceil(math.log2(max(1, math.ceil(n / multiple))))), limit)


class Engine:
    """Continuous batching over a paged latent cache on the model's mesh (see the module docstring)."""

    def __init__(self, model, config: EngineConfig = EngineConfig(), *, stop_token_ids: Sequence[int] = (),
                 weight_version: int = 0):
        cfg = model.cfg
        self.cfg, self.config, self.mesh = cfg, config, model.mesh
        if config.max_seq_len > cfg.max_position_embeddings:
            raise ValueError(f"EngineConfig.max_seq_len ({config.max_seq_len}) exceeds the model's "
                             f"max_position_embeddings ({cfg.max_position_embeddings})")
        self.batch_multiple = sharding.batch_divisor(self.mesh)
        if config.max_slots % self.batch_multiple:
            raise ValueError(f"EngineConfig.max_slots ({config.max_slots}) must be a multiple of the mesh's batch "
                             f"split ({self.batch_multiple})")
        self.graphdef, self.state = nnx.split(model)
        self.weight_version = weight_version
        self.stop_token_ids = frozenset(int(t) for t in stop_token_ids)
        backend = kernels.pallas_backend(cfg, self.mesh, cfg.dtype)
        impl = config.decode_impl
        if impl == "auto":
            impl = "pallas" if backend == "tpu" or (backend == "gpu" and config.page_size % 64 == 0) else "xla"
        self.attend = DecodeAttention(impl, backend, cfg.pallas_interpret or None, cfg.pallas_warp_specialized)
        pool = init_pages(cfg, config.num_pages, config.page_size)
        if self.mesh is not None:
            pool = jax.device_put(pool, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))
        self.pool = pool
        self.allocator = BlockAllocator(config.num_pages)
        self._free_slots = list(range(config.max_slots - 1, -1, -1))
        self._waiting: list[_Group] = []
        self._prefilling: list[_Group] = []
        self._decoding: dict[int, _Sample] = {}            # slot -> sample
        self._groups: dict[int, _Group] = {}
        self._results: dict[int, Completion] = {}
        self._ids = itertools.count()
        self._pending_weights = None
        self._lock = threading.Lock()
        self.stats = {"prefill_tokens": 0, "decode_tokens": 0, "steps": 0, "masked_steps": 0,
                      "enforcer_violations": 0}
        self.shapes_seen: set[tuple[str, int, int]] = set()     # (program, rows, table width) run so far

    # ----------------------------------------------------------------------------------------------- requests
    def add_request(self, request: Request) -> int:
        """Queue a request -> its id; RequestError (nothing queued) when it is invalid or can never fit."""
        self._check(request)
        rid = next(self._ids)
        prompt = [int(t) for t in request.prompt]
        self._results[rid] = Completion(rid, prompt, [SampleOutput() for _ in range(request.n)])
        self._waiting.append(_Group(rid, request, [], []))
        return rid

    def _pages_needed(self, request: Request) -> tuple[int, int]:
        """(pages per sample, full prompt pages shared by the samples)."""
        p = self.config.page_size
        return math.ceil((len(request.prompt) + request.max_tokens - 1) / p), (len(request.prompt) - 1) // p

    def _check(self, r: Request) -> None:
        vocab = self.cfg.vocab_size
        if len(r.prompt) == 0:
            raise RequestError("prompt is empty; it needs at least one token")
        bad = [int(t) for t in r.prompt if not 0 <= int(t) < vocab]
        if bad:
            raise RequestError(f"prompt token ids must be in [0, vocab_size={vocab}), got {bad[:5]}")
        if r.max_tokens < 1:
            raise RequestError(f"max_tokens must be >= 1, got {r.max_tokens}")
        if not 1 <= r.n <= self.config.max_slots:
            raise RequestError(f"n must be in [1, EngineConfig.max_slots={self.config.max_slots}], got {r.n}")
        if not r.temperature >= 0 or not 0 < r.top_p <= 1 or r.top_k < 0:
            raise RequestError(f"sampling needs temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got temperature="
                               f"{r.temperature}, top_k={r.top_k}, top_p={r.top_p}")
        if not 0 <= r.seed < 2 ** 31 - r.n:
            raise RequestError(f"seed must be in [0, 2**31 - n), got {r.seed}")
        total = len(r.prompt) + r.max_tokens - 1
        if total > self.config.max_seq_len:
            raise RequestError(f"prompt ({len(r.prompt)} tokens) + max_tokens ({r.max_tokens}) - 1 = {total} exceeds "
                               f"the engine's max_seq_len ({self.config.max_seq_len})")
        per_sample, shared = self._pages_needed(r)
        need = shared + r.n * (per_sample - shared)
        if need > self.allocator.capacity:
            raise RequestError(f"request needs {need} pages of {self.config.page_size} tokens ({r.n} samples of "
                               f"{total} tokens), more than the whole cache ({self.allocator.capacity} pages)")
        if r.enforcer is not None:
            if r.enforcer.vocab_size > vocab:
                raise RequestError(f"the enforcer's tokenizer has {r.enforcer.vocab_size} tokens, more than the "
                                   f"model's vocab_size ({vocab})")
            try:
                r.enforcer.start(r.prompt)
            except ValueError as e:
                raise RequestError(f"enforcer: {e}") from None

    def abort(self, request_id: int) -> list[TokenEvent]:
        """Stop a request wherever it is; its pages and slots are freed. -> abort events of unfinished samples."""
        self._waiting = [g for g in self._waiting if g.request_id != request_id]
        group = self._groups.get(request_id)
        if group is not None:
            if group in self._prefilling:
                self._prefilling.remove(group)
                self._release_group(group)
            for s in group.samples:
                if self._decoding.get(s.slot) is s:
                    self._finish(s)
            self._groups.pop(request_id, None)
        events = []
        for i, out in enumerate(self._results.get(request_id, Completion(0, [], [])).samples):
            if out.finish_reason is None:
                out.finish_reason = "abort"
                events.append(TokenEvent(request_id, i, None, None, None, "abort", self.weight_version))
        return events

    def result(self, request_id: int) -> Completion:
        return self._results[request_id]

    def finished(self, request_id: int) -> bool:
        """Whether every sample of the request has finished (True for unknown or discarded ids)."""
        result = self._results.get(request_id)
        return result is None or result.finished

    def discard(self, request_id: int) -> None:
        """Forget a finished request's result (a long-running server calls this once it has been delivered)."""
        self._results.pop(request_id, None)

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._prefilling or self._decoding or self._pending_weights)

    @property
    def num_running(self) -> int:
        return len(self._groups)

    def run(self) -> dict[int, Completion]:
        """Step until every queued request is done -> {request id: Completion}."""
        while self.has_work:
            self.step()
        return dict(self._results)

    # ------------------------------------------------------------------------------------------------ weights
    def load_weights(self, state, version: int) -> None:
        """Serve `state` (same tree, shapes and dtypes as the engine's) from the next step on, as `version`."""
        old = jax.tree_util.tree_flatten_with_path(self.state)[0]
        new, new_tree = jax.tree_util.tree_flatten_with_path(state)
        if new_tree != jax.tree.structure(self.state):
            raise ValueError("load_weights: the state's tree differs from the engine model's")
        for (path, a), (_, b) in zip(old, new):
            if a.shape != b.shape or a.dtype != b.dtype:
                raise ValueError(f"load_weights: {jax.tree_util.keystr(path)} is {b.dtype}{list(b.shape)}, the "
                                 f"engine's is {a.dtype}{list(a.shape)}")
        state = jax.device_put(state, jax.tree.map(lambda a: a.sharding, self.state))
        with self._lock:
            self._pending_weights = (state, int(version))

    def _install_weights(self) -> None:
        with self._lock:
            pending, self._pending_weights = self._pending_weights, None
        if pending is not None:
            self.state, self.weight_version = pending

    # --------------------------------------------------------------------------------------------- scheduling
    def step(self) -> list[TokenEvent]:
        """One engine iteration (see the module docstring) -> the new tokens."""
        self._install_weights()
        self.stats["steps"] += 1
        self._admit()
        if self._prefilling:
            self._prefill_step()
        return self._decode_step() if self._decoding else []

    def _admit(self) -> None:
        while self._waiting:
            group = self._waiting[0]
            r = group.request
            per_sample, shared = self._pages_needed(r)
            need = shared + r.n * (per_sample - shared)
            if len(self._free_slots) < r.n or self.allocator.num_free < need:
                return                                       # first come first served: later requests wait too
            self._waiting.pop(0)
            group.shared = self.allocator.allocate(shared)
            for _ in range(r.n - 1):
                self.allocator.share(group.shared)
            group.samples = [_Sample(group.request_id, i, group.shared + self.allocator.allocate(per_sample - shared),
                                     position=group.prefill_len, next_token=int(r.prompt[-1]),
                                     slot=self._free_slots.pop(),
                                     constraint=None if r.enforcer is None else r.enforcer.start(r.prompt))
                             for i in range(r.n)]
            self._groups[group.request_id] = group
            if group.prefill_len:
                self._prefilling.append(group)
            else:
                self._start_decoding(group)

    def _prefill_step(self) -> None:
        groups = self._prefilling[:self.config.prefill_batch]
        c, rows = self.config.prefill_chunk, _bucket(len(groups), 1 << 30, self.batch_multiple)
        width = _bucket(max(len(g.samples[0].table) for g in groups), self.config.max_pages_per_seq)
        tokens = np.zeros((rows, c), np.int32)
        positions = np.zeros((rows, c), np.int32)
        valid = np.zeros((rows, c), bool)
        table = np.full((rows, width), NULL_PAGE, np.int32)
        for row, g in enumerate(groups):
            start, stop = g.prefilled, min(g.prefilled + c, g.prefill_len)
            tokens[row, :stop - start] = g.request.prompt[start:stop]
            positions[row] = np.arange(start, start + c)
            valid[row, :stop - start] = True
            table[row, :len(g.samples[0].table)] = g.samples[0].table
            g.prefilled = stop
        self.stats["prefill_tokens"] += int(valid.sum())
        self.shapes_seen.add(("prefill", rows, width))
        self.pool = forward.prefill(self.graphdef, self.state, self.pool, tokens, positions, valid, table,
                                    attend=self.attend)
        for g in [g for g in groups if g.prefilled == g.prefill_len]:
            self._prefilling.remove(g)
            self._start_decoding(g)

    def _start_decoding(self, group: _Group) -> None:
        """Copy-on-write of the partial prompt page for samples 1.., then every sample decodes."""
        own = len(group.shared)
        if group.prefill_len % self.config.page_size and len(group.samples) > 1:
            src = [group.samples[0].table[own]] * (len(group.samples) - 1)
            dst = [s.table[own] for s in group.samples[1:]]
            k = self.config.max_slots
            pad = [NULL_PAGE] * (k - len(src))
            self.pool = forward.copy_pages(self.pool, np.array(src + pad, np.int32), np.array(dst + pad, np.int32))
        for s in group.samples:
            self._decoding[s.slot] = s

    def _decode_step(self) -> list[TokenEvent]:
        samples = list(self._decoding.values())
        rows = _bucket(len(samples), self.config.max_slots, self.batch_multiple)
        constrained = [row for row, s in enumerate(samples) if s.constraint is not None and s.constraint.active]
        p, k = self.config.page_size, (1 if constrained else self.config.decode_steps)
        width = _bucket(max((s.position + k - 1) // p + 1 for s in samples), self.config.max_pages_per_seq)
        tokens, positions, remaining = np.zeros(rows, np.int32), np.zeros(rows, np.int32), np.zeros(rows, np.int32)
        table = np.full((rows, width), NULL_PAGE, np.int32)
        temperature, top_p = np.zeros(rows, np.float32), np.ones(rows, np.float32)
        top_k, seed, counter = np.zeros(rows, np.int32), np.zeros(rows, np.int32), np.zeros(rows, np.int32)
        for row, s in enumerate(samples):
            r = self._groups[s.request_id].request
            made = len(self._results[s.request_id].samples[s.index].tokens)
            tokens[row], positions[row], remaining[row] = s.next_token, s.position, r.max_tokens - made
            used = min(len(s.table), width)
            table[row, :used] = s.table[:used]
            temperature[row], top_k[row], top_p[row] = r.temperature, r.top_k, r.top_p
            seed[row], counter[row] = r.seed + s.index, made
        params = forward.RowSampling(temperature, top_k, top_p, seed, counter)
        mask = None
        if constrained:
            mask = np.ones((rows, self.cfg.vocab_size), bool)
            for row in constrained:
                allowed = samples[row].constraint.mask()
                mask[row, :len(allowed)] = allowed
                mask[row, len(allowed):] = False
            self.stats["masked_steps"] += 1
        self.stats["decode_tokens"] += int(np.minimum(remaining, k).sum())
        self.shapes_seen.add(("decode" if mask is None else "decode_masked", rows, width))
        self.pool, out = forward.decode(self.graphdef, self.state, self.pool, tokens, positions, remaining, table,
                                        params, attend=self.attend, num_steps=k, mask=mask)
        out = jax.device_get(out)
        events, cut = [], set()
        for j in range(k):
            for row, s in enumerate(samples):
                if self._decoding.get(s.slot) is not s or row in cut:
                    continue                                  # finished (or entered a section) earlier in this call
                token = int(out.tokens[j, row])
                if s.constraint is not None:
                    was_active = s.constraint.active
                    if not s.constraint.advance(token):
                        self.stats["enforcer_violations"] += 1
                    if s.constraint.active and not was_active:
                        cut.add(row)                          # its later tokens here were sampled unconstrained
                events.append(self._emit(s, token, float(out.logprob[j, row]),
                                         [(int(i), float(v)) for i, v in zip(out.top_ids[j, row],
                                                                             out.top_logprobs[j, row])]))
        return events

    def _emit(self, s: _Sample, token: int, logprob: float, top: list[tuple[int, float]]) -> TokenEvent:
        """Record one sampled token of a decoding sample; finish the sample on a stop token or at max_tokens."""
        r = self._groups[s.request_id].request
        result = self._results[s.request_id].samples[s.index]
        result.tokens.append(token)
        result.logprobs.append(logprob)
        result.top_logprobs.append(top)
        if self.weight_version not in result.weight_versions:
            result.weight_versions.append(self.weight_version)
        s.position, s.next_token = s.position + 1, token
        reason = None
        if token in self.stop_token_ids or token in r.stop_token_ids:
            reason = "stop"
        elif len(result.tokens) >= r.max_tokens:
            reason = "length"
        if reason:
            result.finish_reason = reason
            self._finish(s)
        return TokenEvent(s.request_id, s.index, token, logprob, top, reason, self.weight_version)

    def _finish(self, s: _Sample) -> None:
        del self._decoding[s.slot]
        self._free_slots.append(s.slot)
        self.allocator.release(s.table)
        group = self._groups[s.request_id]
        if all(self._decoding.get(x.slot) is not x for x in group.samples):
            self._groups.pop(s.request_id, None)

    def _release_group(self, group: _Group) -> None:
        for s in group.samples:
            self.allocator.release(s.table)
            self._free_slots.append(s.slot)
