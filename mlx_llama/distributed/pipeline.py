"""Pipeline-parallel inference: each rank runs its layers and passes the hidden states on.

Rank 0 drives.  It runs the ordinary generation loop (mlx_llama.generation.loop)
on a `PipelineModel`, a `LanguageModel` whose forward pass embeds the tokens,
runs rank 0's layers and sends the hidden states to rank 1; rank r passes its
output to rank r+1; the last rank sends its hidden states back to rank 0 (its
ring neighbour), which applies the final norm and the head, with the kernels
a single process uses, and samples (one RNG, seeded once) and prints.  The
head lives on rank 0 so that a tied embedding is held once, and what travels
back is hidden × 4 bytes per token (8 KB for 1B) rather than vocab × 4 (0.5 MB).

Each step starts with a small header (command, batch, length, cache offset,
cache kind) that every rank forwards before the hidden states, so the ranks
> 0 know the shapes to receive and when to start fresh caches for their layers.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import mlx.core as mx
import numpy as np

from mlx_llama.config import ModelConfig
from mlx_llama.distributed.group import PipelineGroup, join_group
from mlx_llama.distributed.memory import release_freed_heap
from mlx_llama.distributed.stage import OpenedCheckpoint, PipelineStage, load_stage
from mlx_llama.errors import MlxLlamaError
from mlx_llama.generation.prompt_cache import rollback
from mlx_llama.interfaces import KVCache, TokenizerLike
from mlx_llama.tokenizer import Tokenizer
from mlx_llama.tools.bench import rss_bytes

_STOP, _FORWARD, _ABORT, _PACKED = 0, 1, 2, 3
# _FORWARD: command, batch, length, last_only, cache offset, max_kv_size (-1: growing), keep.
# _PACKED: command, tokens, segments, dropped, rows, max_kv_size, keep; then the step's plan.
_HEADER = 7
_STATUS_BYTES = 2048


@dataclass
class CommStats:
    """Where one rank's time went over the decode steps (one token each)."""

    tokens: int = 0
    compute_s: float = 0.0
    send_s: float = 0.0
    wait_s: float = 0.0  # waiting for the previous rank (on rank 0: for the last one): upstream work + transfer
    # Before the step: on rank 0 its own work between steps (sampling, the engine's bookkeeping),
    # on the others waiting for rank 0 to start the step (they idle at every step boundary).
    between_s: float = 0.0

    def add(self, decoded: int, compute: float, send: float, wait: float, between: float) -> None:
        """A step's figures; counted when it decoded (`decoded` tokens, one per sequence) and read no prompt."""
        if decoded:
            self.tokens += decoded
            self.compute_s += compute
            self.send_s += send
            self.wait_s += wait
            self.between_s += between

    def describe(self) -> str:
        n = max(self.tokens, 1)
        return (f"per token: compute {1e3 * self.compute_s / n:.2f} ms, send {1e3 * self.send_s / n:.2f} ms, "
                f"waiting for peers {1e3 * self.wait_s / n:.2f} ms, between steps {1e3 * self.between_s / n:.2f} ms "
                f"({self.tokens} tokens)")


