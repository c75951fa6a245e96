"""Bearer-token authentication and CORS.

With an API key every endpoint but /health needs `Authorization: Bearer KEY`;
the key is compared in constant time so response timing leaks nothing of it.
"""

from __future__ import annotations

import hmac
from typing import Awaitable, Callable, Sequence

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware

from mlx_llama.server.errors import ApiError


def bearer_auth(api_key: str | None) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency that refuses a request without the key (a no-op without one)."""
    expected = api_key.encode() if api_key else None

    async def require_key(request: Request) -> None:
        if expected is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            raise ApiError(401, "a valid API key is required: send `Authorization: Bearer KEY`",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    return require_key


def add_cors(app: FastAPI, origins: Sequence[str]) -> None:
    """Let browser front-ends on these origins call the API (`*` for any)."""
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(origins), allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)
