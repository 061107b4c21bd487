"""The engine on a background thread, fed from asyncio: what the HTTP server talks to.

    async_engine = AsyncEngine(engine, max_pending=64); async_engine.start()
    stream = await async_engine.submit(Request(...))       # RequestError / EngineBusy raised here
    async for event in stream: ...                         # TokenEvent until every sample finished
    async_engine.abort(stream.request_id)                  # e.g. the client went away

One thread owns the Engine: it takes submissions and aborts from an inbox, steps while there is work and hands
each TokenEvent to the asyncio loop of the request's caller. A request the engine refuses, or one over the
bounded queue, fails only its caller; an exception inside a step fails the requests then running (their
streams raise EngineFailed) and the thread goes on serving new ones.
"""

from __future__ import annotations

import asyncio
import queue
import threading

from kimi_jax.serve.engine import Engine, Request, TokenEvent


class EngineBusy(Exception):
    """The bounded queue is full (max_pending requests already waiting or running)."""


class EngineFailed(Exception):
    """A step failed while this request was running (the message says why)."""


class RequestStream:
    """Async iterator over one request's TokenEvents; ends when all its samples finished."""

    def __init__(self, request_id: int, n: int, events: asyncio.Queue):
        self.request_id, self._open, self._events = request_id, n, events

    def __aiter__(self):
        return self

    async def __anext__(self) -> TokenEvent:
        if self._open == 0:
            raise StopAsyncIteration
        event = await self._events.get()
        if isinstance(event, Exception):
            self._open = 0
            raise event
        if event.finish_reason is not None:
            self._open -= 1
        return event


class AsyncEngine:
    def __init__(self, engine: Engine, *, max_pending: int = 64):
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.engine, self.max_pending = engine, max_pending
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._unfinished: dict[int, int] = {}      # request id -> samples without a finish event yet
        self._pending = 0                          # submitted and not finished
        self._pending_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = False

    def start(self) -> AsyncEngine:
        self._thread = threading.Thread(target=self._serve, name="kimi-jax-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def weight_version(self) -> int:
        return self.engine.weight_version

    async def submit(self, request: Request) -> RequestStream:
        """Queue `request` -> its stream. Raises RequestError (invalid / never fits) or EngineBusy."""
        with self._pending_lock:
            if self._pending >= self.max_pending:
                raise EngineBusy(f"{self._pending} requests are queued or running (max_pending={self.max_pending})")
            self._pending += 1
        loop = asyncio.get_running_loop()
        accepted = loop.create_future()
        events: asyncio.Queue = asyncio.Queue()
        self._inbox.put(("add", request, loop, accepted, events))
        self._wake.set()
        return RequestStream(await accepted, request.n, events)

    def abort(self, request_id: int) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def load_weights(self, state, version: int) -> None:
        """Swap weights between two steps (Engine.load_weights; checked and placed on the caller's thread)."""
        self.engine.load_weights(state, version)
        self._wake.set()

    # ------------------------------------------------------------------------------------- engine thread
    def _serve(self) -> None:
        while not self._stop:
            self._drain_inbox()
            if not self.engine.has_work:
                self._wake.wait(timeout=0.1)
                self._wake.clear()
                continue
            try:
                events = self.engine.step()
            except Exception as e:                              # noqa: BLE001 (reported to every caller)
                for rid in list(self._streams):
                    self.engine.abort(rid)
                    self._deliver(rid, EngineFailed(f"engine step failed: {type(e).__name__}: {e}"))
                continue
            for event in events:
                self._deliver(event.request_id, event)

    def _drain_inbox(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item[0] == "add":
                _, request, loop, accepted, events = item
                try:
                    rid = self.engine.add_request(request)
                except Exception as e:                          # noqa: BLE001 (RequestError goes to its caller)
                    self._release()
                    loop.call_soon_threadsafe(self._settle, accepted, None, e)
                    continue
                self._streams[rid] = (loop, events)
                self._unfinished[rid] = request.n
                loop.call_soon_threadsafe(self._settle, accepted, rid, None)
            else:
                for event in self.engine.abort(item[1]):
                    self._deliver(event.request_id, event)
                self._close(item[1])

    def _deliver(self, request_id: int, event) -> None:
        if request_id not in self._streams:
            return
        loop, events = self._streams[request_id]
        loop.call_soon_threadsafe(events.put_nowait, event)
        if not isinstance(event, Exception) and event.finish_reason is not None:
            self._unfinished[request_id] -= 1
        if isinstance(event, Exception) or self._unfinished[request_id] == 0:
            self._close(request_id)

    def _close(self, request_id: int) -> None:
        self._unfinished.pop(request_id, None)
        if self._streams.pop(request_id, None) is not None:
            self._release()
        self.engine.discard(request_id)

    def _release(self) -> None:
        with self._pending_lock:
            self._pending -= 1

    def _settle(self, future: asyncio.Future, request_id, error) -> None:
        """On the caller's loop: the outcome of a submission (a caller that gave up aborts its request)."""
        if future.cancelled():
            if request_id is not None:
                self.abort(request_id)
        elif error is not None:
            future.set_exception(error)
        else:
            future.set_result(request_id)