@dataclass
class Pipeline:
    """This rank's part of a pipeline: its group, its stage and its communication statistics."""

    group: PipelineGroup
    stage: PipelineStage
    threads: int | None = None  # the thread pools' size when this rank set it to its share of the host
    loaded_rss: int = 0  # the peak RSS once this rank's stage was loaded, before any step ran
    stats: CommStats = field(default_factory=CommStats)
    broken: bool = False  # a send or recv failed: the connection to the other ranks is gone
    stopped: bool = False  # rank 0 told the others to finish

    @property
    def config(self) -> ModelConfig:
        return self.stage.config

    def _wait(self, what: str, *arrays: mx.array, bounded: bool = True) -> float:
        """Evaluate arrays that exchange data with other ranks, under the watchdog unless not `bounded`;
        returns the seconds taken."""
        t = time.perf_counter()
        if bounded:
            self.group.watchdog.arm(what)
        try:
            mx.eval(*arrays)
        except RuntimeError as e:
            self.broken = True
            raise MlxLlamaError(f"{self.group.who}: {what}: {e}") from None
        finally:
            self.group.watchdog.disarm()
        return time.perf_counter() - t

    def _send(self, x: mx.array, dst: int) -> float:
        return self._wait(f"sending to rank {dst}", mx.distributed.send(x, dst, group=self.group.group))

    def _recv(self, shape: Sequence[int], dtype: mx.Dtype, src: int, bounded: bool = True) -> tuple[mx.array, float]:
        x = mx.distributed.recv(tuple(shape), dtype, src, group=self.group.group)
        return x, self._wait(f"waiting for rank {src}", x, bounded=bounded)

    def describe(self) -> str:
        layers = self.stage.plan.layers
        threads = f", {self.threads}-thread pools" if self.threads else ""
        return (f"{self.group.who}: layers {layers.start}-{layers.stop - 1} ({len(self.stage.tensor_names)} tensors, "
                f"{self.stage.tensor_bytes / 1e6:.1f} MB read{threads}), peak RSS {rss_bytes()[1] / 1e9:.3f} GB "
                f"({self.loaded_rss / 1e9:.3f} GB once loaded), "
                f"MLX peak {mx.get_peak_memory() / 1e9:.3f} GB; {self.stats.describe()}")

    def serve(self, wait_idle: bool = False) -> None:
        """Ranks > 0: run this rank's layers for every step rank 0 starts, until it stops the pipeline.

        `wait_idle`: wait for the next step as long as it takes (a chat or a server is idle between
        requests); a rank that dies still ends the wait, frozen ranks are only caught within a step.
        """
        g = self.group
        cache: list[KVCache] = []  # the one sequence of `generate_tokens` steps
        caches: dict[int, list[KVCache]] = {}  # the batched engine's sequences, by rank 0's key
        while True:
            header, between = self._recv((_HEADER,), mx.int32, g.rank - 1, bounded=not wait_idle)
            if not self.stage.plan.last:
                self._send(header, g.rank + 1)
            command, *fields = (int(v) for v in np.array(header))
            if command == _STOP:
                return
            if command == _ABORT:
                raise MlxLlamaError(f"{g.who}: rank 0 stopped with an error")
            if command == _FORWARD:
                cache = self._serve_forward(cache, between, *fields)
            else:
                self._serve_packed(caches, between, *fields)

    def _fresh_or_continued(self, cache: list[KVCache] | None, offset: int, max_kv: int,
                            keep: int) -> list[KVCache]:
        """New caches for this rank's layers when rank 0's start at 0, else `cache`, which must be where
        rank 0's are."""
        if offset == 0:
            return self.stage.make_cache(None if max_kv < 0 else max_kv, keep)
        if cache and cache[0].offset > offset:
            rollback(cache, cache[0].offset - offset)  # rank 0 rolled its caches back (a chat edit): follow
        if not cache or cache[0].offset != offset:
            raise MlxLlamaError(f"{self.group.who}: out of step with rank 0 (cache at "
                                f"{cache[0].offset if cache else 0}, rank 0 at {offset})")
        return cache

    def _serve_forward(self, cache: list[KVCache], between: float, batch: int, length: int, last_only: int,
                       offset: int, max_kv: int, keep: int) -> list[KVCache]:
        """One `generate_tokens` step (see `PipelineModel.__call__`), whose header took `between` seconds
        to come; returns the sequence's caches."""
        cache = self._fresh_or_continued(cache, offset, max_kv, keep)
        h, wait = self._recv((batch, length, self.config.hidden_size), self.stage.compute_dtype, self.group.rank - 1)
        t = time.perf_counter()
        out = self.stage.forward_layers(h, cache)
        if self.stage.plan.last and last_only:
            out = out[:, -1:, :]  # all the head on rank 0 looks at
        mx.eval(out, *[a for c in cache for a in c.state[:2]])
        compute = time.perf_counter() - t
        send = self._send(out, (self.group.rank + 1) % self.group.size)
        self.stats.add(int(length == 1), compute, send, wait, between)
        return cache

    def _serve_packed(self, caches: dict[int, list[KVCache]], between: float, tokens: int, n_segments: int,
                      n_dropped: int, n_rows: int, max_kv: int, keep: int) -> None:
        """One step of the batched engine (see `PipelineModel.forward_packed`), whose header took `between`
        seconds to come; updates `caches` in place."""
        g = self.group
        plan, _ = self._recv((3 * n_segments + n_dropped + n_rows,), mx.int32, g.rank - 1)
        if not self.stage.plan.last:
            self._send(plan, g.rank + 1)
        values = np.array(plan).tolist()
        ends = 3 * n_segments, 3 * n_segments + n_dropped  # (key, length, offset) per segment | dropped | rows
        segments_at, dropped, rows = values[: ends[0]], values[ends[0] : ends[1]], values[ends[1] :]
        for key in dropped:  # sequences rank 0's engine has finished
            caches.pop(key, None)
        segments, step_end = [], {}  # a sequence may bring several prompt chunks to one step
        for i in range(0, len(segments_at), 3):
            key, n, offset = segments_at[i : i + 3]
            if key not in step_end:
                caches[key] = self._fresh_or_continued(caches.get(key), offset, max_kv, keep)
            elif offset != step_end[key]:
                raise MlxLlamaError(f"{g.who}: out of step with rank 0 (chunk at {step_end[key]}, rank 0 at {offset})")
            step_end[key] = offset + n
            segments.append((n, caches[key]))
        h, wait = self._recv((1, tokens, self.config.hidden_size), self.stage.compute_dtype, g.rank - 1)
        t = time.perf_counter()
        out = self.stage.forward_packed_layers(h, segments)
        last = self.stage.plan.last
        if last:
            out = out[:, mx.array(rows, dtype=mx.int32)]  # the rows rank 0 samples
        mx.eval(out, *[c.state[0] for _, cache in segments for c in cache])
        compute = time.perf_counter() - t
        # Prompt chunks alone produce no rows: rank 0 then waits for nothing.
        send = self._send(out, (g.rank + 1) % g.size) if rows or not last else 0.0
        self.stats.add(tokens if n_rows == tokens else 0, compute, send, wait, between)

    def stop(self, aborted: bool = False) -> None:
        """Rank 0: tell the other ranks to finish (to exit with an error when `aborted`); once."""
        if self.stopped:
            return
        self.stopped = True
        if self.group.size > 1 and not self.broken:  # after a lost connection there is no one to tell
            header = mx.array([_ABORT if aborted else _STOP] + [0] * (_HEADER - 1), dtype=mx.int32)
            self._send(header, 1)


