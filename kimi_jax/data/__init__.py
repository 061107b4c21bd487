"""Data: tokenizers, the default corpus, and the grain input pipeline (packing, per-host batches)."""

from kimi_jax.data.corpus import (corpus_unigram_entropy, default_corpus_files, describe_corpus,
                                  target_token_counts, unigram_entropy)
from kimi_jax.data.packing import ROW_KEYS, PackedRowsIterDataset
from kimi_jax.data.pipeline import (DataConfig, HostBatchIterator, host_lanes, make_train_iterator,
                                    merge_states)
from kimi_jax.data.prefetch import Prefetcher
from kimi_jax.data.sources import write_token_shard
from kimi_jax.data.tokenizers import ByteTokenizer, KimiTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "ByteTokenizer", "DataConfig", "HostBatchIterator", "KimiTokenizer", "PackedRowsIterDataset", "Prefetcher",
    "ROW_KEYS",
    "Tokenizer", "corpus_unigram_entropy", "default_corpus_files", "describe_corpus", "host_lanes",
    "load_tokenizer", "make_train_iterator", "merge_states", "target_token_counts", "unigram_entropy",
    "write_token_shard",
]
