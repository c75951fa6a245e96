"""A `BatchEngine` that runs one request at a time (FIFO) on the single-sequence loop.

It serves models the batched engine cannot take yet and is the reference the
server's tests compare against: a request's tokens are exactly what
`mlx-llama generate` prints for it.  It has no prefix cache (cached_tokens is
always 0) and reports no logprobs, so it rejects requests that ask for them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Iterator

from mlx_llama.generation.loop import generate_tokens
from mlx_llama.generation.requests import GenerationRequest, RequestInfo, TokenEvent
from mlx_llama.generation.sampler import Sampler
from mlx_llama.interfaces import KVCache, LanguageModel
from mlx_llama.server.engine_api import EngineFull, EngineLoad, RequestRejected


@dataclass
class _Running:
    request_id: int
    request: GenerationRequest
    cache: list[KVCache]
    tokens: Iterator[int]
    produced: int = 0


class SerialEngine:
    def __init__(self, model: LanguageModel, *, max_waiting: int = 64, max_kv_size: int | None = None,
                 keep: int = 4, prefill_step_size: int = 512) -> None:
        self._model = model
        self._max_waiting = max_waiting
        self._max_kv_size, self._keep, self._prefill_step_size = max_kv_size, keep, prefill_step_size
        self._waiting: deque[tuple[int, GenerationRequest]] = deque()
        self._running: _Running | None = None
        self._info: dict[int, RequestInfo] = {}  # the running request's, and the last finished one's
        self._next_id = 0

    def submit(self, request: GenerationRequest) -> int:
        if request.top_logprobs is not None:
            raise RequestRejected("logprobs need the batched engine; this server runs the serial one")
        if request.constraint is not None:
            raise RequestRejected("constrained decoding needs the batched engine")
        if len(self._waiting) >= self._max_waiting:
            raise EngineFull(f"{len(self._waiting)} requests are already waiting")
        request_id, self._next_id = self._next_id, self._next_id + 1
        self._waiting.append((request_id, request))
        return request_id

    def _start_next(self) -> _Running:
        request_id, request = self._waiting.popleft()
        cache = self._model.make_cache(self._max_kv_size, self._keep)
        tokens = generate_tokens(self._model, request.prompt_ids, max_tokens=request.max_tokens,
                                 sampler=Sampler(request.sampling), stop_ids=request.stop_ids,
                                 cache=cache, prefill_step_size=self._prefill_step_size)
        self._info = {request_id: RequestInfo(request_id, prompt_tokens=len(request.prompt_ids))}
        return _Running(request_id, request, cache, tokens)

    def step(self) -> list[TokenEvent]:
        if self._running is None:
            if not self._waiting:
                return []
            self._running = self._start_next()
        run = self._running
        token = next(run.tokens)
        run.produced += 1
        finish = "stop" if token in run.request.stop_ids else "length" if run.produced >= run.request.max_tokens else None
        if finish is not None:
            self._finish()
        return [TokenEvent(run.request_id, token, finish_reason=finish)]

    def _finish(self) -> None:
        assert self._running is not None
        self._running.tokens.close()  # type: ignore[attr-defined]
        self._running = None

    def cancel(self, request_id: int) -> None:
        if self._running is not None and self._running.request_id == request_id:
            self._finish()
        self._waiting = deque(item for item in self._waiting if item[0] != request_id)

    def has_work(self) -> bool:
        return self._running is not None or bool(self._waiting)

    def info(self, request_id: int) -> RequestInfo:
        return self._info[request_id]

    def load(self) -> EngineLoad:
        kv = sum(c.nbytes for c in self._running.cache) if self._running is not None else 0
        return EngineLoad(waiting=len(self._waiting), running=int(self._running is not None), kv_bytes=kv)
