"""The batched engine: batch invariance, agreement with the single-sequence loop, admission control.

Invariance is checked in the default kernel mode on a tiny 4-bit model: a
sequence's tokens and logits must be bit-identical whether its prompt runs
with seven others submitted together, arriving one per step, or alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from mlx_llama.convert import convert
from mlx_llama.errors import MlxLlamaError
from mlx_llama.generation.engine import Engine, EngineConfig, QueueFull, RequestRefused
from mlx_llama.generation.loop import generate_tokens
from mlx_llama.generation.requests import GenerationRequest, TokenEvent
from mlx_llama.generation.sampler import Sampler, SamplingParams
from mlx_llama.loader import load_model
from mlx_llama.model.llama import Model

LENGTHS = (1, 5, 17, 31, 32, 45, 70, 100)
PROMPTS = [list(map(int, np.random.default_rng(n).integers(3, 256, size=n))) for n in LENGTHS]
MAX_TOKENS = 24
CHUNK = 16


@pytest.fixture(scope="module")
def qmodel(make_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Model:
    out = tmp_path_factory.mktemp("q4") / "model"
    convert(make_checkpoint(), out, bits=4, group_size=32, log=lambda _: None)
    return load_model(out, "float32")


@pytest.fixture(scope="module")
def fmodel(make_checkpoint: Callable[..., Path]) -> Model:
    return load_model(make_checkpoint(), "float32")


SAMPLING = {
    "greedy": lambda i: SamplingParams(),
    "seeded": lambda i: SamplingParams(temperature=0.9, top_k=50, seed=100 + i),
    # OpenAI's penalties on every row, greedy and sampled rows mixed in one batch.
    "penalised": lambda i: SamplingParams(temperature=0.9 * (i % 2), top_k=50, presence_penalty=0.8,
                                          frequency_penalty=0.6, seed=100 + i),
}


def request(i: int, sampling: str, **kw) -> GenerationRequest:
    return GenerationRequest(PROMPTS[i], kw.pop("max_tokens", MAX_TOKENS), SAMPLING[sampling](i), return_logits=True, **kw)


def run(engine: Engine, requests: list[GenerationRequest], stagger: bool = False) -> dict[int, list[TokenEvent]]:
    """Every request's events, keyed by its index; with `stagger`, one request joins per step."""
    index, events, pending = {}, {}, list(enumerate(requests))
    while pending or engine.has_work:
        while pending:
            i, r = pending.pop(0)
            index[engine.submit(r)] = i
            if stagger:
                break
        for ev in engine.step():
            events.setdefault(index[ev.request_id], []).append(ev)
    return events


def tokens_and_logits(events: list[TokenEvent]) -> tuple[list[int], np.ndarray]:
    return [e.token for e in events], np.stack([e.logits for e in events])


@pytest.mark.parametrize("sampling", list(SAMPLING))
@pytest.mark.parametrize("max_kv_size", [None, 40], ids=["growing", "rotating"])
def test_batch_invariance(qmodel: Model, sampling: str, max_kv_size: int | None) -> None:
    def engine(batch: int) -> Engine:
        return Engine(qmodel, EngineConfig(max_batch=batch, max_kv_size=max_kv_size, prefill_chunk=CHUNK,
                                           prefill_tokens_per_step=2 * CHUNK))

    reqs = lambda: [request(i, sampling) for i in range(len(PROMPTS))]  # noqa: E731 (fresh constraint-free copies)
    together = run(engine(8), reqs())
    staggered = run(engine(8), reqs(), stagger=True)
    alone = run(engine(1), reqs())
    for i in range(len(PROMPTS)):
        ids, logits = tokens_and_logits(alone[i])
        assert len(ids) == MAX_TOKENS
        for other in (together[i], staggered[i]):
            other_ids, other_logits = tokens_and_logits(other)
            assert other_ids == ids, f"prompt {i}"
            np.testing.assert_array_equal(other_logits, logits, err_msg=f"prompt {i}")
    if max_kv_size is not None:
        # The windows wrapped, each at its own step: prompt + answer exceed the window.
        assert all(len(p) + MAX_TOKENS > max_kv_size for p in PROMPTS[3:])


