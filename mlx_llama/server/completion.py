"""A job's token events → the pieces of its answer: text deltas, logprobs, finish reason, usage.

Text goes through the streaming detokenizer and the stop-string filter of
`generation.text`, so a stop string split across tokens is still caught and
never sent; the job is then cancelled at once.  Stop tokens end the answer
without text.  A model without a tokenizer answers with token ids instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Sequence

from mlx_llama.generation.requests import TokenEvent
from mlx_llama.generation.text import StopStringFilter
from mlx_llama.server.prompts import ServedModel
from mlx_llama.server.schemas import PromptTokensDetails, TopLogprob, TokenLogprob, Usage
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
        self._served = served
        self._tokenizer = served.tokenizer
        self._detok = self._tokenizer.detokenizer() if self._tokenizer is not None else None
        self._stops = StopStringFilter(stop_strings)
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
            if self._detok is None:
                piece.token_ids = [token]
            elif token not in self._served.stop_ids:
                piece.text = self._stops.feed(self._detok.add(token))
        if self._stops.stopped:
            piece.finish_reason = "stop"
        elif event.finish_reason is not None:
            if self._detok is not None:
                piece.text += self._stops.feed(self._detok.flush())
                piece.text += "" if self._stops.stopped else self._stops.flush()
            piece.finish_reason = "stop" if self._stops.stopped or event.finish_reason == "stop" else "length"
        return piece

    def usage(self, job: Job, prompt_tokens: int) -> Usage:
        cached = job.info.cached_tokens if job.info is not None else 0
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=self.completion_tokens,
                     total_tokens=prompt_tokens + self.completion_tokens,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


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
