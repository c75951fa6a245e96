"""The endpoints: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, TypeVar

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

from mlx_llama.generation.requests import GenerationRequest
from mlx_llama.server.completion import AnswerAssembler, GenerationFailed, Piece, answer_pieces
from mlx_llama.generation.engine import QueueFull, RequestRefused
from mlx_llama.server.errors import ApiError, validation_error
from mlx_llama.server.metrics import ServerMetrics
from mlx_llama.server.prompts import (
    ServedModel, chat_prompt_ids, check_request, completion_prompt_ids, generation_request,
)
from mlx_llama.server.schemas import (
    AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionRequest, ChatLogprobs, Completion,
    CompletionChoice, CompletionLogprobs, CompletionRequest, ModelCard, ModelList,
)
from mlx_llama.server.streaming import HEADERS, StreamSpec, chat_events, completion_events
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


async def _submit(context: ServerContext, generation: GenerationRequest) -> tuple[Job, float]:
    try:
        return await context.worker.submit(generation), time.perf_counter()
    except QueueFull as e:
        raise ApiError(429, f"the server is busy: {e}", code="server_busy",
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except RequestRefused as e:
        raise ApiError(400, str(e), code="request_rejected") from None
    except EngineDead as e:
        raise ApiError(500, str(e), code="engine_dead") from None


class _ClientGone(Exception):
    pass


async def _collect(request: Request, job: Job, assembler: AnswerAssembler, spec: StreamSpec) -> list[Piece]:
    """Every piece of a non-streamed answer; a client that hangs up meanwhile cancels the job."""

    async def pieces() -> list[Piece]:
        return [piece async for piece in answer_pieces(job, assembler, spec.on_first_event)]

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
    collecting.cancel()  # answer_pieces cancels the job on its way out
    raise _ClientGone


def _first_event_hook(context: ServerContext, submitted: float) -> Callable[[Job], None]:
    def record(job: Job) -> None:
        if job.info is not None:
            context.metrics.on_first_token(job.info, time.perf_counter() - submitted)
    return record


def _spec(context: ServerContext, prefix: str, generation: GenerationRequest, stream_usage: bool,
          logprobs: bool, submitted: float) -> StreamSpec:
    return StreamSpec(id=f"{prefix}-{uuid.uuid4().hex}", created=int(time.time()), model=context.served.name,
                      prompt_tokens=len(generation.prompt_ids), include_usage=stream_usage, logprobs=logprobs,
                      on_first_event=_first_event_hook(context, submitted))


def _stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers=HEADERS)


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
        context = _context(request)
        body = await _parse(request, ChatCompletionRequest)
        check_request(body, context.served)
        generation = generation_request(body, chat_prompt_ids(body, context.served), context.served)
        job, submitted = await _submit(context, generation)
        assembler = AnswerAssembler(context.served, body.stop_strings())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        spec = _spec(context, "chatcmpl", generation, include_usage, body.logprobs, submitted)
        if body.stream:
            return _stream(chat_events(job, assembler, spec))
        try:
            pieces = await _collect(request, job, assembler, spec)
        except _ClientGone:
            return Response(status_code=499)
        logprobs = ChatLogprobs(content=[lp for p in pieces for lp in p.logprobs]) if body.logprobs else None
        choice = ChatChoice(message=AssistantMessage(content="".join(p.text for p in pieces)), logprobs=logprobs,
                            finish_reason=pieces[-1].finish_reason)
        return JSONResponse(ChatCompletion(id=spec.id, created=spec.created, model=spec.model, choices=[choice],
                                           usage=assembler.usage(job, spec.prompt_tokens)).model_dump())

    @router.post("/v1/completions", dependencies=guarded)
    async def completions(request: Request) -> Response:
        context = _context(request)
        body = await _parse(request, CompletionRequest)
        check_request(body, context.served)
        generation = generation_request(body, completion_prompt_ids(body, context.served), context.served)
        job, submitted = await _submit(context, generation)
        assembler = AnswerAssembler(context.served, body.stop_strings())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        spec = _spec(context, "cmpl", generation, include_usage, body.logprobs is not None, submitted)
        if body.stream:
            return _stream(completion_events(job, assembler, spec))
        try:
            pieces = await _collect(request, job, assembler, spec)
        except _ClientGone:
            return Response(status_code=499)
        logprobs = None
        if body.logprobs is not None:
            logprobs = CompletionLogprobs.of([lp for p in pieces for lp in p.logprobs], 0)
        token_ids = [t for p in pieces for t in p.token_ids]
        choice = CompletionChoice(text="".join(p.text for p in pieces), logprobs=logprobs,
                                  finish_reason=pieces[-1].finish_reason, token_ids=token_ids or None)
        return JSONResponse(Completion(id=spec.id, created=spec.created, model=spec.model, choices=[choice],
                                       usage=assembler.usage(job, spec.prompt_tokens)).model_dump())

    return router