# A packed step is cut into micro-batches (up to one per rank) only when each gets this many tokens:
# below it a step is memory-bound (reading the weights costs what it costs for one row), and every
# micro-batch would read them again.  $MLX_LLAMA_PIPELINE_MICRO_TOKENS overrides it; 0 never cuts.
MICRO_BATCH_TOKENS = 32


def micro_batch_tokens() -> int:
    value = os.environ.get("MLX_LLAMA_PIPELINE_MICRO_TOKENS", "").strip()
    if not value:
        return MICRO_BATCH_TOKENS
    if not value.isdigit():
        raise MlxLlamaError(f"MLX_LLAMA_PIPELINE_MICRO_TOKENS={value!r}: give a number of tokens (0: no micro-batches)")
    return int(value)


@dataclass(frozen=True)
class MicroBatch:
    """Segments [lo, hi) of a packed step: its tokens [start, start + length), its sampled rows (from 0)."""

    lo: int
    hi: int
    start: int
    length: int
    rows: list[int]


def micro_batches(lengths: Sequence[int], rows: Sequence[int], parts: int, min_tokens: int) -> list[MicroBatch]:
    """At most `parts` contiguous groups of the segments (of these token `lengths`), each of at least
    `min_tokens` tokens where it can be, cut where the tokens are most even; one group when `min_tokens` is 0."""
    total = sum(lengths)
    k = 1 if min_tokens <= 0 else max(1, min(parts, len(lengths), total // min_tokens))
    before = list(itertools.accumulate(lengths, initial=0))  # tokens before segment j
    bounds = [0]
    for i in range(1, k):
        target = i * total / k
        # The cut after the previous one that leaves a segment for each group still to come.
        bounds.append(min(range(bounds[-1] + 1, len(lengths) - (k - i) + 1), key=lambda j: abs(before[j] - target)))
    bounds.append(len(lengths))
    groups = []
    for lo, hi in zip(bounds, bounds[1:]):
        start, stop = before[lo], before[hi]
        groups.append(MicroBatch(lo, hi, start, stop - start, [r - start for r in rows if start <= r < stop]))
    return groups


class PipelineModel:
    """The `LanguageModel` rank 0 drives: its forward pass runs through every rank of the pipeline."""

    xp = mx

    def __init__(self, pipeline: Pipeline, path: Path, generation_config: dict[str, Any]) -> None:
        self.pipeline = pipeline
        self.config = pipeline.config
        self.path, self.generation_config = path, generation_config
        # The batched engine's sequences: key by id() of rank 0's first cache, keys of finished ones.
        self._keys: dict[int, int] = {}
        self._next_key = itertools.count()
        self._dropped: list[int] = []
        self.micro_batch_tokens = micro_batch_tokens()
        self._last_step_end: float | None = None  # when the previous step through the ranks returned

    def _since_last_step(self) -> float:
        """Rank 0's time since the previous step returned: its own work between steps (sampling, the engine's)."""
        return 0.0 if self._last_step_end is None else time.perf_counter() - self._last_step_end

    @property
    def dtype(self) -> mx.Dtype:
        return self.pipeline.stage.compute_dtype

    def make_cache(self, max_kv_size: int | None = None, keep: int = 4) -> list[KVCache]:
        """Caches for rank 0's layers; the other ranks make theirs when the first step reaches them."""
        return self.pipeline.stage.make_cache(max_kv_size, keep)

    def __call__(self, tokens: mx.array, cache: Sequence[KVCache] | None = None, *, last_only: bool = False) -> mx.array:
        if cache is None:
            raise MlxLlamaError("a pipelined model needs a KV cache")
        p, stage = self.pipeline, self.pipeline.stage
        size = p.group.size
        h = stage.embed(tokens)
        if size == 1:
            return stage.logits(stage.forward_layers(h, cache), last_only)
        between = self._since_last_step()
        batch, length = tokens.shape
        max_kv = cache[0].max_size
        keep = getattr(cache[0], "keep", 0)
        header = mx.array([_FORWARD, batch, length, int(last_only), cache[0].offset,
                           -1 if max_kv is None else max_kv, keep], dtype=mx.int32)
        p._send(header, 1)
        t = time.perf_counter()
        h = stage.forward_layers(h, cache)
        mx.eval(h)
        compute = time.perf_counter() - t
        send = p._send(h, 1)
        h, wait = p._recv((batch, 1 if last_only else length, self.config.hidden_size), stage.compute_dtype, size - 1)
        t = time.perf_counter()
        logits = stage.logits(h, last_only)
        mx.eval(logits)
        p.stats.add(int(length == 1), compute + time.perf_counter() - t, send, wait, between)
        self._last_step_end = time.perf_counter()
        return logits

    def forward_packed(self, tokens: mx.array, segments: Sequence[tuple[int, Sequence[KVCache]]],
                       rows: Sequence[int]) -> mx.array:
        """`Model.forward_packed` through the pipeline: the batched engine's step over several sequences.

        The other ranks keep caches per sequence under a key rank 0 gives each one
        (its first cache's), and drop them when the engine lets rank 0's go.
        """
        p, stage = self.pipeline, self.pipeline.stage
        h = stage.embed(tokens)
        # Prompt chunks only: the caches are the result.
        no_rows = mx.zeros((0, self.config.vocab_size), dtype=self.dtype)
        if p.group.size == 1:
            h = stage.forward_packed_layers(h, segments)
            return stage.logits(h[:, mx.array(list(rows), dtype=mx.int32)], last_only=False)[0] if rows else no_rows
        between = self._since_last_step()
        compute = send = wait = 0.0
        groups = micro_batches([n for n, _ in segments], rows, p.group.size, self.micro_batch_tokens)
        # Each micro-batch goes on as soon as rank 0's layers are done with it, so that rank 1 works
        # on the first while rank 0 runs the next: to the other ranks, each is a step of its own.
        for g in groups:
            c, s = self._send_step(h[:, g.start : g.start + g.length], segments[g.lo : g.hi], g.rows)
            compute, send = compute + c, send + s
        received = []
        for g in groups:
            if g.rows:  # (the last rank sends nothing back for prompt chunks alone)
                shape = (1, len(g.rows), self.config.hidden_size)
                h_rows, w = p._recv(shape, stage.compute_dtype, p.group.size - 1)
                received.append(h_rows)
                wait += w
        if not received:  # the next step may start at once
            self._last_step_end = time.perf_counter()
            return no_rows
        t = time.perf_counter()
        logits = stage.logits(mx.concatenate(received, axis=1), last_only=False)[0]
        mx.eval(logits)
        p.stats.add(len(rows) if len(rows) == tokens.shape[1] else 0, compute + time.perf_counter() - t, send, wait,
                    between)
        self._last_step_end = time.perf_counter()
        return logits

    def _send_step(self, h: mx.array, segments: Sequence[tuple[int, Sequence[KVCache]]],
                   rows: Sequence[int]) -> tuple[float, float]:
        """Start a packed step on the other ranks, run rank 0's layers, pass them on: (compute, send) seconds."""
        p, stage = self.pipeline, self.pipeline.stage
        keys = [self._key(cache) for _, cache in segments]
        dropped, self._dropped = self._dropped, []
        first = segments[0][1][0]
        max_kv = first.max_size
        header = mx.array([_PACKED, h.shape[1], len(segments), len(dropped), len(rows),
                           -1 if max_kv is None else max_kv, getattr(first, "keep", 0)], dtype=mx.int32)
        plan, ends = [], {}  # a sequence's second chunk in a step starts where its first ends
        for key, (n, cache) in zip(keys, segments):
            offset = ends.get(key, cache[0].offset)
            plan += [key, n, offset]
            ends[key] = offset + n
        p._send(header, 1)
        p._send(mx.array(plan + dropped + list(rows), dtype=mx.int32), 1)
        t = time.perf_counter()
        h = stage.forward_packed_layers(h, segments)
        mx.eval(h, *[c.state[0] for _, cache in segments for c in cache])
        compute = time.perf_counter() - t
        return compute, p._send(h, 1)

    def _key(self, cache: Sequence[KVCache]) -> int:
        """The other ranks' name for the sequence whose caches on rank 0 are `cache`."""
        first = cache[0]
        key = self._keys.get(id(first))
        if key is None:
            key = self._keys[id(first)] = next(self._next_key)
            weakref.finalize(first, self._forget, id(first), key)
        return key

    def _forget(self, cache_id: int, key: int) -> None:
        del self._keys[cache_id]
        self._dropped.append(key)  # told to the other ranks with the next step


def _exchange_status(group: PipelineGroup, status: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's `status` (a small JSON object), gathered on every rank."""
    raw = json.dumps(status).encode()
    if len(raw) > _STATUS_BYTES:  # only an error message can be that long
        status["error"] = status["error"][: _STATUS_BYTES // 2]
        raw = json.dumps(status).encode()[:_STATUS_BYTES]
    buf = np.zeros(_STATUS_BYTES, dtype=np.uint8)
    buf[: len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    mine = mx.array(buf.view(np.int32))[None]
    if group.size == 1:
        return [status]
    gathered = mx.distributed.all_gather(mine, group=group.group)
    group.watchdog.arm("waiting for the other ranks to load their layers")
    try:
        mx.eval(gathered)
    except RuntimeError as e:
        raise MlxLlamaError(f"{group.who}: waiting for the other ranks to load their layers: {e}") from None
    finally:
        group.watchdog.disarm()
    rows = np.array(gathered).view(np.uint8).reshape(group.size, _STATUS_BYTES)
    return [json.loads(bytes(row).rstrip(b"\0")) for row in rows]


def share_host_cores(hosts: Sequence[str], rank: int) -> int | None:
    """Size this rank's thread pools to its share of the cores when other ranks run on its host.

    Each rank's pools would otherwise take every core, and the ranks' threads would preempt
    one another (and spin) on the same cores.  $MLX_LLAMA_NUM_THREADS, when set, is the
    user's choice and wins.  Returns the size set, or None when left alone.
    """
    from mlx_llama.cli.info import available_cores
    from mlx_llama.threads import set_threads

    here = hosts.count(hosts[rank])
    if here == 1 or os.environ.get("MLX_LLAMA_NUM_THREADS"):
        return None
    threads = max(1, available_cores() // here)
    set_threads(threads)
    return threads


def start_pipeline(model_path: str, dtype: str | None,
                   timeout: float) -> tuple[Pipeline, OpenedCheckpoint, TokenizerLike | None]:
    """Join the launched group, load this rank's stage (and on rank 0 the tokenizer, None when the
    directory has none) and take this rank's share of its host's cores; every rank fails, naming the
    rank, when one cannot load."""
    group = join_group(timeout)
    stage: PipelineStage | None = None
    checkpoint: OpenedCheckpoint | None = None
    tokenizer: TokenizerLike | None = None
    status: dict[str, Any] = {"who": group.who, "host": socket.gethostname(), "error": None}
    try:
        checkpoint = OpenedCheckpoint.open(model_path)
        if group.rank == 0:
            # Before the weights, so that what parsing it leaves freed goes back instead of adding to the peak.
            model_dir = checkpoint.model_dir
            tokenizer = Tokenizer.from_dir(model_dir.path, model_dir.config, model_dir.generation_config)
            release_freed_heap()
        stage = load_stage(checkpoint, group.rank, group.size, dtype)
    except MlxLlamaError as e:
        status["error"] = str(e).splitlines()[0] if str(e) else type(e).__name__
    statuses = _exchange_status(group, status)
    failed = [s for s in statuses if s["error"]]
    if failed:
        first = failed[0]
        raise MlxLlamaError(f"{first['who']}: {first['error']}")
    assert stage is not None and checkpoint is not None
    threads = share_host_cores([s["host"] for s in statuses], group.rank)
    return Pipeline(group, stage, threads, rss_bytes()[1]), checkpoint, tokenizer
