"""The engine thread: the only thread that touches the engine (and so MLX).

The web side (asyncio) hands it commands through a thread-safe task queue and
gets token events back on one asyncio queue per request, posted with
`loop.call_soon_threadsafe`.  Between two engine steps the thread applies every
queued submission and cancellation, so a cancelled request's slot is free for
the very next step.  If a step raises, the thread records why (/health reports
it), ends every waiting request with an error event at once and refuses new
ones: nothing hangs on a dead engine.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from mlx_llama.generation.requests import GenerationRequest, RequestInfo, TokenEvent
from mlx_llama.server.engine_api import BatchEngine, EngineLoad

log = logging.getLogger("mlx_llama.server")


class EngineDead(Exception):
    """The engine thread has stopped after an error; the message says which."""


@dataclass
class _Submit:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    accepted: asyncio.Future  # resolves to the request id, or to the engine's exception
    events: asyncio.Queue


@dataclass
class _Cancel:
    request_id: int


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    info_pending: bool = True


@dataclass
class Job:
    """A submitted request as the web side sees it: its id, events and (after the first event) info."""

    request_id: int
    worker: "EngineWorker"
    events: asyncio.Queue
    info: RequestInfo | None = None
    _finished: bool = field(default=False, repr=False)

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        while not self._finished:
            item = await self.events.get()
            if isinstance(item, RequestInfo):
                self.info = item
                continue
            self._finished = item.finish_reason is not None
            yield item

    def cancel(self) -> None:
        """Stop generating (a client that left, a stop string); a no-op once finished."""
        if not self._finished:
            self._finished = True
            self.worker.cancel(self.request_id)


class EngineWorker:
    def __init__(self, engine: BatchEngine, on_step: Callable[[EngineLoad, int], None] | None = None,
                 idle_poll_s: float = 0.1) -> None:
        """`on_step(load, tokens_generated)` runs on the engine thread after every step (metrics)."""
        self._engine = engine
        self._on_step = on_step
        self._idle_poll_s = idle_poll_s
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[int, _Stream] = {}
        self._lock = threading.Lock()  # orders "dead" against new submissions
        self._stopping = threading.Event()
        self.error: str | None = None
        self.steps = 0
        self._thread = threading.Thread(target=self._run, name="mlx-llama-engine", daemon=True)

    # -- web side -------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self.error is None and self._thread.is_alive()

    async def submit(self, request: GenerationRequest) -> Job:
        """Queue a request; raises EngineDead, or what the engine's submit raised (QueueFull …)."""
        loop = asyncio.get_running_loop()
        command = _Submit(request, loop, loop.create_future(), asyncio.Queue())
        with self._lock:
            if not self.alive:
                raise EngineDead(self.error or "the engine thread is not running")
            self._inbox.put(command)
        request_id = await command.accepted
        return Job(request_id, self, command.events)

    def cancel(self, request_id: int) -> None:
        self._inbox.put(_Cancel(request_id))

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the current step (the HTTP side has drained its requests by then)."""
        self._stopping.set()
        self._inbox.put(None)
        self._thread.join(timeout)

    # -- engine thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._apply_commands(block=not self._engine.has_work)
                if self._engine.has_work:
                    events = self._engine.step()
                    self.steps += 1
                    self._deliver(events)
                    if self._on_step is not None:
                        self._on_step(EngineLoad.of(self._engine), sum(e.token is not None for e in events))
        except Exception as e:  # any failure of the engine ends it; say why and fail everyone
            log.exception("the engine thread died")
            self._die(f"the engine thread died: {type(e).__name__}: {e}")

    def _apply_commands(self, block: bool) -> None:
        """Apply every queued command; with `block`, wait a little for the first one."""
        try:
            command = self._inbox.get(timeout=self._idle_poll_s) if block else self._inbox.get_nowait()
            while True:
                if isinstance(command, _Submit):
                    self._accept(command)
                elif isinstance(command, _Cancel) and self._streams.pop(command.request_id, None) is not None:
                    self._engine.cancel(command.request_id)
                command = self._inbox.get_nowait()
        except queue.Empty:
            return

    def _accept(self, command: _Submit) -> None:
        try:
            request_id = self._engine.submit(command.request)
        except Exception as e:  # QueueFull, RequestRefused: the web side maps them to a status
            command.loop.call_soon_threadsafe(self._settle, command.accepted, None, e)
            return
        self._streams[request_id] = _Stream(command.loop, command.events)
        command.loop.call_soon_threadsafe(self._settle, command.accepted, request_id, None)

    def _deliver(self, events: list[TokenEvent]) -> None:
        for event in events:
            stream = self._streams.get(event.request_id)
            if stream is None:
                continue  # cancelled since
            if stream.info_pending:
                stream.info_pending = False
                stream.loop.call_soon_threadsafe(stream.events.put_nowait, self._engine.info(event.request_id))
            stream.loop.call_soon_threadsafe(stream.events.put_nowait, event)
            if event.finish_reason is not None:
                del self._streams[event.request_id]

    def _die(self, message: str) -> None:
        with self._lock:
            self.error = message
        for request_id, stream in self._streams.items():
            failure = TokenEvent(request_id, None, finish_reason="error", error=message)
            stream.loop.call_soon_threadsafe(stream.events.put_nowait, failure)
        self._streams.clear()
        while not self._inbox.empty():
            command = self._inbox.get_nowait()
            if isinstance(command, _Submit):
                command.loop.call_soon_threadsafe(self._settle, command.accepted, None, EngineDead(message))

    def _settle(self, future: asyncio.Future, request_id: int | None, error: Exception | None) -> None:
        """On the event loop: hand the submitter its id or error."""
        if future.cancelled():  # the client left while the request was being queued
            if request_id is not None:
                self.cancel(request_id)
        elif error is not None:
            future.set_exception(error)
        else:
            future.set_result(request_id)
