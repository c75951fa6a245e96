"""`n` choices of one request: their submission after one shared prefill, their merged pieces, their usage.

Each choice is its own engine request (its own sampler, seed and constraint), so
choice i is exactly what a request with that seed alone would get.  With n > 1
and the engine's prefix cache on, the prompt is prefilled once: a one-token
priming request reads it first, and its KV, left in the prefix cache when it
ends, is what the n choices start from.  The cache reuses prefixes in whole
prefill chunks (so a hit changes no logits bit), so each choice still reads the
prompt's last partial chunk itself.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Sequence

from mlx_llama.generation.requests import GenerationRequest
from mlx_llama.server.completion import AnswerAssembler, GenerationFailed, Piece, answer_pieces
from mlx_llama.server.schemas import PromptTokensDetails, Usage
from mlx_llama.server.worker import Job

Submit = Callable[[GenerationRequest], Awaitable[Job]]


@dataclass
class Choice:
    job: Job
    assembler: AnswerAssembler


@dataclass
class Submitted:
    choices: list[Choice]
    prompt_job: Job  # the job that read the prompt first: its info says how much came from the cache

    def usage(self, prompt_tokens: int) -> Usage:
        """The prompt counted once, the completion tokens of every choice summed."""
        completion = sum(c.assembler.completion_tokens for c in self.choices)
        info = self.prompt_job.info
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                     total_tokens=prompt_tokens + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=info.cached_tokens if info else 0))


async def _prime(submit: Submit, prompt_ids: Sequence[int], on_first: Callable[[Job], None]) -> Job:
    """Read the prompt once (one greedy token, discarded); its KV stays in the prefix cache."""
    job = await submit(GenerationRequest(prompt_ids=list(prompt_ids), max_tokens=1))
    async for event in job:
        on_first(job)  # its only event: the metrics count the prompt tokens it read
        if event.finish_reason == "error":
            raise GenerationFailed(event.error or "the engine failed this request")
    return job


async def submit_choices(submit: Submit, generations: Sequence[GenerationRequest],
                         assemblers: Sequence[AnswerAssembler], shared_prefix: int | None,
                         on_first: Callable[[Job], None]) -> Submitted:
    """Submit every choice; all or none (a refusal cancels those already queued, then propagates).

    `shared_prefix` is the prompt length the prefix cache reuses in whole (its
    alignment), None without a prefix cache: priming pays off only for n > 1 and
    a prompt longer than it.  `on_first(job)` is the metrics hook the primer's
    event goes to (the choices' events reach it through `merged_pieces`).
    """
    prompt = generations[0].prompt_ids
    primer = None
    if len(generations) > 1 and shared_prefix is not None and len(prompt) > shared_prefix:
        primer = await _prime(submit, prompt, on_first)
    choices: list[Choice] = []
    try:
        for generation, assembler in zip(generations, assemblers):
            choices.append(Choice(await submit(generation), assembler))
    except BaseException:
        for choice in choices:
            choice.job.cancel()
        raise
    return Submitted(choices, primer or choices[0].job)


async def merged_pieces(choices: Sequence[Choice], on_first: Callable[[Job], None]) -> AsyncIterator[tuple[int, Piece]]:
    """(choice index, piece) as each choice's pieces arrive, up to every choice's last.

    A failing choice raises GenerationFailed here; leaving early (an error, a
    client gone) cancels every choice's job.
    """
    arrived: asyncio.Queue[tuple[int, Piece | None, GenerationFailed | None]] = asyncio.Queue()

    async def pump(index: int, choice: Choice) -> None:
        try:
            async for piece in answer_pieces(choice.job, choice.assembler, on_first):
                arrived.put_nowait((index, piece, None))
        except GenerationFailed as e:
            arrived.put_nowait((index, None, e))
            return
        arrived.put_nowait((index, None, None))  # this choice is complete

    pumps = [asyncio.ensure_future(pump(i, c)) for i, c in enumerate(choices)]
    try:
        running = len(pumps)
        while running:
            index, piece, error = await arrived.get()
            if error is not None:
                raise error
            if piece is None:
                running -= 1
            else:
                yield index, piece
    finally:
        for task in pumps:
            task.cancel()
        for choice in choices:
            choice.job.cancel()  # a pump cancelled before it ran never reached answer_pieces' own cancel
