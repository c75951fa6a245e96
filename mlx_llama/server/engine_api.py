"""What the server needs from an engine: the `BatchEngine` Protocol.

`mlx_llama.generation.engine.Engine` implements it; its `submit` raises
`QueueFull` (the server answers 429) or `RequestRefused` (400).  The server
calls every method from its one engine thread (`worker.EngineWorker`), so an
engine needs no locking of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from mlx_llama.generation.requests import GenerationRequest, RequestInfo, TokenEvent


class BatchEngine(Protocol):
    reserved_bytes: int  # KV bytes the running sequences hold

    def submit(self, request: GenerationRequest) -> int:
        """Queue a request; returns its id.  Raises QueueFull or RequestRefused."""

    def step(self) -> list[TokenEvent]:
        """One forward pass over the running sequences: at most one event per request."""

    def cancel(self, request_id: int) -> bool:
        """Stop a queued or running request; its slot and KV are free for the next step."""

    def info(self, request_id: int) -> RequestInfo:
        """Prompt and prefix-cache figures of a request (live or recently finished)."""

    @property
    def has_work(self) -> bool:
        """Whether `step` would do anything."""

    @property
    def waiting(self) -> int: ...

    @property
    def running(self) -> int: ...


@dataclass(frozen=True)
class EngineLoad:
    """A snapshot for /metrics, taken on the engine thread after a step."""

    waiting: int  # submitted, not yet decoding
    running: int  # decoding in the current batch
    kv_bytes: int  # KV cache bytes reserved by running sequences

    @classmethod
    def of(cls, engine: BatchEngine) -> "EngineLoad":
        return cls(engine.waiting, engine.running, engine.reserved_bytes)
