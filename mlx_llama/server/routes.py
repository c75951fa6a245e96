"""The endpoints: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

from mlx_llama.generation.requests import GenerationRequest
from mlx_llama.server.choices import Submitted, merged_pieces, submit_choices
from mlx_llama.server.completion import AnswerAssembler, GenerationFailed, Piece
from mlx_llama.generation.engine import QueueFull, RequestRefused
from mlx_llama.server.errors import ApiError, validation_error
from mlx_llama.server.metrics import ServerMetrics
from mlx_llama.server.prompts import (
    ServedModel, chat_prompt_ids, check_request, completion_prompt_ids, generation_request,
)
from mlx_llama.server.schemas import (
    AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionRequest, ChatLogprobs, Completion,
    CompletionChoice, CompletionLogprobs, CompletionRequest, ModelCard, ModelList, Usage,
)
from mlx_llama.server.streaming import HEADERS, StreamSpec, chat_events, completion_events
from mlx_llama.server.tools import answer_message, may_call
from mlx_llama.server.worker import EngineDead, EngineWorker, Job

Body = TypeVar("Body", bound=BaseModel)
RETRY_AFTER_S = 1


@dataclass(frozen=True)
class ServerContext:
    served: ServedModel
    worker: EngineWorker
    metrics: ServerMetrics


def _context(request: Request) -> ServerContext:
    return request.app.state.context


async def _parse(request: Request, schema: type[Body]) -> Body:
    try:
        return schema.model_validate_json(await request.body())
    except ValidationError as e:
        raise validation_error(e) from None


async def _submit(context: ServerContext, generations: list[GenerationRequest], assemblers: list[AnswerAssembler],
                  on_first: Callable[[Job], None]) -> Submitted:
    try:
        return await submit_choices(context.worker.submit, generations, assemblers, context.served.shared_prefix,
                                    on_first)
    except QueueFull as e:
        raise ApiError(429, f"the server is busy: {e}", code="server_busy",
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except RequestRefused as e:
        raise ApiError(400, str(e), code="request_rejected") from None
    except EngineDead as e:
        raise ApiError(500, str(e), code="engine_dead") from None
    except GenerationFailed as e:
        raise ApiError(500, str(e), code="engine_error") from None


class _ClientGone(Exception):
    pass


async def _collect(request: Request, submitted: Submitted, spec: StreamSpec) -> list[list[Piece]]:
    """Every choice's pieces of a non-streamed answer; a client that hangs up meanwhile cancels the jobs."""

    async def pieces() -> list[list[Piece]]:
        by_choice: list[list[Piece]] = [[] for _ in submitted.choices]
        async for index, piece in merged_pieces(submitted.choices, spec.on_first_event):
            by_choice[index].append(piece)
        return by_choice

    collecting = asyncio.ensure_future(pieces())
    # With the body read, the next ASGI message is "http.disconnect", once the client leaves.
    hung_up = asyncio.ensure_future(request.receive())
    done, _ = await asyncio.wait({collecting, hung_up}, return_when=asyncio.FIRST_COMPLETED)
    if collecting in done:
        hung_up.cancel()
        try:
            return collecting.result()
        except GenerationFailed as e:
            raise ApiError(500, str(e), code="engine_error") from None
    collecting.cancel()  # merged_pieces cancels the jobs on its way out
    raise _ClientGone


def _first_event_hook(context: ServerContext, submitted: float) -> Callable[[Job], None]:
    def record(job: Job) -> None:
        if job.info is not None:
            context.metrics.on_first_token(job.info, time.perf_counter() - submitted)
    return record


def _spec(context: ServerContext, prefix: str, prompt_tokens: int, stream_usage: bool,
          logprobs: bool, calls_tools: bool, on_first: Callable[[Job], None]) -> StreamSpec:
    return StreamSpec(id=f"{prefix}-{uuid.uuid4().hex}", created=int(time.time()), model=context.served.name,
                      prompt_tokens=prompt_tokens, include_usage=stream_usage, logprobs=logprobs,
                      calls_tools=calls_tools, on_first_event=on_first)


def _stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers=HEADERS)


def _chat_choice(spec: StreamSpec, index: int, pieces: list[Piece]) -> ChatChoice:
    logprobs = ChatLogprobs(content=[lp for p in pieces for lp in p.logprobs]) if spec.logprobs else None
    finish_reason = pieces[-1].finish_reason
    if spec.calls_tools:
        message, finish_reason = answer_message((p.text for p in pieces), finish_reason)
    else:
        message = AssistantMessage(content="".join(p.text for p in pieces))
    return ChatChoice(index=index, message=message, logprobs=logprobs, finish_reason=finish_reason)


