"""Prefetcher: the same batches as the plain iterator, states of the batches handed out (not of those read
ahead), exact resume, errors raised at their batch, a thread that stops."""

import json
import time

import numpy as np
import pytest

from kimi_jax.data import Prefetcher, make_train_iterator
from test_data_pipeline import assert_batches_equal, config, take, text_dir  # noqa: F401 (fixture)


def plain(text_dir):
    return make_train_iterator(config(text_dir), process_index=0, process_count=1)


def test_same_batches_and_states_as_the_plain_iterator(text_dir):
    reference = plain(text_dir)
    prefetcher = Prefetcher(plain(text_dir), depth=3)
    try:
        for _ in range(5):
            assert_batches_equal([next(prefetcher)], [next(reference)])
            time.sleep(0.05)  # let the thread run ahead: the state must not follow it
            assert prefetcher.get_state() == reference.get_state()
            assert prefetcher.global_state() == reference.global_state()
    finally:
        prefetcher.close()


def test_resume_from_a_prefetcher_state_is_exact(text_dir):
    prefetcher = Prefetcher(plain(text_dir), depth=2)
    take(prefetcher, 3)
    time.sleep(0.05)
    state = json.loads(json.dumps(prefetcher.get_state()))
    expected = take(prefetcher, 4)
    resumed = Prefetcher(plain(text_dir), depth=2)
    resumed.set_state(state)  # stops the thread that read ahead from the start, restarts it at `state`
    try:
        assert_batches_equal(take(resumed, 4), expected)
        unwrapped = plain(text_dir)
        unwrapped.set_state(state)
        assert_batches_equal(take(unwrapped, 4), expected)
    finally:
        prefetcher.close()
        resumed.close()


class _Failing:
    """Two batches, then an error."""
    tokenizer = None

    def __init__(self):
        self.n = 0

    def get_state(self):
        return {"n": self.n}

    def __next__(self):
        if self.n == 2:
            raise OSError("shard unreadable")
        self.n += 1
        return {"inputs": np.full((1, 4), self.n)}


def test_errors_surface_at_their_batch_and_the_thread_stops():
    prefetcher = Prefetcher(_Failing(), depth=4)
    assert [int(next(prefetcher)["inputs"][0, 0]) for _ in range(2)] == [1, 2]
    assert prefetcher.get_state() == {"n": 2}
    for _ in range(2):  # and again on the next call
        with pytest.raises(OSError, match="shard unreadable"):
            next(prefetcher)
    prefetcher.close()
    assert not prefetcher._thread.is_alive()


def test_close_stops_a_producer_blocked_on_a_full_queue(text_dir):
    prefetcher = Prefetcher(plain(text_dir), depth=1)
    time.sleep(0.1)  # the queue is full, the producer waits to put the next batch
    prefetcher.close()
    assert not prefetcher._thread.is_alive()
    with pytest.raises(ValueError, match="prefetch depth"):
        Prefetcher(plain(text_dir), depth=0)
