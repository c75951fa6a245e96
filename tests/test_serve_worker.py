"""The server's engine thread against a scripted engine (no model): a dying engine fails every
waiting request at once and /health says so; a full engine queue is a 429 with Retry-After."""

from __future__ import annotations

import threading
import time
from typing import Iterator

import pytest
from fastapi.testclient import TestClient

from mlx_llama.generation.engine import QueueFull
from mlx_llama.generation.requests import GenerationRequest, RequestInfo, TokenEvent
from mlx_llama.server.app import create_app
from mlx_llama.server.metrics import ServerMetrics
from mlx_llama.server.prompts import ServedModel
from mlx_llama.server.worker import EngineWorker


class ScriptedEngine:
    """Every running request gets token 7 each step up to its max_tokens; `step` raises once `fail` is set."""

    def __init__(self) -> None:
        self.requests: dict[int, GenerationRequest] = {}
        self.produced: dict[int, int] = {}
        self.fail = threading.Event()
        self.full = False
        self.capacity: int | None = None  # requests it holds before its queue is full
        self.reserved_bytes = 0

    def submit(self, request: GenerationRequest) -> int:
        if self.full or (self.capacity is not None and len(self.requests) >= self.capacity):
            raise QueueFull("the engine's queue is full (0 requests waiting); retry later")
        request_id = len(self.produced) + 1
        self.requests[request_id], self.produced[request_id] = request, 0
        return request_id

    def step(self) -> list[TokenEvent]:
        if self.fail.is_set():
            raise RuntimeError("simulated device failure")
        time.sleep(0.01)
        events = []
        for request_id, request in list(self.requests.items()):
            self.produced[request_id] += 1
            done = self.produced[request_id] >= request.max_tokens
            events.append(TokenEvent(request_id, 7, finish_reason="length" if done else None))
            if done:
                del self.requests[request_id]
        return events

    def cancel(self, request_id: int) -> bool:
        return self.requests.pop(request_id, None) is not None

    def info(self, request_id: int) -> RequestInfo:
        return RequestInfo(request_id, len(self.requests[request_id].prompt_ids))

    @property
    def has_work(self) -> bool:
        return bool(self.requests)

    @property
    def waiting(self) -> int:
        return 0

    @property
    def running(self) -> int:
        return len(self.requests)


SERVED = ServedModel(name="scripted", tokenizer=None, context_length=4096, default_max_tokens=16, vocab_size=256,
                     eos_ids=frozenset({2}), created=0)
BODY = {"prompt": [1, 5, 9], "max_tokens": 4000}


@pytest.fixture
def engine_and_client() -> Iterator[tuple[ScriptedEngine, TestClient]]:
    engine = ScriptedEngine()
    app = create_app(SERVED, EngineWorker(engine, idle_poll_s=0.01), ServerMetrics())
    with TestClient(app) as client:
        yield engine, client


def test_token_id_completion_without_tokenizer(engine_and_client: tuple[ScriptedEngine, TestClient]) -> None:
    _, client = engine_and_client
    r = client.post("/v1/completions", json={"prompt": [1, 5, 9], "max_tokens": 3})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == "" and choice["token_ids"] == [7, 7, 7] and choice["finish_reason"] == "length"
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_tokenizer"


def test_engine_death_fails_every_waiting_request_at_once(
        engine_and_client: tuple[ScriptedEngine, TestClient]) -> None:
    engine, client = engine_and_client
    statuses: list[int] = []

    def request() -> None:
        statuses.append(client.post("/v1/completions", json=BODY).status_code)

    threads = [threading.Thread(target=request) for _ in range(3)]
    for t in threads:
        t.start()
    for _ in range(500):
        if len(engine.requests) == 3:
            break
        time.sleep(0.01)
    assert len(engine.requests) == 3
    engine.fail.set()
    for t in threads:
        t.join(10)
    assert statuses == [500, 500, 500]
    health = client.get("/health")
    assert health.status_code == 503 and "simulated device failure" in health.json()["error"]
    started = time.monotonic()
    r = client.post("/v1/completions", json=BODY)
    assert r.status_code == 500 and r.json()["error"]["code"] == "engine_dead"
    assert time.monotonic() - started < 5


def test_engine_death_mid_stream_sends_an_error_event(
        engine_and_client: tuple[ScriptedEngine, TestClient]) -> None:
    engine, client = engine_and_client
    with client.stream("POST", "/v1/completions", json={**BODY, "stream": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: {")
        engine.fail.set()
        rest = [line for line in lines if line]
    assert '"error"' in rest[-1] and "data: [DONE]" not in rest


def test_full_queue_is_429_with_retry_after(engine_and_client: tuple[ScriptedEngine, TestClient]) -> None:
    engine, client = engine_and_client
    engine.full = True
    r = client.post("/v1/completions", json=BODY)
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["type"] == "rate_limit_error"
    engine.full = False
    assert client.post("/v1/completions", json={"prompt": [1], "max_tokens": 2}).status_code == 200


def test_a_refused_choice_cancels_the_choices_already_queued(
        engine_and_client: tuple[ScriptedEngine, TestClient]) -> None:
    engine, client = engine_and_client
    engine.capacity = 2
    r = client.post("/v1/completions", json={**BODY, "n": 3})
    assert r.status_code == 429
    for _ in range(200):  # the cancellations reach the engine at its thread's next turn
        if not engine.requests:
            break
        time.sleep(0.01)
    assert engine.requests == {}
    engine.capacity = None
    r = client.post("/v1/completions", json={"prompt": [1], "max_tokens": 2, "n": 2})
    assert [c["token_ids"] for c in r.json()["choices"]] == [[7, 7], [7, 7]]


def test_engine_death_mid_stream_of_n_choices_ends_with_one_error_event(
        engine_and_client: tuple[ScriptedEngine, TestClient]) -> None:
    engine, client = engine_and_client
    with client.stream("POST", "/v1/completions", json={**BODY, "stream": True, "n": 2}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: {")
        engine.fail.set()
        rest = [line for line in lines if line]
    assert '"error"' in rest[-1] and sum('"error"' in line for line in rest) == 1
    assert "data: [DONE]" not in rest
