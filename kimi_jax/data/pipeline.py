"""The training input pipeline: documents -> tokens -> packed rows -> per-host slices of global batches.

Batch (one per step and host), B = global_batch_size // process_count rows, S = seq_len:
  {"input_ids": int32 [B, S], "targets": int32 [B, S], "positions": int32 [B, S],
   "segment_ids": int32 [B, S], "loss_mask": float32 [B, S]}
(row semantics in kimi_jax.data.packing). The model takes (input_ids, positions, segment_ids); the loss is
cross-entropy(logits, targets) weighted by loss_mask (1 on every real pair for the pretraining sources; for
the "sft" source 1 exactly where the target is an assistant token of the conversation, see
kimi_jax.data.sources).

Layout: row r of every global batch is "lane" r, an independent packing stream over the documents at
positions r, r + G, r + 2G, ... (G = global_batch_size) of the document stream (each epoch a fresh shuffle of
all documents when shuffle=True, seeded by (seed, epoch); documents repeat forever unless num_epochs is set).
Process p of P holds lanes [p * G / P, (p + 1) * G / P): the processes' batches are disjoint, their union in
process order is the global batch, and the global batch does not depend on P (the same run on 1 or 2 hosts
sees the same data). Every host reads only its own lanes' documents.

State: `get_state()` is a small JSON-able dict (per lane: a document index and an offset); `set_state`
restores exactly: the following batches equal those of the uninterrupted run. A state holding more lanes than
a process needs is fine: `global_state()` (a collective) gathers every process's lanes into one state that any
process, under any process count, restores from, which is what a checkpoint written once by the primary
process needs; `merge_states` does the same for per-process states. The iterator is a grain.DatasetIterator,
so grain.checkpoint.CheckpointSave / CheckpointRestore also store it (one file per process) with orbax.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from kimi_jax.data import corpus, sources
from kimi_jax.data.packing import ROW_KEYS, PackedRowsIterDataset, PackedRowsIterator
from kimi_jax.data.tokenizers import load_tokenizer

SOURCES = ("stdlib", "text", "array_record", "sft")
STATE_FORMAT = "kimi_jax.data/1"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What the pipeline reads and how it batches.

    source: "stdlib" (the default corpus, kimi_jax.data.corpus), "text" (text files, one document each),
      "array_record" (token shards written by sources.write_token_shard) or "sft" (shards of tokenised
      conversations with their loss masks, written by kimi_jax.agentic.synthesis: the loss falls on the
      assistant tokens only; the framing and weighting rule is in kimi_jax.data.sources).
    paths: for "text" / "array_record" / "sft": files, directories or glob patterns ("sft" takes only the
      *.array_record files of a directory, so a synthesis output directory can be given as is).
    add_bos: frame each document as [BOS] + ids + [EOS] rather than ids + [EOS] (for "sft": no second BOS when
      a record already starts with one).
    tokenizer: "byte" (ByteTokenizer, vocab 272) or a Kimi tiktoken.model file (or its directory).
    max_corpus_bytes: for "stdlib" / "text": keep the first files (in path order) up to this many bytes.
    num_epochs: None repeats the documents forever.
    prefetch: batches the training loop's input produces ahead in a background thread (kimi_jax.data.prefetch;
      0: none). Not part of the iterator state: a run may resume with another value.
    split_documents: True: a document that does not fit the rest of a row continues in the next row; False: it
      starts the next row (the row is padded), so that a conversation is seen whole when it fits one row
      (kimi_jax.data.packing).
    """

    source: str = "stdlib"
    paths: tuple[str, ...] = ()
    tokenizer: str = "byte"
    seq_len: int = 256
    global_batch_size: int = 8
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    add_bos: bool = True
    max_corpus_bytes: int | None = None
    prefetch: int = 2
    split_documents: bool = True

    def __post_init__(self):
        object.__setattr__(self, "paths", (self.paths,) if isinstance(self.paths, str) else tuple(self.paths))
        if self.source not in SOURCES:
            raise ValueError(f"data source must be one of {SOURCES}, got {self.source!r}")
        if self.source != "stdlib" and not self.paths:
            raise ValueError(f"data source {self.source!r} needs paths")
        for name in ("seq_len", "global_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"data {name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"data seed must be in [0, 2**32), got {self.seed}")
        if self.prefetch < 0:
            raise ValueError(f"data prefetch must be >= 0, got {self.prefetch}")
        if self.num_epochs is not None and self.num_epochs <= 0:
            raise ValueError(f"data num_epochs must be positive or None, got {self.num_epochs}")

    @classmethod
    def from_any(cls, config_like: Any) -> DataConfig:
        """A DataConfig from a DataConfig, a mapping, or an object with `to_dict()` (ml_collections
        ConfigDict); missing fields take the defaults, unknown fields are an error."""
        if isinstance(config_like, cls):
            return config_like
        if hasattr(config_like, "to_dict"):
            config_like = config_like.to_dict()
        if not isinstance(config_like, Mapping):
            raise TypeError(f"data config must be a DataConfig, a mapping or a ConfigDict, got {type(config_like)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config_like) - known)
        if unknown:
            raise ValueError(f"unknown data config fields {unknown}; known fields: {sorted(known)}")
        return cls(**config_like)


def host_lanes(global_batch_size: int, process_index: int, process_count: int) -> range:
    """The global batch rows (lanes) that process `process_index` of `process_count` holds."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is outside 0..{process_count - 1}")
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} is not divisible by process_count {process_count}")
    per_host = global_batch_size // process_count
    return range(process_index * per_host, (process_index + 1) * per_host)


def document_files(cfg: DataConfig) -> list:
    """The files the documents come from: stdlib sources, text files or ArrayRecord shards."""
    if cfg.source == "stdlib":
        return corpus.default_corpus_files(cfg.max_corpus_bytes)
    if cfg.source == "sft":
        return sources.resolve_paths(cfg.paths, dir_suffix=sources.SFT_SUFFIX)
    files = sources.resolve_paths(cfg.paths)
    return corpus.cap_bytes(files, cfg.max_corpus_bytes) if cfg.source == "text" else files


class HostBatchIterator(grain.DatasetIterator):
    """This process's slice of the global batches; see the module docstring."""

    def __init__(self, lanes: Mapping[int, PackedRowsIterator], fingerprint: Mapping[str, Any], tokenizer):
        super().__init__(list(lanes.values()))
        self._lanes = dict(lanes)
        self._fingerprint = dict(fingerprint)
        self.tokenizer = tokenizer
        self.step = 0

    @property
    def lanes(self) -> list[int]:
        return list(self._lanes)

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What a saved state must match: source, batch geometry, seed, shuffling, corpus size, vocab."""
        return dict(self._fingerprint)

    def __next__(self) -> dict[str, np.ndarray]:
        rows = [next(lane) for lane in self._lanes.values()]
        self.step += 1
        return {k: np.stack([row[k] for row in rows]) for k in ROW_KEYS}

    def get_state(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "fingerprint": self.fingerprint, "step": self.step,
                "lanes": {str(r): lane.get_state() for r, lane in self._lanes.items()}}

    def global_state(self) -> dict[str, Any]:
        """get_state() holding the lanes of every process (all-gathered), so that the one copy a checkpoint
        writes restores every process, whatever their count. A collective: every process calls it at the
        same step. With one JAX process it is get_state()."""
        return gather_lanes(self.get_state())

    def set_state(self, state: Mapping[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"data iterator state has format {state.get('format')!r}, expected {STATE_FORMAT!r}")
        saved = state["fingerprint"]
        diff = {k: (saved.get(k), self._fingerprint.get(k)) for k in {**saved, **self._fingerprint}
                if saved.get(k) != self._fingerprint.get(k)}
        if diff:
            raise ValueError("data iterator state does not match this pipeline (field: (saved, now)): "
                             + ", ".join(f"{k}: {v}" for k, v in sorted(diff.items())))
        missing = [r for r in self._lanes if str(r) not in state["lanes"]]
        if missing:
            raise ValueError(f"data iterator state has no entry for lanes {missing} (it holds lanes "
                             f"{sorted(int(r) for r in state['lanes'])}); merge all processes' states with "
                             "merge_states() to resume with a different process count")
        for r, lane in self._lanes.items():
            lane.set_state(state["lanes"][str(r)])
        self.step = int(state["step"])


def gather_lanes(state: Mapping[str, Any]) -> dict[str, Any]:
    """This process's iterator `state` with the lanes of every process (an all-gather; every process calls
    it at the same step). With one JAX process it is `state`."""
    import jax

    state = dict(state)
    if jax.process_count() == 1:
        return state
    from jax.experimental import multihost_utils

    local = np.array([[int(r), s["doc_index"], s["pairs_done"]] for r, s in state["lanes"].items()], np.int64)
    if local.max(initial=0) >= 2**31:
        raise ValueError(f"data iterator position {local.max()} does not fit the int32 all-gather")
    gathered = np.asarray(multihost_utils.process_allgather(local.astype(np.int32))).reshape(-1, 3)
    lanes = {str(r): {"doc_index": int(d), "pairs_done": int(p)} for r, d, p in gathered.tolist()}
    return {**state, "lanes": dict(sorted(lanes.items(), key=lambda kv: int(kv[0])))}


def merge_states(states: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One state holding the lanes of all `states` (from the processes of one run, saved at the same step)."""
    if not states:
        raise ValueError("merge_states needs at least one state")
    first = states[0]
    for s in states[1:]:
        if s["fingerprint"] != first["fingerprint"] or s["step"] != first["step"]:
            raise ValueError("cannot merge data iterator states from different pipelines or steps")
    lanes = {}
    for s in states:
        lanes.update(s["lanes"])
    return {**first, "lanes": lanes}


def make_train_iterator(config_like: Any, *, seed: int | None = None, process_index: int | None = None,
                        process_count: int | None = None, tokenizer=None) -> HostBatchIterator:
    """The training batches of this process (see the module docstring for the batch dict).

    config_like: DataConfig, mapping or ConfigDict with DataConfig's fields. seed overrides its seed.
    process_index / process_count default to jax.process_index() / jax.process_count().
    tokenizer overrides the config's tokenizer spec (any object with the Tokenizer interface)."""
    cfg = DataConfig.from_any(config_like)
    if seed is not None:
        cfg = dataclasses.replace(cfg, seed=seed)
    if process_index is None or process_count is None:
        import jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    lanes = host_lanes(cfg.global_batch_size, process_index, process_count)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer)

    files = document_files(cfg)
    if cfg.source == "sft":
        documents = sources.sft_source(files)
        to_tokens = sources.sft_record_to_document(tokenizer, add_bos=cfg.add_bos, files=files)
    elif cfg.source == "array_record":
        documents = sources.array_record_source(files)
        to_tokens = sources.record_to_tokens(tokenizer, add_bos=cfg.add_bos)
    else:
        documents = sources.text_file_source(files)
        to_tokens = sources.text_to_tokens(tokenizer, add_bos=cfg.add_bos)
    num_documents = len(documents)
    if cfg.num_epochs is not None and num_documents * cfg.num_epochs < cfg.global_batch_size:
        raise ValueError(f"{num_documents} documents x {cfg.num_epochs} epochs cannot fill "
                         f"{cfg.global_batch_size} batch rows")
    stream = documents.shuffle(seed=cfg.seed) if cfg.shuffle else documents
    stream = stream.repeat(cfg.num_epochs)
    packed = {r: iter(PackedRowsIterDataset(stream[r::cfg.global_batch_size].map(to_tokens),
                                            seq_len=cfg.seq_len, pad_id=tokenizer.pad_id,
                                            split_documents=cfg.split_documents))
              for r in lanes}
    fingerprint = {"source": cfg.source, "seq_len": cfg.seq_len, "global_batch_size": cfg.global_batch_size,
                   "seed": cfg.seed, "shuffle": cfg.shuffle, "num_epochs": cfg.num_epochs,
                   "add_bos": cfg.add_bos, "num_documents": num_documents, "vocab_size": tokenizer.vocab_size}
    if not cfg.split_documents:    # only when not the default: states saved before the option still match
        fingerprint["split_documents"] = False
    return HostBatchIterator(packed, fingerprint, tokenizer)