@pytest.mark.parametrize("sampling", list(SAMPLING))
def test_same_ids_as_the_single_sequence_loop(qmodel: Model, sampling: str) -> None:
    events = run(Engine(qmodel, EngineConfig(max_batch=8, prefill_chunk=CHUNK)),
                 [request(i, sampling) for i in range(len(PROMPTS))])
    for i, prompt in enumerate(PROMPTS):
        sampler = Sampler(request(i, sampling).sampling)
        expected = list(generate_tokens(qmodel, prompt, max_tokens=MAX_TOKENS, sampler=sampler,
                                        prefill_step_size=CHUNK))
        assert [e.token for e in events[i]] == expected, f"prompt {i}"


def test_penalised_greedy_rows_follow_openais_formula(qmodel: Model) -> None:
    """Each greedy penalised token is the argmax of the raw logits minus OpenAI's penalty, computed here."""
    events = run(Engine(qmodel, EngineConfig(max_batch=8, prefill_chunk=CHUNK)),
                 [request(i, "penalised") for i in range(0, len(PROMPTS), 2)])
    changed = 0
    for row in events.values():
        ids, logits = tokens_and_logits(row)
        for t, step in enumerate(logits):
            counts = np.bincount(ids[:t], minlength=len(step))
            expected = int(np.argmax(step.astype(np.float64) - (0.8 * (counts > 0) + 0.6 * counts)))
            assert ids[t] == expected
            changed += expected != int(np.argmax(step))
    assert changed > 0  # the penalties did change some draws


def test_float_model_is_deterministic_and_close_across_batches(fmodel: Model) -> None:
    """OpenBLAS's sgemm blocks by M, so float32 logits only match to rounding across batch sizes;
    the same batch composition repeats bit for bit."""
    reqs = lambda: [request(i, "greedy") for i in range(4)]  # noqa: E731
    first = run(Engine(fmodel, EngineConfig(max_batch=4, prefill_chunk=CHUNK)), reqs())
    again = run(Engine(fmodel, EngineConfig(max_batch=4, prefill_chunk=CHUNK)), reqs())
    alone = run(Engine(fmodel, EngineConfig(max_batch=1, prefill_chunk=CHUNK)), reqs())
    for i in range(4):
        np.testing.assert_array_equal(tokens_and_logits(first[i])[1], tokens_and_logits(again[i])[1])
        a, b = tokens_and_logits(first[i])[1], tokens_and_logits(alone[i])[1]
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


def test_running_streams_keep_decoding_while_a_long_prompt_loads(qmodel: Model) -> None:
    engine = Engine(qmodel, EngineConfig(max_batch=4, prefill_chunk=CHUNK, prefill_tokens_per_step=CHUNK))
    first = engine.submit(GenerationRequest(PROMPTS[1], 40))
    engine.step()  # its prompt fits one chunk: it now decodes
    engine.submit(GenerationRequest(PROMPTS[-1], 4))  # 100 tokens: 7 chunks of 16
    for _ in range(7):
        assert [e.request_id for e in engine.step() if e.token is not None][:1] == [first]


def test_cancel_frees_the_slot_at_once(qmodel: Model) -> None:
    engine = Engine(qmodel, EngineConfig(max_batch=1, prefill_chunk=CHUNK))
    a = engine.submit(GenerationRequest(PROMPTS[1], 100))  # its prompt fits one chunk
    b = engine.submit(GenerationRequest(PROMPTS[1], 3))
    for _ in range(3):
        assert {e.request_id for e in engine.step()} == {a}
    assert engine.cancel(a)
    assert engine.running == 0 and engine.reserved_bytes == 0
    events = engine.step()
    assert events[0].request_id == a and events[0].finish_reason == "cancelled" and events[0].token is None
    assert engine.running == 1  # b took the slot in the same step
    while engine.has_work:
        events += engine.step()
    assert [e.finish_reason for e in events if e.request_id == b] == [None, None, "length"]
    assert not engine.cancel(a)


