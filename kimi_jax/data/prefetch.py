"""Background prefetching of host batches, with iterator states that stay exact for checkpoints.

`Prefetcher(iterator, depth)` runs `next(iterator)` in a daemon thread up to `depth` batches ahead of the
training loop, so packing and tokenisation overlap the device step. Each produced batch travels with the
iterator state taken right after it; `get_state()` / `global_state()` describe the position after the last
batch handed out (not the last one produced), so a checkpoint written at step n resumes at batch n + 1
exactly, whatever the thread had read ahead.
"""

from __future__ import annotations

import copy
import queue
import threading
from typing import Any, Mapping

from kimi_jax.data.pipeline import HostBatchIterator, gather_lanes

_POLL_S = 0.1  # how often a blocked producer checks for close()


class Prefetcher:
    """An iterator of `iterator`'s batches, produced `depth` ahead in a background thread.

    Errors of the wrapped iterator (and its end) are raised by `__next__` in the consumer's thread, at the
    batch where they happened. `set_state` stops the thread, moves the wrapped iterator and restarts;
    `close` stops the thread (the wrapped iterator is then at an unspecified later position).
    """

    def __init__(self, iterator: HostBatchIterator, depth: int = 2):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._iterator = iterator
        self._depth = depth
        self._state = iterator.get_state()
        self._error: BaseException | None = None
        self.tokenizer = iterator.tokenizer
        self._start()

    def _start(self) -> None:
        self._queue: queue.Queue = queue.Queue(self._depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="data-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                batch = next(self._iterator)
                if not self._put((batch, self._iterator.get_state())):
                    return
        except BaseException as e:  # noqa: BLE001 - StopIteration or a pipeline error, re-raised by __next__
            self._put((None, e))

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._error is not None:
            raise self._error
        batch, state = self._queue.get()
        if batch is None:
            self._error = state
            raise state
        self._state = state
        return batch

    def get_state(self) -> dict[str, Any]:
        """The wrapped iterator's state after the last batch returned by `__next__`."""
        return copy.deepcopy(self._state)

    def global_state(self) -> dict[str, Any]:
        """`get_state()` with every process's lanes (all-gathered); a collective, as HostBatchIterator's."""
        return gather_lanes(self.get_state())

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.close()
        self._iterator.set_state(state)
        self._state = self._iterator.get_state()
        self._error = None
        self._start()

    def close(self) -> None:
        """Stops the producer thread (waits for the batch it is making, if any)."""
        self._stop.set()
        self._thread.join()
