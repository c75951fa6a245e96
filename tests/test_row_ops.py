"""The per-row RoPE and attention ops of a packed step equal the per-sequence ops bit for bit.

`rope_rows` (a position per row) and `attention_rows_update` (row i writes
its key and value into its own cache, then attends to it) replace one `rope`,
one cache update and one `attention` call per sequence in `Attention.packed`;
batch invariance and the engine's agreement with the single-sequence loop
rest on their giving each row the same bits.  Checked op by op (GQA group
sizes with and without a remainder of the 4-head blocks, the generic path
for D not a multiple of 8, ring slots, varying T_i, 1 and 2 threads) and
through the model (rotating caches that wrapped at different steps, decode
rows mixed with prefill chunks, two chunks of one prompt in one step, cache
states against token-by-token updates).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import mlx.core as mx
import numpy as np
import pytest

from mlx_llama.convert import convert
from mlx_llama.kernels import extension
from mlx_llama.kernels import ops
from mlx_llama.loader import load_model
from mlx_llama.model.llama import Model

ext = extension.module()
pytestmark = pytest.mark.skipif(ext is None, reason="C++ extension not built")


@pytest.fixture(autouse=True)
def _cpu() -> Iterator[None]:
    with mx.stream(mx.cpu):
        yield


THREADS = (1, 2)  # kernel threads each op check runs with: tasks are split differently


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    before = ext.num_threads()
    yield
    ext.set_num_threads(before)


def bits(a: mx.array) -> np.ndarray:
    return np.array(a).view(np.uint32)


@pytest.mark.parametrize("threads", THREADS)
def test_rope_rows_rotates_each_row_as_rope_does_at_its_position(threads: int) -> None:
    ext.set_num_threads(threads)
    rng = np.random.default_rng(0)
    D = 64
    periods = mx.array(rng.uniform(1.0, 5e5, D // 2).astype(np.float32))
    # A strided view, as the fused q/k/v projection's split hands it over.
    fused_out = mx.array(rng.standard_normal((1, 9, 5 * D)).astype(np.float32))
    x = fused_out[..., D : 4 * D].reshape(1, 9, 3, D)
    positions = np.array([0, 7, 1, 130000, 33, 34, 35, 2, 4095], dtype=np.int32)
    y = ext.rope_rows(x, mx.array(positions), periods)
    for r, p in enumerate(positions):
        assert (bits(y[:, r : r + 1]) == bits(ext.rope(x[:, r : r + 1], int(p), periods))).all(), r
    # (B, L) rows in row-major order: row (b, l) is row b * L + l.
    x2 = x.reshape(3, 3, 3, D)
    y2 = ext.rope_rows(x2, mx.array(np.arange(9, dtype=np.int32) + 5), periods)
    assert (bits(y2[1]) == bits(ext.rope(x2[1:2], 8, periods)[0])).all()


@pytest.fixture(scope="module")
def qmodel(make_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Model:
    out = tmp_path_factory.mktemp("q4") / "model"
    convert(make_checkpoint(), out, bits=4, group_size=32, log=lambda _: None)
    return load_model(out, "float32")


def run_packed_steps(model: Model, max_kv_size: int | None) -> list[np.ndarray]:
    """Logits of a fixed schedule of packed steps: prompts of different lengths, then decode
    steps that a late prompt joins with two chunks; rotating caches wrap at different steps."""
    rng = np.random.default_rng(7)
    prompts = [list(map(int, rng.integers(3, 256, size=n))) for n in (3, 9, 14, 20, 11)]

    def fresh() -> list:
        return model.make_cache(max_kv_size, keep=2)

    caches = [fresh() for _ in prompts]
    late = len(prompts) - 1  # joins the decode rows at step 2
    active = list(range(late))  # the sequences whose rows the logits are, in row order
    segments = [(len(prompts[i]), caches[i]) for i in active]
    tokens = [t for i in active for t in prompts[i]]
    rows = [int(r) for r in np.cumsum([len(prompts[i]) for i in active]) - 1]
    step_logits = []
    for step in range(10):
        logits = model.forward_packed(mx.array([tokens]), segments, rows)
        mx.eval(logits, *[c.state[0] for _, cache in segments for c in cache])
        table = np.array(logits)
        step_logits.append(table)
        last = {i: int(row.argmax()) for i, row in zip(active, table)}
        segments = [(1, caches[i]) for i in active]
        tokens = [last[i] for i in active]
        rows = list(range(len(active)))
        if step == 2:  # the late prompt after the decode rows
            if max_kv_size is None:  # two chunks of one prompt in one step: its positions continue
                first, rest = prompts[late][:6], prompts[late][6:]
                segments += [(len(first), caches[late]), (len(rest), caches[late])]
            else:  # a rotating cache takes one chunk per step (its masks are made up front)
                segments += [(len(prompts[late]), caches[late])]
            tokens += prompts[late]
            rows.append(len(tokens) - 1)
            active.append(late)
    return step_logits


@pytest.mark.parametrize("max_kv_size", [None, 12], ids=["growing", "rotating"])
def test_packed_steps_are_bit_identical_with_and_without_the_row_ops(
        qmodel: Model, max_kv_size: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    assert ops.has_row_ops(mx.float32)
    batched = run_packed_steps(qmodel, max_kv_size)
    monkeypatch.setattr(ops, "has_row_ops", lambda dtype: False)
    per_sequence = run_packed_steps(qmodel, max_kv_size)
    assert len(batched) == len(per_sequence)
    for step, (a, b) in enumerate(zip(batched, per_sequence)):
        assert a.shape == b.shape and (a.view(np.uint32) == b.view(np.uint32)).all(), step


@pytest.mark.parametrize(
    ("H", "Hkv", "D"),
    [(8, 2, 64), (6, 2, 64), (6, 3, 16), (4, 4, 16), (4, 2, 12)],
    ids=["gqa4", "gqa3", "gqa2", "mha", "generic-d12"],
)
@pytest.mark.parametrize("threads", THREADS)
def test_attention_rows_update_writes_each_row_then_attends_as_attention_does(threads: int, H: int, Hkv: int,
                                                                             D: int) -> None:
    """Row i's key and value land in its slot of its own buffers (the next free one, or a ring
    slot inside the attended range as a full rotating cache has), nothing else changes, and row i
    gets the bits attention gives its query alone over the written buffers' first lengths[i] slots."""
    ext.set_num_threads(threads)
    rng = np.random.default_rng(H * 10 + D)
    caps, slots, lengths = [256, 8, 64, 256, 256, 16], [0, 7, 3, 130, 199, 8], [1, 8, 64, 131, 200, 9]
    N = len(caps)
    q, k, v = (mx.array(rng.standard_normal((1, N, h, D)).astype(np.float32)) for h in (H, Hkv, Hkv))
    host = [rng.standard_normal((1, Hkv, c, D)).astype(np.float32) for c in caps for _ in range(2)]
    buffers = [mx.array(b) for b in host]
    scale = D**-0.5
    y = ops.attention_rows_update(q, k, v, buffers, slots, lengths, scale)
    mx.eval(y)
    expect = [b.copy() for b in host]
    for i, s in enumerate(slots):
        expect[2 * i][0, :, s] = np.array(k)[0, i]
        expect[2 * i + 1][0, :, s] = np.array(v)[0, i]
    for got, want in zip(buffers, expect):
        np.testing.assert_array_equal(np.array(got), want)
    for i, n in enumerate(lengths):
        alone = ext.attention(q[:, i : i + 1], mx.array(expect[2 * i][:, :, :n]),
                              mx.array(expect[2 * i + 1][:, :, :n]), scale=scale, causal=False)
        assert (bits(y[:, i : i + 1]) == bits(alone)).all(), i