def test_request_larger_than_the_budget_is_refused(qmodel: Model) -> None:
    engine = Engine(qmodel, EngineConfig(kv_budget_bytes=engine_bytes(qmodel, 300)))
    with pytest.raises(RequestRefused) as e:
        engine.submit(GenerationRequest(PROMPTS[-1], 1000))
    assert "KV cache" in str(e.value) and "\n" not in str(e.value)
    assert not engine.has_work


def engine_bytes(model: Model, tokens: int) -> int:
    return tokens * Engine(model).bytes_per_token


def test_requests_wait_for_the_budget_and_a_full_queue_is_reported(qmodel: Model) -> None:
    # Each request reserves 256 tokens (the cache's growth step): the budget holds one.
    engine = Engine(qmodel, EngineConfig(max_batch=4, max_queue=2, kv_budget_bytes=engine_bytes(qmodel, 300)))
    a = engine.submit(GenerationRequest(PROMPTS[1], 5))
    b = engine.submit(GenerationRequest(PROMPTS[2], 5))
    with pytest.raises(QueueFull):
        engine.submit(GenerationRequest(PROMPTS[3], 5))
    finished = []
    while engine.has_work:
        assert engine.running <= 1
        finished += [e.request_id for e in engine.step() if e.finish_reason]
    assert finished == [a, b]


def test_bad_requests_are_refused(qmodel: Model) -> None:
    engine = Engine(qmodel)
    for bad in (GenerationRequest([], 4), GenerationRequest([1], -1), GenerationRequest([999], 4),
                GenerationRequest([1], 4, SamplingParams(temperature=-1))):
        with pytest.raises(RequestRefused):
            engine.submit(bad)


def test_prefix_cache_reuses_aligned_prefixes_without_changing_logits(qmodel: Model) -> None:
    engine = Engine(qmodel, EngineConfig(prefill_chunk=CHUNK, prefix_cache_bytes=1 << 20))
    run(engine, [request(7, "greedy", max_tokens=3)])
    follow_up = PROMPTS[7][:60] + [5, 6, 7]
    rid = engine.submit(GenerationRequest(follow_up, 8, return_logits=True))
    warm = []
    while engine.has_work:
        warm += engine.step()
    assert engine.info(rid).cached_tokens == 48  # 60 shared tokens, rounded down to the chunk
    cold = run(Engine(qmodel, EngineConfig(prefill_chunk=CHUNK)), [GenerationRequest(follow_up, 8, return_logits=True)])
    np.testing.assert_array_equal(tokens_and_logits(warm)[1], tokens_and_logits(cold[0])[1])


def test_stop_ids_logprobs_and_constraint(qmodel: Model) -> None:
    class OnlyEvenTokens:
        def __init__(self) -> None:
            self.n = 0

        def allowed(self) -> np.ndarray:
            return np.arange(qmodel.config.vocab_size) % 2 == 0

        def advance(self, token: int) -> None:
            self.n += 1

        def is_done(self) -> bool:
            return self.n == 5

    engine = Engine(qmodel)
    constrained = engine.submit(GenerationRequest(PROMPTS[4], 50, SamplingParams(temperature=1.0, seed=3),
                                                  top_logprobs=3, constraint=OnlyEvenTokens()))
    evs = run_events(engine, constrained)
    assert len(evs) == 5 and evs[-1].finish_reason == "stop"
    assert all(e.token % 2 == 0 for e in evs)
    for e in evs:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0][1] >= e.top_logprobs[-1][1]
        assert e.logprob <= e.top_logprobs[0][1] + 1e-12

    greedy = list(generate_tokens(qmodel, PROMPTS[4], max_tokens=10))
    engine = Engine(qmodel)
    rid = engine.submit(GenerationRequest(PROMPTS[4], 10, stop_ids=frozenset({greedy[3]})))
    assert [e.token for e in run_events(engine, rid)] == greedy[: greedy.index(greedy[3]) + 1]


