"""Document sources: text files, preprocessed ArrayRecord token shards and SFT conversation shards, as grain
MapDatasets.

A document is one text file, or one ArrayRecord record holding its token ids as little-endian uint32 bytes
(`write_token_shard` writes such shards; ids are stored without BOS/EOS, the pipeline adds them).

SFT shards (the "sft" source; kimi_jax.agentic.synthesis writes them): one record per conversation, little-endian
uint32 [ids..., loss_mask...] of two equal halves, (ids, mask) = kimi_jax.chat.encode(tokenizer, messages,
tools): ids the full chat-format rendering, mask 1 exactly on the assistant turns' tokens including each turn's
closing <|im_end|>. `sft_record_to_document` turns a record into a weighted document (packing module
docstring) with this rule:
    tokens  t = [BOS] + ids + [EOS]         BOS only with add_bos, and not when ids already start with BOS
    weights w = [0]   + mask + [0]          w[i]: the loss weight of the pair t[i-1] -> t[i]
so the pair t[i] -> t[i+1] is trained iff t[i+1] is an assistant token: the loss falls on exactly the
assistant's tokens (sum(mask) targets; without BOS, ids[0] is never a target, and its mask is always 0 for a
rendered conversation, which opens with a system turn). The appended EOS is a target of weight 0: a
conversation ends with the assistant's own <|im_end|>, which is what the model learns to stop on.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import grain
import numpy as np

from kimi_jax.data.corpus import read_text


def resolve_paths(patterns: Sequence[str | os.PathLike], *, dir_suffix: str = "") -> list[Path]:
    """Files named by `patterns`, in order: a file; a directory (all files below it whose name ends with
    `dir_suffix`, sorted); or a glob pattern (its matches, sorted, `**` recursive). A pattern that names
    nothing is an error."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    files: list[Path] = []
    for pattern in patterns:
        pattern = os.fspath(pattern)
        if os.path.isfile(pattern):
            found = [Path(pattern)]
        elif os.path.isdir(pattern):
            found = sorted(p for p in Path(pattern).rglob("*") if p.is_file() and p.name.endswith(dir_suffix))
        else:
            found = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not found:
            raise ValueError(f"data path {pattern!r} matches no file")
        files.extend(found)
    return files


def frame_document(ids, *, bos_id: int | None, eos_id: int) -> np.ndarray:
    """int32 [n + 1 (+1 with BOS)]: [BOS] + ids + [EOS] (no BOS when bos_id is None)."""
    parts = [np.asarray(ids, np.int32).reshape(-1), np.asarray([eos_id], np.int32)]
    if bos_id is not None:
        parts.insert(0, np.asarray([bos_id], np.int32))
    return np.concatenate(parts)


def text_file_source(files: Sequence[Path]) -> grain.MapDataset:
    """MapDataset of file paths (str); `text_to_tokens` turns one into a framed token array."""
    if not files:
        raise ValueError("text source has no files")
    return grain.MapDataset.source([os.fspath(f) for f in files])


def text_to_tokens(tokenizer, *, add_bos: bool) -> Callable[[str], np.ndarray]:
    bos = tokenizer.bos_id if add_bos else None

    def fn(path: str) -> np.ndarray:
        return frame_document(np.asarray(tokenizer.encode(read_text(path)), np.int32), bos_id=bos,
                              eos_id=tokenizer.eos_id)
    return fn


def array_record_source(files: Sequence[Path]) -> grain.MapDataset:
    """MapDataset of the records (bytes) of ArrayRecord shards, in file order."""
    if not files:
        raise ValueError("array_record source has no files")
    try:
        import array_record.python.array_record_module  # noqa: F401
    except ImportError as e:
        raise ImportError("the array_record source needs the `array_record` package") from e
    return grain.MapDataset.source(grain.sources.ArrayRecordDataSource([os.fspath(f) for f in files]))


def record_to_tokens(tokenizer, *, add_bos: bool) -> Callable[[bytes], np.ndarray]:
    bos = tokenizer.bos_id if add_bos else None

    def fn(record: bytes) -> np.ndarray:
        if len(record) % 4:
            raise ValueError(f"token record of {len(record)} bytes is not a whole number of uint32 ids")
        ids = np.frombuffer(record, "<u4")
        if ids.size and int(ids.max()) >= tokenizer.vocab_size:
            raise ValueError(f"token record holds id {int(ids.max())} >= tokenizer vocab {tokenizer.vocab_size}")
        return frame_document(ids, bos_id=bos, eos_id=tokenizer.eos_id)
    return fn


