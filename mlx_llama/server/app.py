"""The ASGI app: routes, error handlers, auth, CORS and request counting around one engine worker."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import AsyncIterator, Sequence

from fastapi import FastAPI

from mlx_llama.server.errors import install_handlers
from mlx_llama.server.metrics import CountRequests, ServerMetrics
from mlx_llama.server.prompts import ServedModel
from mlx_llama.server.routes import ServerContext, build_router
from mlx_llama.server.security import add_cors, bearer_auth
from mlx_llama.server.worker import EngineWorker

log = logging.getLogger("mlx_llama.server")


def create_app(served: ServedModel, worker: EngineWorker, metrics: ServerMetrics, *,
               api_key: str | None = None, cors_origins: Sequence[str] = ()) -> FastAPI:
    """The worker starts with the app and stops after uvicorn has drained the open requests."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            worker.stop()
            log.info("open requests drained; engine stopped after %d steps", worker.steps)

    app = FastAPI(title="mlx-llama", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.context = ServerContext(served, worker, metrics)
    install_handlers(app)
    app.include_router(build_router(bearer_auth(api_key)))
    add_cors(app, cors_origins)
    app.add_middleware(CountRequests, metrics=metrics)
    return app