def _chat_response(spec: StreamSpec, choices: list[list[Piece]], usage: Usage) -> BaseModel:
    return ChatCompletion(id=spec.id, created=spec.created, model=spec.model, usage=usage,
                          choices=[_chat_choice(spec, i, pieces) for i, pieces in enumerate(choices)])


def _completion_choice(spec: StreamSpec, index: int, pieces: list[Piece]) -> CompletionChoice:
    logprobs = CompletionLogprobs.of([lp for p in pieces for lp in p.logprobs], 0) if spec.logprobs else None
    token_ids = [t for p in pieces for t in p.token_ids]
    return CompletionChoice(index=index, text="".join(p.text for p in pieces), logprobs=logprobs,
                            finish_reason=pieces[-1].finish_reason, token_ids=token_ids or None)


def _completion_response(spec: StreamSpec, choices: list[list[Piece]], usage: Usage) -> BaseModel:
    return Completion(id=spec.id, created=spec.created, model=spec.model, usage=usage,
                      choices=[_completion_choice(spec, i, pieces) for i, pieces in enumerate(choices)])


@dataclass(frozen=True)
class _Endpoint:
    """What differs between chat and text completions."""

    schema: type[BaseModel]
    id_prefix: str
    prompt_ids: Callable[[Any, ServedModel], list[int]]
    wants_logprobs: Callable[[Any], bool]
    calls_tools: Callable[[Any], bool]
    events: Callable[[Submitted, StreamSpec], AsyncIterator[str]]
    response: Callable[[StreamSpec, list[list[Piece]], Usage], BaseModel]


_CHAT = _Endpoint(ChatCompletionRequest, "chatcmpl", chat_prompt_ids, lambda body: body.logprobs, may_call,
                  chat_events, _chat_response)
_COMPLETION = _Endpoint(CompletionRequest, "cmpl", completion_prompt_ids, lambda body: body.logprobs is not None,
                        lambda body: False, completion_events, _completion_response)


async def _answer(request: Request, endpoint: _Endpoint) -> Response:
    """Validate, submit the request's n choices, then stream the answer or collect it into one response."""
    context = _context(request)
    body: Any = await _parse(request, endpoint.schema)
    check_request(body, context.served)
    prompt_ids = endpoint.prompt_ids(body, context.served)
    generations = [generation_request(body, prompt_ids, context.served, choice=i) for i in range(body.n)]
    assemblers = [AnswerAssembler(context.served, body.stop_strings()) for _ in generations]
    on_first = _first_event_hook(context, time.perf_counter())
    submitted = await _submit(context, generations, assemblers, on_first)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    spec = _spec(context, endpoint.id_prefix, len(prompt_ids), include_usage, endpoint.wants_logprobs(body),
                 endpoint.calls_tools(body), on_first)
    if body.stream:
        return _stream(endpoint.events(submitted, spec))
    try:
        choices = await _collect(request, submitted, spec)
    except _ClientGone:
        return Response(status_code=499)  # nobody reads it; the status is for /metrics
    return JSONResponse(endpoint.response(spec, choices, submitted.usage(spec.prompt_tokens)).model_dump())


def build_router(auth: Callable[[Request], Awaitable[None]]) -> APIRouter:
    router = APIRouter()
    guarded = [Depends(auth)]

    @router.get("/health")
    async def health(request: Request) -> JSONResponse:
        worker = _context(request).worker
        if worker.alive:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "error", "error": worker.error or "the engine thread is not running"},
                            status_code=503)

    @router.get("/metrics", dependencies=guarded)
    async def metrics(request: Request) -> Response:
        return Response(_context(request).metrics.render(), media_type="text/plain; version=0.0.4")

    @router.get("/v1/models", dependencies=guarded)
    async def models(request: Request) -> ModelList:
        served = _context(request).served
        return ModelList(data=[ModelCard(id=served.name, created=served.created)])

    @router.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(request: Request) -> Response:
        return await _answer(request, _CHAT)

    @router.post("/v1/completions", dependencies=guarded)
    async def completions(request: Request) -> Response:
        return await _answer(request, _COMPLETION)

    return router
