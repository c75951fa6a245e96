"""What the server needs from an engine: the `BatchEngine` Protocol and the errors it may raise.

The server calls every method from its one engine thread (`worker.EngineWorker`),
so an engine needs no locking of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from mlx_llama.generation.requests import GenerationRequest, RequestInfo, TokenEvent


class EngineFull(Exception):
    """No room for another request now; the client should retry later (HTTP 429)."""


class RequestRejected(Exception):
    """The request can never run on this engine (too long for the KV cache, say): HTTP 400."""


@dataclass(frozen=True)
class EngineLoad:
    """A snapshot for /metrics."""

    waiting: int  # submitted, not yet decoding
    running: int  # decoding in the current batch
    kv_bytes: int  # KV cache bytes held by running sequences and the prefix cache
    kv_budget_bytes: int | None = None  # the most it may hold, when bounded


class BatchEngine(Protocol):
    def submit(self, request: GenerationRequest) -> int:
        """Queue a request; returns its id.  Raises EngineFull or RequestRejected."""

    def step(self) -> list[TokenEvent]:
        """One forward pass over the running sequences: at most one event per request."""

    def cancel(self, request_id: int) -> None:
        """Forget a request (queued or running); its slot is free for the next step."""

    def has_work(self) -> bool:
        """Whether `step` would do anything."""

    def info(self, request_id: int) -> RequestInfo:
        """Prompt and prefix-cache figures of a request that has produced its first event."""

    def load(self) -> EngineLoad: ...
