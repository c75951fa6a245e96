"""A job's token events → the pieces of its answer: text deltas, logprobs, finish reason, usage.

Text goes through `generation.text.TextAssembler` (streaming detokenizer and
stop-string filter), so a stop string split across tokens is still caught and
never sent; the job is then cancelled at once.  Stop tokens end the answer
without text.  A model without a tokenizer answers with token ids instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Sequence

from mlx_llama.generation.requests import TokenEvent
from mlx_llama.generation.text import TextAssembler
from mlx_llama.server.prompts import ServedModel
from mlx_llama.server.schemas import TopLogprob, TokenLogprob
from mlx_llama.server.worker import Job


class GenerationFailed(Exception):
    """The engine ended the request with an error (it died, or refused it mid-way)."""


@dataclass
class Piece:
    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


class AnswerAssembler:
    def __init__(self, served: ServedModel, stop_strings: Sequence[str]) -> None:
        self._tokenizer = served.tokenizer
        self._text = TextAssembler(self._tokenizer, stop_strings) if self._tokenizer is not None else None
        self.completion_tokens = 0

    def _token_text(self, token: int) -> str:
        if self._tokenizer is None:
            return f"token_id:{token}"  # as vLLM names ids it cannot spell
        return self._tokenizer.decode([token], skip_special=False)

    def _logprobs(self, event: TokenEvent) -> list[TokenLogprob]:
        if event.logprob is None or event.token is None:
            return []
        tops = [TopLogprob(token=(s := self._token_text(t)), logprob=lp, bytes=list(s.encode()))
                for t, lp in event.top_logprobs or []]
        text = self._token_text(event.token)
        return [TokenLogprob(token=text, logprob=event.logprob, bytes=list(text.encode()), top_logprobs=tops)]

    def add(self, event: TokenEvent) -> Piece:
        """The piece this event adds; `finish_reason` is set when the answer is complete."""
        if event.finish_reason == "error":
            raise GenerationFailed(event.error or "the engine failed this request")
        piece = Piece("")
        token = event.token
        if token is not None:
            self.completion_tokens += 1
            piece.logprobs = self._logprobs(event)
            if self._text is None:
                piece.token_ids = [token]
            else:
                piece.text = self._text.add(token)
        if self._text is not None and self._text.done:  # a stop string or a stop token
            piece.finish_reason = "stop"
        elif event.finish_reason is not None:
            if self._text is not None:
                piece.text += self._text.finish()
            piece.finish_reason = "length" if event.finish_reason == "length" else "stop"
        return piece


async def answer_pieces(job: Job, assembler: AnswerAssembler,
                        on_first: Callable[[Job], None]) -> AsyncIterator[Piece]:
    """The job's pieces up to the one that finishes it; leaving early (a client gone) cancels the job.

    `on_first(job)` runs when the first event arrives (the job's info is known then).
    """
    first = True
    try:
        async for event in job:
            if first:
                first = False
                on_first(job)
            piece = assembler.add(event)
            yield piece
            if piece.finish_reason is not None:
                return
    finally:
        job.cancel()