SFT_SUFFIX = ".array_record"   # the files the sft source takes from a directory (synthesis: shard-*.array_record)


def sft_source(files: Sequence[Path]) -> grain.MapDataset:
    """MapDataset of (record key, record bytes) over the records of SFT shards, in file order; the key (the
    record's index in this source) lets `sft_record_to_document` name the file and record of a bad one."""
    return array_record_source(files).map_with_index(_with_key)


def _with_key(key: int, record: bytes) -> tuple[int, bytes]:
    return key, record


def locate_record(files: Sequence[Path], key: int) -> tuple[str, int]:
    """(file, index within the file) of record `key` of the records of `files` in order."""
    from array_record.python.array_record_module import ArrayRecordReader

    for f in files:
        reader = ArrayRecordReader(os.fspath(f))
        try:
            n = reader.num_records()
        finally:
            reader.close()
        if key < n:
            return os.fspath(f), key
        key -= n
    raise IndexError(f"record key beyond the {len(files)} files")


def sft_record_to_document(tokenizer, *, add_bos: bool,
                           files: Sequence[Path]) -> Callable[[tuple[int, bytes]], tuple[np.ndarray, np.ndarray]]:
    """(key, record) of `sft_source(files)` -> the weighted document (tokens int32 [L], weights float32 [L])
    of the module docstring's rule. A record that is not whole uint32 values, has an odd number of values, a mask
    value other than 0/1 or an id >= tokenizer.vocab_size raises ValueError naming its file and index (when
    the record is read, i.e. at the first batch that reaches it)."""
    bos, eos, vocab = tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size

    def fn(item: tuple[int, bytes]) -> tuple[np.ndarray, np.ndarray]:
        key, record = item

        def bad(why: str) -> ValueError:
            path, index = locate_record(files, int(key))
            return ValueError(f"sft shard {path}: record {index}: {why}")

        if len(record) % 4:
            raise bad(f"{len(record)} bytes is not a whole number of uint32 values")
        values = np.frombuffer(record, "<u4")
        if values.size % 2:
            raise bad(f"{values.size} values (odd) cannot be ids + loss mask of one length")
        n = values.size // 2
        ids, mask = values[:n], values[n:]
        wrong = np.flatnonzero(mask > 1)
        if wrong.size:
            raise bad(f"loss mask value {int(mask[wrong[0]])} at token {int(wrong[0])}; the mask must be 0 or 1")
        if n and int(ids.max()) >= vocab:
            raise bad(f"token id {int(ids.max())} at token {int(np.argmax(ids))} >= tokenizer vocab {vocab}")
        with_bos = add_bos and not (n and int(ids[0]) == bos)
        tokens = frame_document(ids, bos_id=bos if with_bos else None, eos_id=eos)
        weights = np.concatenate([np.zeros(int(with_bos), np.float32), mask.astype(np.float32),
                                  np.zeros(1, np.float32)])
        return tokens, weights
    return fn


def write_token_shard(path: str | os.PathLike, documents: Iterable[Sequence[int]]) -> int:
    """Write one ArrayRecord shard, one record per document (its ids as little-endian uint32, no BOS/EOS).
    Returns the number of records written. The file appears complete or not at all."""
    from array_record.python.array_record_module import ArrayRecordWriter

    path = os.fspath(path)
    tmp = path + ".tmp"
    writer = ArrayRecordWriter(tmp, "group_size:1")
    count, complete = 0, False
    try:
        for ids in documents:
            arr = np.asarray(ids, np.int64)
            if arr.ndim != 1 or (arr.size and (arr.min() < 0 or arr.max() >= 2**32)):
                raise ValueError(f"{path}: document {count}: token ids must be a 1-D sequence of uint32 values")
            writer.write(arr.astype("<u4").tobytes())
            count += 1
        complete = True
    finally:
        writer.close()
        if not complete:
            os.remove(tmp)
    os.replace(tmp, path)
    return count