def run_events(engine: Engine, rid: int) -> list[TokenEvent]:
    out: list[TokenEvent] = []
    while engine.has_work:
        out += [e for e in engine.step() if e.request_id == rid]
    return out


@pytest.mark.parametrize("max_kv_size", [None, 40], ids=["growing", "rotating"])
def test_prefill_budget_changes_no_logits(qmodel: Model, max_kv_size: int | None) -> None:
    """Whole chunks, one per step or many per step (one segment each), give the same bits."""
    def engine(tokens_per_step: int) -> Engine:
        return Engine(qmodel, EngineConfig(max_batch=8, max_kv_size=max_kv_size, prefill_chunk=CHUNK,
                                           prefill_tokens_per_step=tokens_per_step, gap_target_ms=None))

    reqs = lambda: [request(i, "seeded") for i in range(len(PROMPTS))]  # noqa: E731
    small, large = run(engine(CHUNK), reqs()), run(engine(16 * CHUNK), reqs())
    for i in range(len(PROMPTS)):
        np.testing.assert_array_equal(tokens_and_logits(large[i])[1], tokens_and_logits(small[i])[1],
                                      err_msg=f"prompt {i}")


@pytest.mark.parametrize("gap_target_ms, steps", [(1e-3, 7), (None, 1)], ids=["tiny-target", "no-target"])
def test_the_gap_target_sizes_a_lone_prompts_steps(qmodel: Model, gap_target_ms: float | None,
                                                   steps: int) -> None:
    engine = Engine(qmodel, EngineConfig(prefill_chunk=CHUNK, prefill_tokens_per_step=8 * CHUNK,
                                         gap_target_ms=gap_target_ms))
    rid = engine.submit(GenerationRequest(PROMPTS[-1], 4))  # 100 tokens: 7 chunks
    for n in range(1, steps + 1):
        assert [e.request_id for e in engine.step() if e.token is not None] == ([rid] if n == steps else [])


@pytest.mark.parametrize("gap_target_ms, steps", [(1e-3, 7), (None, 1)], ids=["tiny-target", "no-target"])
def test_the_gap_target_sizes_prefill_while_streams_decode(qmodel: Model, gap_target_ms: float | None,
                                                           steps: int) -> None:
    """A target no step can meet leaves one chunk per step; without a target the prompt joins at once."""
    engine = Engine(qmodel, EngineConfig(max_batch=4, prefill_chunk=CHUNK, prefill_tokens_per_step=8 * CHUNK,
                                         gap_target_ms=gap_target_ms))
    first = engine.submit(GenerationRequest(PROMPTS[1], 40))
    engine.step()  # it now decodes
    second = engine.submit(GenerationRequest(PROMPTS[-1], 4))  # 100 tokens: 7 chunks of 16
    for n in range(1, steps + 1):
        produced = [e.request_id for e in engine.step() if e.token is not None]
        assert produced == ([first, second] if n == steps else [first])


def test_prompts_loading_together_take_the_budget_in_arrival_order(qmodel: Model) -> None:
    """One chunk a step here (a target no step meets): the first prompt loads first, then the second."""
    engine = Engine(qmodel, EngineConfig(max_batch=4, prefill_chunk=CHUNK, prefill_tokens_per_step=8 * CHUNK,
                                         gap_target_ms=1e-3))
    engine.submit(GenerationRequest(PROMPTS[0], 1))  # one step, measured
    engine.step()
    a, b = (engine.submit(GenerationRequest(PROMPTS[5], 4)) for _ in range(2))  # 45 tokens: 3 chunks each
    first_token_step = {}
    for n in range(1, 7):
        for e in engine.step():
            first_token_step.setdefault(e.request_id, n)
    assert first_token_step == {a: 3, b: 6}


def test_bad_gap_target_is_refused(qmodel: Model) -> None:
    with pytest.raises(MlxLlamaError, match="gap target"):
        Engine(qmodel, EngineConfig(gap_target_ms=0))
