"""Server-sent events exactly as OpenAI's clients parse them.

Chat: a first chunk with the assistant role (one per choice, with n > 1), content deltas (or, for a tool
call, `tool_calls` deltas: the first with the call's id, type and name, then
argument text), a last chunk with the finish reason (and an empty delta), with `stream_options.include_usage` one
more chunk with no choices and the usage, then `data: [DONE]`.  Completions: text
deltas in `text_completion` chunks, the same ending.  With n > 1 the choices'
chunks interleave as their tokens come, each naming its choice in `choices[0].index`.  An engine failure after the
headers went out is an `error` event (the client raises it), and the stream ends.
"""

from __future__ import annotations

import json
from contextlib import aclosing
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from pydantic import BaseModel

from mlx_llama.server.choices import Submitted, merged_pieces
from mlx_llama.server.completion import GenerationFailed, Piece
from mlx_llama.server.errors import error_body
from mlx_llama.server.schemas import (
    ChatChunkChoice, ChatCompletionChunk, ChatDelta, ChatLogprobs, Completion, CompletionChoice,
    CompletionLogprobs, TokenLogprob, Usage,
)
from mlx_llama.server.tools import ToolCallReader
from mlx_llama.server.worker import Job

DONE = "data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the stream


def sse(payload: BaseModel | dict) -> str:
    text = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {text}\n\n"


@dataclass(frozen=True)
class StreamSpec:
    id: str
    created: int
    model: str
    prompt_tokens: int
    include_usage: bool
    logprobs: bool
    calls_tools: bool  # a chat answer that may be a tool call (server.tools)
    on_first_event: Callable[[Job], None]  # metrics: time to first token, cached tokens


async def _events(submitted: Submitted, spec: StreamSpec, chunkers: list[Callable[[Piece], list[BaseModel]]],
                  usage_chunk: Callable[[Usage], BaseModel], openings: list[BaseModel]) -> AsyncIterator[str]:
    for opening in openings:
        yield sse(opening)
    try:
        # aclosing: a client that hangs up closes this generator, and with it the jobs, at once.
        async with aclosing(merged_pieces(submitted.choices, spec.on_first_event)) as pieces:
            async for index, piece in pieces:
                if piece.text or piece.finish_reason or piece.token_ids or (spec.logprobs and piece.logprobs):
                    for chunk in chunkers[index](piece):
                        yield sse(chunk)
    except GenerationFailed as e:
        yield sse(error_body(500, str(e), code="engine_error"))
        return
    if spec.include_usage:
        yield sse(usage_chunk(submitted.usage(spec.prompt_tokens)))
    yield DONE


def _chat_chunker(spec: StreamSpec, index: int) -> Callable[[Piece], list[BaseModel]]:
    """Choice `index`'s pieces → chat chunks (each choice has its own tool-call reader and logprobs)."""
    reader = ToolCallReader() if spec.calls_tools else None
    logprobs: list[TokenLogprob] = []  # of tokens not sent yet (a tool call's name is sent once whole)

    def chunk(delta: ChatDelta, finish_reason: str | None = None) -> ChatCompletionChunk:
        sent = ChatLogprobs(content=logprobs.copy()) if spec.logprobs else None
        logprobs.clear()
        return ChatCompletionChunk(id=spec.id, created=spec.created, model=spec.model,
                                   choices=[ChatChunkChoice(index=index, delta=delta, logprobs=sent,
                                                            finish_reason=finish_reason)])

    def chunks(piece: Piece) -> list[BaseModel]:
        logprobs.extend(piece.logprobs)
        if reader is None:
            delta = ChatDelta() if piece.finish_reason and not piece.text else ChatDelta(content=piece.text)
            return [chunk(delta, piece.finish_reason)]
        parts, finish_reason = [reader.add(piece.text)], None
        if piece.finish_reason is not None:
            rest, finish_reason = reader.finish(piece.finish_reason)
            parts.append(rest)
        out: list[BaseModel] = []
        for part in parts:
            if part.content:
                out.append(chunk(ChatDelta(content=part.content)))
            if part.call is not None:
                out.append(chunk(ChatDelta(tool_calls=[part.call])))
        if finish_reason is not None:
            out.append(chunk(ChatDelta(), finish_reason))
        return out

    return chunks


def chat_events(submitted: Submitted, spec: StreamSpec) -> AsyncIterator[str]:
    def usage_chunk(usage: Usage) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=spec.id, created=spec.created, model=spec.model, choices=[], usage=usage)

    n = len(submitted.choices)
    openings: list[BaseModel] = [
        ChatCompletionChunk(id=spec.id, created=spec.created, model=spec.model,
                            choices=[ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
        for i in range(n)]
    return _events(submitted, spec, [_chat_chunker(spec, i) for i in range(n)], usage_chunk, openings)


def _completion_chunker(spec: StreamSpec, index: int) -> Callable[[Piece], list[BaseModel]]:
    text_offset = 0

    def chunks(piece: Piece) -> list[BaseModel]:
        nonlocal text_offset
        logprobs = CompletionLogprobs.of(piece.logprobs, text_offset) if spec.logprobs else None
        text_offset += len(piece.text)
        choice = CompletionChoice(index=index, text=piece.text, logprobs=logprobs,
                                  finish_reason=piece.finish_reason, token_ids=piece.token_ids or None)
        return [Completion(id=spec.id, created=spec.created, model=spec.model, choices=[choice])]

    return chunks


def completion_events(submitted: Submitted, spec: StreamSpec) -> AsyncIterator[str]:
    def usage_chunk(usage: Usage) -> Completion:
        return Completion(id=spec.id, created=spec.created, model=spec.model, choices=[], usage=usage)

    chunkers = [_completion_chunker(spec, i) for i in range(len(submitted.choices))]
    return _events(submitted, spec, chunkers, usage_chunk, [])
