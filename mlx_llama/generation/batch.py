"""`batch_generate`: answer many prompts together on the batched engine, results in input order."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from mlx_llama.errors import MlxLlamaError
from mlx_llama.generation.engine import Engine, EngineConfig, RequestRefused
from mlx_llama.generation.requests import FinishReason, GenerationRequest
from mlx_llama.generation.sampler import SamplingParams
from mlx_llama.generation.text import TextAssembler
from mlx_llama.interfaces import TokenizerLike
from mlx_llama.model.llama import Model

DEFAULT_BATCH_SIZE = 8  # where aggregate decode speed levels off on a 2-core CPU (benchmarks/batch_throughput.py)


@dataclass
class BatchResult:
    token_ids: list[int] = field(default_factory=list)
    text: str | None = None  # with a tokenizer: the answer's text (stop tokens and strings removed)
    finish_reason: FinishReason | None = None  # None for an empty prompt (nothing was generated)


def batch_generate(
    model: Model,
    prompts: Sequence[Sequence[int]],
    *,
    tokenizer: TokenizerLike | None = None,
    max_tokens: int = 256,
    sampling: SamplingParams | None = None,
    stop_strings: Sequence[str] = (),
    batch_size: int = DEFAULT_BATCH_SIZE,
    config: EngineConfig | None = None,
    on_result: Callable[[int, BatchResult], None] | None = None,
    on_tokens: Callable[[int], None] | None = None,
) -> list[BatchResult]:
    """Generate for every prompt (token ids) on one engine; the results follow the prompts' order.

    An empty prompt gets an empty result.  Each row samples with `sampling`
    (its seed included), exactly as it would alone.  Without a tokenizer,
    generation stops at the model's eos ids; with one, at its stop tokens and at
    `stop_strings`.  `on_result(index, result)` is called as each prompt
    finishes, `on_tokens(n)` after each step with the tokens it produced.
    `config` overrides the engine settings (its `max_batch` wins over `batch_size`).
    A prompt the engine refuses (longer than the context, too large for the KV
    budget) stops the run with an MlxLlamaError naming it.
    """
    # Offline: nobody watches the gaps between tokens, so prompts load at full speed.
    config = config or EngineConfig(max_batch=batch_size, max_queue=max(len(prompts), 1), gap_target_ms=None)
    engine = Engine(model, config)
    sampling = sampling or SamplingParams()
    stop_ids = frozenset(tokenizer.stop_ids if tokenizer else model.config.eos_token_id)
    results = [BatchResult() for _ in prompts]
    texts: dict[int, tuple[int, TextAssembler | None, list[str]]] = {}
    todo = [i for i, p in enumerate(prompts) if len(p)]
    for i, p in enumerate(prompts):
        if not len(p) and on_result:
            on_result(i, results[i])

    def finish(rid: int, reason: FinishReason) -> None:
        i, text, pieces = texts.pop(rid)
        if text is not None:
            pieces.append(text.finish())
            results[i].text = "".join(pieces)
        results[i].finish_reason = reason
        if on_result:
            on_result(i, results[i])

    while todo or engine.has_work:
        # Keep the queue just full enough to refill freed slots at the next step.
        while todo and engine.waiting < min(config.max_batch, config.max_queue):
            i = todo.pop(0)
            try:
                rid = engine.submit(GenerationRequest(prompts[i], max_tokens, sampling, stop_ids))
            except RequestRefused as e:
                raise MlxLlamaError(f"prompt {i + 1}: {e}") from None
            texts[rid] = (i, TextAssembler(tokenizer, stop_strings) if tokenizer else None, [])
        produced = 0
        for ev in engine.step():
            if ev.request_id not in texts:
                continue  # the cancellation of a row that hit a stop string
            i, text, pieces = texts[ev.request_id]
            if ev.token is not None:
                produced += 1
                results[i].token_ids.append(ev.token)
                if text is not None:
                    pieces.append(text.add(ev.token))
                    if text.done and ev.finish_reason is None:
                        engine.cancel(ev.request_id)
                        finish(ev.request_id, "stop")
                        continue
            if ev.finish_reason is not None:
                finish(ev.request_id, ev.finish_reason)
        if on_tokens:
            on_tokens(produced)
    return results
