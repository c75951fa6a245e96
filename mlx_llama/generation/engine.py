"""The batched generation engine: continuous batching with per-sequence KV caches.

Design ("batched matmuls, per-sequence attention").  Every running sequence
keeps its own per-layer caches (`KVCache`, or `RotatingKVCache` with
`max_kv_size`, with their usual contract).  One `step()` packs every
sequence's new tokens — one for a decoding sequence, a prefill chunk for one
that is still reading its prompt — into a single (1, N, hidden) activation, so
each projection and MLP matmul is ONE call over all N rows
(`Model.forward_packed`), and so, with the extension's CPU ops, are RoPE (a
position per row) and the decoding rows' attention (row i writes its key and
value into its own sequence's cache in place, then attends to it:
`ops.attention_rows_update`); a prefill chunk attends on its own (causal or
rotating-window mask), and its cache takes its keys and values.  Elsewhere (Metal, no extension) RoPE and attention run per sequence.
There is no padding and no cross-sequence mask.

Batch invariance.  A row's logits depend on its batch-mates only through how
the matmul kernels treat M (the number of rows): norms, SwiGLU, RoPE and
attention compute each row as it would alone (the batched RoPE and attention
give every row the per-sequence ops' bits; tests/test_row_ops.py), a sequence's prefill chunks are cut at
fixed multiples of `prefill_chunk` of its own positions (never by what else
runs), and sampling is per row in NumPy with the request's own RNG
(`RowSampler`).  So the engine is bit-for-bit batch-invariant exactly when the
kernels are row-invariant in M; which kernel modes are is stated in README.md
("Batched generation") and by `mlx-llama info`, and tests/test_engine.py checks it.

Prefill scheduling.  A step takes whole prompt chunks, in admission order,
each as its own segment (so a chunk computes the same bits in any step), up to
`prefill_tokens_per_step`.  Everyone running waits for a step (decoding
streams for their next token, other prompts for their first, and new requests
for admission), so the prompt tokens it takes are sized by the measured cost
of recent steps (`StepCost`: fixed + per-row seconds) for the step to finish
within `gap_target_ms`; at least one chunk joins, so a prompt always advances.
A fixed token count would be wrong both ways: too small where the matmuls are
cheap per row (a long first-token wait), too large on a slow machine (stalled
streams).  Offline work (batch mode) sets no target and loads at full speed.

Memory.  Each admitted request reserves the KV bytes it can reach (prompt +
max_tokens, or the rotating window, rounded up to the cache's growth step);
requests wait in a bounded FIFO queue while the budget or the slots are full.
A request that could never fit is refused at `submit` (`RequestRefused`), a
full queue raises `QueueFull`: both are one-line `MlxLlamaError`s.

Threads.  The engine is not thread-safe: one thread calls `submit`, `cancel`
and `step`.  A server runs it on its own thread behind a queue.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from mlx_llama.errors import MlxLlamaError
from mlx_llama.generation.prefix_cache import PrefixCache
from mlx_llama.generation.requests import FinishReason, GenerationRequest, RequestInfo, TokenEvent
from mlx_llama.generation.row_sampler import RowSampler
from mlx_llama.generation.step_cost import StepCost
from mlx_llama.interfaces import KVCache
from mlx_llama.model.cache import GROWTH_STEP
from mlx_llama.model.llama import Model

_FINISHED_INFO = 1024  # finished requests whose RequestInfo stays readable


class RequestRefused(MlxLlamaError):
    """The request can never run here (too large for the KV budget or the context, or malformed)."""


class QueueFull(MlxLlamaError):
    """Every slot is busy and the waiting queue is full: retry later."""


@dataclass
class EngineConfig:
    max_batch: int = 8  # sequences decoded together
    kv_budget_bytes: int = 2 << 30  # KV memory all running sequences may reserve together
    max_queue: int = 256  # requests waiting for a slot; beyond it submit raises QueueFull
    max_kv_size: int | None = None  # rotating caches of this many tokens (None: growing)
    keep: int = 4  # with max_kv_size: leading tokens never evicted
    # Prompt tokens per chunk; chunk boundaries sit at multiples of it in each
    # sequence's own positions, whatever else runs (batch invariance).  A step
    # takes whole chunks, as many as the prefill policy allows (Engine._prefill_budget).
    prefill_chunk: int = 32
    prefill_tokens_per_step: int = 512  # at most this many prompt tokens join one step
    # The prompt tokens a step takes are limited so that its predicted time stays
    # within this (at least one chunk still joins).  None: always up to prefill_tokens_per_step.
    gap_target_ms: float | None = 400.0
    prefix_cache_bytes: int = 0  # 0: no prefix cache across requests

    def validate(self) -> None:
        if self.max_batch < 1:
            raise MlxLlamaError("the batch size must be >= 1")
        if self.max_queue < 0:
            raise MlxLlamaError("the queue size must be >= 0")
        if self.prefill_chunk < 1 or self.prefill_tokens_per_step < self.prefill_chunk:
            raise MlxLlamaError("need 1 <= prefill chunk <= prefill tokens per step")
        if self.gap_target_ms is not None and not self.gap_target_ms > 0:
            raise MlxLlamaError("the gap target must be a positive number of milliseconds")
        if self.kv_budget_bytes < 1:
            raise MlxLlamaError("the KV budget must be positive")
        if self.max_kv_size is not None and not 0 <= self.keep < self.max_kv_size:
            raise MlxLlamaError(f"keep ({self.keep}) must be in [0, max KV size ({self.max_kv_size}))")


@dataclass
class _Sequence:
    id: int
    request: GenerationRequest
    info: RequestInfo
    reserved: int  # bytes of the KV budget held
    max_tokens: int  # after clamping to the context
    sampler: RowSampler
    cache: list[KVCache] = field(default_factory=list)
    prompt: list[int] = field(default_factory=list)
    fed: int = 0  # prompt tokens already in the cache
    generated: list[int] = field(default_factory=list)

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt)


class Engine:
    """Continuous batching over one model: `submit`, then `step()` until `has_work` is False."""

    def __init__(self, model: Model, config: EngineConfig | None = None) -> None:
        self.model = model
        self.config = config or EngineConfig()
        self.config.validate()
        cfg = model.config
        self.bytes_per_token = (
            2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * model.dtype.size
        )
        self._ids = itertools.count(1)
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._events: list[TokenEvent] = []  # finish events of cancellations, delivered by the next step
        self._finished_info: OrderedDict[int, RequestInfo] = OrderedDict()
        self.reserved_bytes = 0
        c = self.config
        self.prefix_cache = PrefixCache(c.prefix_cache_bytes, c.prefill_chunk) if c.prefix_cache_bytes > 0 else None
        self._step_cost = StepCost()

    # -- requests ---------------------------------------------------------

    def kv_bytes_for(self, request: GenerationRequest) -> int:
        """The KV bytes `request` reserves while it runs."""
        return self._tokens_reserved(len(request.prompt_ids) + self._clamped_max_tokens(request)) * self.bytes_per_token

    def _clamped_max_tokens(self, request: GenerationRequest) -> int:
        if self.config.max_kv_size is not None:
            return request.max_tokens
        # A growing cache must not run past the positions the model was trained for.
        room = self.model.config.max_position_embeddings - len(request.prompt_ids)
        return max(0, min(request.max_tokens, room))

    def _tokens_reserved(self, tokens: int) -> int:
        c = self.config
        if c.max_kv_size is not None:
            # Between steps the ring holds max_kv_size; a prefill chunk adds itself transiently.
            return min(tokens, c.max_kv_size) + c.prefill_chunk
        return -(-tokens // GROWTH_STEP) * GROWTH_STEP

    def submit(self, request: GenerationRequest) -> int:
        """Queue `request`; returns its id.  Raises RequestRefused or QueueFull (nothing is queued then)."""
        n = len(request.prompt_ids)
        if n == 0:
            raise RequestRefused("the prompt is empty")
        if request.max_tokens < 0:
            raise RequestRefused("max tokens must be >= 0")
        vocab = self.model.config.vocab_size
        if any(not 0 <= int(t) < vocab for t in request.prompt_ids):
            raise RequestRefused(f"prompt token ids must be in [0, {vocab})")
        if request.top_logprobs is not None and request.top_logprobs < 0:
            raise RequestRefused("top logprobs must be >= 0")
        limit = self.model.config.max_position_embeddings
        if self.config.max_kv_size is None and n > limit:
            raise RequestRefused(f"the prompt has {n} tokens but the model's context is {limit}")
        need = self.kv_bytes_for(request)
        if need > self.config.kv_budget_bytes:
            raise RequestRefused(
                f"the request needs {need / 2**20:.1f} MiB of KV cache (prompt {n} + max tokens "
                f"{request.max_tokens}) but the budget is {self.config.kv_budget_bytes / 2**20:.1f} MiB"
            )
        if len(self._waiting) >= self.config.max_queue:
            raise QueueFull(f"the engine's queue is full ({self.config.max_queue} requests waiting); retry later")
        try:
            sampler = RowSampler(request)  # validates the sampling parameters
        except MlxLlamaError as e:
            raise RequestRefused(str(e)) from None
        rid = next(self._ids)
        seq = _Sequence(rid, request, RequestInfo(rid, n), need, self._clamped_max_tokens(request), sampler)
        self._waiting.append(seq)
        return rid

    def cancel(self, request_id: int) -> bool:
        """Stop a waiting or running request now (its slot and KV are freed at once).

        Its final event (finish_reason "cancelled") comes with the next `step()`.
        Returns False when the id is unknown or already finished.
        """
        for seq in itertools.chain(self._waiting, self._running):
            if seq.id == request_id:
                self._events.append(self._end(seq, "cancelled"))
                return True
        return False

    def info(self, request_id: int) -> RequestInfo:
        """Prompt and prefix-cache figures of a request (live, or among the last `_FINISHED_INFO` finished)."""
        for seq in itertools.chain(self._waiting, self._running):
            if seq.id == request_id:
                return seq.info
        return self._finished_info[request_id]

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._running or self._events)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # -- stepping ---------------------------------------------------------

    def step(self) -> list[TokenEvent]:
        """Admit what fits, then one forward pass over every running sequence; the events it produced."""
        events, self._events = self._events, []
        self._admit(events)
        if not self._running:
            return events
        start = time.perf_counter()
        segments, tokens, rows, sampled = self._plan()
        logits = self.model.forward_packed(mx.array(np.asarray(tokens, dtype=np.int32))[None], segments, rows)
        # Evaluate now: the caches' lazy graphs must not span steps.
        mx.eval(logits, *[c.state[0] for _, cache in segments for c in cache])
        table = np.array(logits.astype(mx.float32)) if rows else np.empty((0, 0), np.float32)
        for seq, row in zip(sampled, table):
            events.append(self._sample(seq, row))
        self._step_cost.observe(len(tokens), time.perf_counter() - start)
        return events

    def _admit(self, events: list[TokenEvent]) -> None:
        c = self.config
        while self._waiting and len(self._running) < c.max_batch:
            seq = self._waiting[0]
            if self.reserved_bytes + seq.reserved > c.kv_budget_bytes:
                break  # FIFO: a large request is not overtaken forever by small ones
            if seq.max_tokens == 0:
                events.append(self._end(seq, "length"))
            else:
                self._waiting.popleft()
                self._start(seq)

    def _start(self, seq: _Sequence) -> None:
        def fresh() -> list[KVCache]:
            return self.model.make_cache(self.config.max_kv_size, self.config.keep)

        seq.prompt = [int(t) for t in seq.request.prompt_ids]
        if self.prefix_cache is not None:
            seq.cache, seq.fed = self.prefix_cache.restore(seq.prompt, fresh)
        else:
            seq.cache, seq.fed = fresh(), 0
        seq.info.cached_tokens = seq.fed
        self.reserved_bytes += seq.reserved
        self._running.append(seq)

    def _plan(self) -> tuple[list[tuple[int, list[KVCache]]], list[int], list[int], list[_Sequence]]:
        """This step's segments, packed tokens, logits rows and the sequences those rows sample.

        Decoding sequences add one row each, first (consecutive one-row
        segments attend in one call: `Attention.packed`); prefilling ones, in
        admission order, add whole chunks while the step's prefill budget lasts (one
        segment per chunk, so a chunk computes exactly as it would in a step of
        its own).  A chunk that does not fit is never cut: a later, shorter
        one may still take the room.
        """
        c = self.config
        segments, tokens, rows, sampled = [], [], [], []
        prefill_left = self._prefill_budget()
        for seq in [s for s in self._running if not s.prefilling]:
            tokens.append(seq.generated[-1])
            segments.append((1, seq.cache))
            rows.append(len(tokens) - 1)
            sampled.append(seq)
        for seq in [s for s in self._running if s.prefilling]:
            while seq.prefilling:
                end = min(len(seq.prompt), (seq.fed // c.prefill_chunk + 1) * c.prefill_chunk)
                n = end - seq.fed
                if n > prefill_left:
                    break  # it waits for the next step
                prefill_left -= n
                tokens.extend(seq.prompt[seq.fed : end])
                segments.append((n, seq.cache))
                seq.fed = end
                if not seq.prefilling:
                    rows.append(len(tokens) - 1)
                    sampled.append(seq)
                elif c.max_kv_size is not None:
                    # A rotating cache's mask for a chunk depends on what the chunk before
                    # it evicted, and masks are made before the pass: one chunk per step.
                    break
        return segments, tokens, rows, sampled

    def _prefill_budget(self) -> int:
        """Prompt tokens this step may take: as many as the measured step cost says fit in
        `gap_target_ms` beside the decode rows, never below one chunk (none: the full amount).

        Bounded even for a lone prompt: a request arriving meanwhile waits for the step too.
        """
        c = self.config
        if c.gap_target_ms is None:
            return c.prefill_tokens_per_step
        decoding = sum(not s.prefilling for s in self._running)
        fits = self._step_cost.rows_within(c.gap_target_ms / 1e3)
        return min(c.prefill_tokens_per_step, max(c.prefill_chunk, (fits or 0) - decoding))

    def _sample(self, seq: _Sequence, logits: np.ndarray) -> TokenEvent:
        draw = seq.sampler.draw(logits)
        if draw.token is None:
            event = self._end(seq, "error")
            event.error = "the constraint allows no token"
            return event
        seq.generated.append(draw.token)
        event = TokenEvent(seq.id, draw.token, None, draw.logprob, draw.top_logprobs)
        if seq.request.return_logits:
            event.logits = logits
        if draw.token in seq.request.stop_ids or seq.sampler.constraint_done():
            event.finish_reason = "stop"
        elif len(seq.generated) >= seq.max_tokens:
            event.finish_reason = "length"
        if event.finish_reason is not None:
            self._end(seq, event.finish_reason)
        return event

    def _end(self, seq: _Sequence, reason: FinishReason) -> TokenEvent:
        """Take `seq` out of the queue or the batch, freeing its slot and KV reservation at once.

        A sequence that read its whole prompt offers its cache to the prefix
        cache; it holds the prompt and every generated token but the last (never fed).
        """
        self._finished_info[seq.id] = seq.info
        if len(self._finished_info) > _FINISHED_INFO:
            self._finished_info.popitem(last=False)
        if seq in self._waiting:
            self._waiting.remove(seq)
        else:
            self._running.remove(seq)
            self.reserved_bytes -= seq.reserved
            if self.prefix_cache is not None and not seq.prefilling:
                self.prefix_cache.store(seq.prompt + seq.generated[:-1], seq.cache)
            seq.cache = []
        return TokenEvent(seq.id, None, reason)
