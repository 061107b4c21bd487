"""Packing framed documents into fixed-length rows for next-token prediction (a grain transform).

A framed document t = [BOS] + tokens + [EOS] (length L) gives L - 1 training pairs (t[i] -> t[i+1]). Rows of
`seq_len` pairs are filled greedily with the pairs of consecutive documents; a document that does not fit
continues at the start of the next row (with split_documents=False it starts a new row instead, see below).
One row, each field int32 [seq_len] (loss_mask float32):

  input_ids    t[i]; pad_id on padding
  targets      t[i+1], always from the same document as input_ids[i]; pad_id on padding
  segment_ids  1, 2, ... for the document pieces of the row in order; 0 on padding
  positions    0, 1, ... restarting at every piece (a document continued from the previous row restarts at 0,
               so positions < seq_len); 0 on padding
  loss_mask    the pair's weight: 1.0 where segment_ids > 0, else 0.0, for a plain document; for a weighted
               document (below) w[i+1], the weight of its target token; 0.0 on padding

A document is either an int array t [L] (every pair weighs 1) or a weighted document, a pair (t, w) of an int
array [L] and a float array [L]: pair t[i] -> t[i+1] weighs w[i+1], the weight of its target (w[0] is never
used: the first token is never a target). The SFT source (kimi_jax.data.sources.sft_record_to_document) gives
weighted documents whose weights are the loss mask of a conversation, so that only assistant tokens are trained.

split_documents=True (the default): padding occurs only in the last row of a finite stream; a document split
across rows loses, in its later pieces, the attention to its earlier ones (positions restart at 0) - for a
conversation, the later assistant turns are trained without the turns before the row boundary.
split_documents=False: a document that does not fit the rest of a row which already holds something starts the
next row, and the row is padded (loss_mask 0); only a document of more than seq_len pairs is still split, in
pieces of seq_len pairs, each at the start of a row.

The iterator state is two integers, {"doc_index": next document to read from, "pairs_done": pairs of it
already emitted}: restoring re-reads that document and continues exactly.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

ROW_KEYS = ("input_ids", "targets", "positions", "segment_ids", "loss_mask")


class PackedRowsIterDataset(grain.IterDataset):
    """Rows of `seq_len` packed training pairs from `documents`, a MapDataset of framed int token arrays or of
    weighted documents (tokens, target weights); see the module docstring."""

    def __init__(self, documents: grain.MapDataset, *, seq_len: int, pad_id: int, split_documents: bool = True):
        super().__init__(documents)
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self._documents = documents
        self._seq_len = seq_len
        self._pad_id = pad_id
        self._split_documents = split_documents

    def __iter__(self) -> PackedRowsIterator:
        return PackedRowsIterator(self._documents, seq_len=self._seq_len, pad_id=self._pad_id,
                                  split_documents=self._split_documents)

    def __str__(self) -> str:
        return f"PackedRowsIterDataset(seq_len={self._seq_len}, split_documents={self._split_documents})"


class PackedRowsIterator(grain.DatasetIterator):
    """Iterator of PackedRowsIterDataset; reads documents by index, so its state is just a position."""

    def __init__(self, documents: grain.MapDataset, *, seq_len: int, pad_id: int, split_documents: bool = True):
        super().__init__()
        self._documents = documents
        self._num_documents = len(documents)
        self._seq_len = seq_len
        self._pad_id = pad_id
        self._split_documents = split_documents
        self._doc_index = 0
        self._pairs_done = 0
        self._tokens: np.ndarray | None = None   # the document at _doc_index, once read
        self._weights: np.ndarray | None = None  # its target weights (None: a plain document, all 1)

    def _current_document(self) -> tuple[np.ndarray, np.ndarray | None]:
        if self._tokens is None:
            document = self._documents[self._doc_index]
            weights = None
            if isinstance(document, tuple):
                if len(document) != 2:
                    raise ValueError(f"document {self._doc_index}: a weighted document is (tokens, weights), got "
                                     f"a tuple of {len(document)}")
                document, weights = document
            tokens = np.asarray(document)
            if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
                raise ValueError(f"document {self._doc_index} must be a 1-D integer array, got "
                                 f"{tokens.dtype} {tokens.shape}")
            if weights is not None:
                weights = np.asarray(weights, np.float32)
                if weights.shape != tokens.shape:
                    raise ValueError(f"document {self._doc_index}: weights {weights.shape} do not match its "
                                     f"tokens {tokens.shape}")
            self._tokens, self._weights = tokens, weights
        return self._tokens, self._weights

    def __next__(self) -> dict[str, np.ndarray]:
        s = self._seq_len
        row = {"input_ids": np.full(s, self._pad_id, np.int32), "targets": np.full(s, self._pad_id, np.int32),
               "positions": np.zeros(s, np.int32), "segment_ids": np.zeros(s, np.int32),
               "loss_mask": np.zeros(s, np.float32)}
        filled, segment = 0, 0
        while filled < s and self._doc_index < self._num_documents:
            tokens, weights = self._current_document()
            start = self._pairs_done
            remaining = len(tokens) - 1 - start
            if not self._split_documents and filled > 0 and remaining > s - filled:
                break                                    # starts the next row; this one is padded
            take = min(s - filled, remaining)
            if take > 0:
                segment += 1
                end = filled + take
                row["input_ids"][filled:end] = tokens[start:start + take]
                row["targets"][filled:end] = tokens[start + 1:start + 1 + take]
                row["positions"][filled:end] = np.arange(take)
                row["segment_ids"][filled:end] = segment
                row["loss_mask"][filled:end] = 1.0 if weights is None else weights[start + 1:start + 1 + take]
                filled = end
                self._pairs_done += take
            if self._pairs_done >= len(tokens) - 1:
                self._doc_index += 1
                self._pairs_done = 0
                self._tokens = self._weights = None
        if filled == 0:
            raise StopIteration
        return row

    def get_state(self) -> dict[str, Any]:
        return {"doc_index": self._doc_index, "pairs_done": self._pairs_done}

    def set_state(self, state: dict[str, Any]) -> None:
        doc_index, pairs_done = int(state["doc_index"]), int(state["pairs_done"])
        if not 0 <= doc_index <= self._num_documents or pairs_done < 0:
            raise ValueError(f"packing state {state} is outside this stream of {self._num_documents} documents")
        self._doc_index, self._pairs_done, self._tokens, self._weights = doc_index, pairs_done, None, None