def test_attention_rows_update_refuses_mismatched_inputs() -> None:
    q, k = mx.zeros((1, 2, 4, 16)), mx.zeros((1, 2, 2, 16))
    buf = mx.zeros((1, 2, 8, 16))
    with pytest.raises(ValueError, match="row 0"):
        ops.attention_rows_update(q, k, k, [buf, buf, buf, buf], [8, 0], [8, 1], 0.25)
    with pytest.raises(ValueError, match="a slot and a length per row"):
        ops.attention_rows_update(q, k, k, [buf], [0], [1], 0.25)
    with pytest.raises(ValueError, match="row 1"):
        ops.attention_rows_update(q, k, k, [buf, buf, buf, mx.zeros((1, 2, 6, 16))], [0, 0], [1, 1], 0.25)
    with pytest.raises(ValueError, match="do not match"):
        ops.attention_rows_update(q, mx.zeros((1, 2, 3, 16)), k, [buf] * 4, [0, 0], [1, 1], 0.25)


@pytest.mark.parametrize("max_kv_size", [None, 6], ids=["growing", "rotating"])
def test_decode_rows_leave_each_cache_as_its_own_update_would(qmodel: Model, max_kv_size: int | None) -> None:
    """After packed decode steps whose rows write their caches in place, every cache's state
    (keys, values, positions) is bit-identical to the same tokens fed one by one through
    update_and_fetch."""
    rng = np.random.default_rng(3)
    prompts = [list(map(int, rng.integers(3, 256, size=n))) for n in (1, 4, 9)]
    packed = [qmodel.make_cache(max_kv_size, keep=2) for _ in prompts]
    alone = [qmodel.make_cache(max_kv_size, keep=2) for _ in prompts]
    for p, cp, ca in zip(prompts, packed, alone):
        mx.eval(qmodel(mx.array([p]), cp), qmodel(mx.array([p]), ca))
    for step in range(8):  # past max_kv_size: the rotating rings wrap
        tokens = [int(t) for t in rng.integers(3, 256, size=len(prompts))]
        logits = qmodel.forward_packed(mx.array([tokens]), [(1, cp) for cp in packed], list(range(len(tokens))))
        mx.eval(logits, *[c.state[0] for cp in packed for c in cp])
        for t, ca in zip(tokens, alone):
            mx.eval(qmodel(mx.array([[t]]), ca))
    for cp, ca in zip(packed, alone):
        for lp, la in zip(cp, ca):
            (kp, vp, pp), (ka, va, pa) = lp.state, la.state
            np.testing.assert_array_equal(pp, pa)
            assert (bits(kp) == bits(ka)).all() and (bits(vp) == bits(va)).all()
