"""Server-sent events exactly as OpenAI's clients parse them.

Chat: a first chunk with the assistant role, content deltas (or, for a tool
call, `tool_calls` deltas: the first with the call's id, type and name, then
argument text), a last chunk with the finish reason (and an empty delta), with `stream_options.include_usage` one
more chunk with no choices and the usage, then `data: [DONE]`.  Completions: text
deltas in `text_completion` chunks, the same ending.  An engine failure after the
headers went out is an `error` event (the client raises it), and the stream ends.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from pydantic import BaseModel

from mlx_llama.server.completion import AnswerAssembler, GenerationFailed, Piece, answer_pieces
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


async def _events(job: Job, assembler: AnswerAssembler, spec: StreamSpec,
                  chunks: Callable[[Piece], list[BaseModel]], usage_chunk: Callable[[Usage], BaseModel],
                  opening: BaseModel | None) -> AsyncIterator[str]:
    if opening is not None:
        yield sse(opening)
    try:
        async for piece in answer_pieces(job, assembler, spec.on_first_event):
            if piece.text or piece.finish_reason or piece.token_ids or (spec.logprobs and piece.logprobs):
                for chunk in chunks(piece):
                    yield sse(chunk)
    except GenerationFailed as e:
        yield sse(error_body(500, str(e), code="engine_error"))
        return
    if spec.include_usage:
        yield sse(usage_chunk(assembler.usage(job, spec.prompt_tokens)))
    yield DONE


def chat_events(job: Job, assembler: AnswerAssembler, spec: StreamSpec) -> AsyncIterator[str]:
    reader = ToolCallReader() if spec.calls_tools else None
    logprobs: list[TokenLogprob] = []  # of tokens not sent yet (a tool call's name is sent once whole)

    def chunk(delta: ChatDelta, finish_reason: str | None = None) -> ChatCompletionChunk:
        sent = ChatLogprobs(content=logprobs.copy()) if spec.logprobs else None
        logprobs.clear()
        return ChatCompletionChunk(id=spec.id, created=spec.created, model=spec.model,
                                   choices=[ChatChunkChoice(delta=delta, logprobs=sent,
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

    def usage_chunk(usage: Usage) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=spec.id, created=spec.created, model=spec.model, choices=[], usage=usage)

    opening = ChatCompletionChunk(id=spec.id, created=spec.created, model=spec.model,
                                  choices=[ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))])
    return _events(job, assembler, spec, chunks, usage_chunk, opening)


def completion_events(job: Job, assembler: AnswerAssembler, spec: StreamSpec) -> AsyncIterator[str]:
    text_offset = 0

    def chunks(piece: Piece) -> list[BaseModel]:
        nonlocal text_offset
        logprobs = CompletionLogprobs.of(piece.logprobs, text_offset) if spec.logprobs else None
        text_offset += len(piece.text)
        choice = CompletionChoice(text=piece.text, logprobs=logprobs, finish_reason=piece.finish_reason,
                                  token_ids=piece.token_ids or None)
        return [Completion(id=spec.id, created=spec.created, model=spec.model, choices=[choice])]

    def usage_chunk(usage: Usage) -> Completion:
        return Completion(id=spec.id, created=spec.created, model=spec.model, choices=[], usage=usage)

    return _events(job, assembler, spec, chunks, usage_chunk, None)
