"""Prometheus metrics: requests by endpoint and status, tokens, prefix-cache hits, and the
engine's queue depth, batch size and KV use (set by the engine thread after every step)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlx_llama.generation.requests import RequestInfo
from mlx_llama.server.engine_api import EngineLoad


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mlx_llama_http_requests", "HTTP requests answered", ["path", "status"], registry=r)
        self.prompt_tokens = Counter("mlx_llama_prompt_tokens", "Prompt tokens of submitted requests", registry=r)
        self.cached_tokens = Counter("mlx_llama_prompt_cached_tokens",
                                     "Prompt tokens whose KV came from the prefix cache", registry=r)
        self.cache_hits = Counter("mlx_llama_prefix_cache_hits", "Requests that reused cached KV", registry=r)
        self.generated_tokens = Counter("mlx_llama_generated_tokens", "Tokens generated", registry=r)
        self.time_to_first_token = Histogram("mlx_llama_time_to_first_token_seconds",
                                             "From submission to the first token", registry=r,
                                             buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))
        self.queue_depth = Gauge("mlx_llama_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.batch_size = Gauge("mlx_llama_batch_size", "Sequences decoding in the current batch", registry=r)
        self.kv_bytes = Gauge("mlx_llama_kv_cache_bytes", "KV cache bytes held", registry=r)
        self.engine_steps = Counter("mlx_llama_engine_steps", "Engine forward passes", registry=r)

    def on_step(self, load: EngineLoad, events: int) -> None:
        """Called on the engine thread after each step (prometheus_client is thread-safe)."""
        self.engine_steps.inc()
        self.generated_tokens.inc(events)
        self.queue_depth.set(load.waiting)
        self.batch_size.set(load.running)
        self.kv_bytes.set(load.kv_bytes)

    def on_first_token(self, info: RequestInfo, seconds: float) -> None:
        self.prompt_tokens.inc(info.prompt_tokens)
        self.cached_tokens.inc(info.cached_tokens)
        if info.cached_tokens:
            self.cache_hits.inc()
        self.time_to_first_token.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class CountRequests:
    """ASGI middleware: counts every HTTP response by path and status, errors included."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(scope["path"], str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
