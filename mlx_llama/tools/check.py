"""Cross-check the MLX model against the NumPy reference on the same tokens.

Both models see the same token sequence: the prompt in prefill chunks, then a
greedy continuation chosen by the MLX model and fed to both one token at a time
(teacher forcing), so prefill, decode and cache eviction are all compared and a
single disagreement does not derail the rest.  Differences are measured against
the NumPy side, relative to the size of what is compared:

* logits, per position: max |mlx - numpy| / max |numpy| over the vocabulary;
* hidden states, per layer (embeddings, then each layer's output): the same
  ratio over every position, so a bad kernel or weight shows up at the first
  layer it touches.

Tolerances (for both ratios) depend on the MLX compute dtype and, for
quantized models, on the quantized-matmul kernel; the NumPy side computes in
float32 (or float64).  Float, 8-bit and 4-bit models all use the
same ones: both sides dequantize to identical float32 weights, so only the
summation order of the float32 products differs (~1e-6 on tiny models, ~1e-5
on a 1B model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import mlx.core as mx
import numpy as np

from mlx_llama.generation.loop import check_context

TOLERANCES = {"float32": 1e-3, "float16": 5e-2, "bfloat16": 1e-1}
# mlx_llama.kernels.qmatmul's default CPU kernel ("q8") quantizes activations to int8
# (~0.5% of the largest output per matmul), so quantized models compared through
# it get this looser bound; `--qmm exact` checks the float32 kernel at TOLERANCES.
Q8_TOLERANCE = 0.1


@dataclass
class Trace:
    """What one backend computed for the sequence: logits (T, V) and hidden states (layers+1, T, H)."""

    tokens: list[int]
    logits: np.ndarray
    hidden: np.ndarray


def _host(xp: Any, a: Any) -> np.ndarray:
    # float32 keeps long prompts affordable (T x 128k logits); its rounding
    # (6e-8 relative) is far below any tolerance used here.
    if xp is mx:
        return np.array(a.astype(mx.float32))
    return np.asarray(a, dtype=np.float32)


def trace(model: Any, prompt_ids: Sequence[int], n_tokens: int, *, forced: Sequence[int] | None = None,
          max_kv_size: int | None = None, keep: int = 4, prefill_step_size: int = 512) -> Trace:
    """Run `model` over the prompt (chunked) and `n_tokens` greedy (or `forced`) tokens, one at a time."""
    xp = model.xp
    cache = model.make_cache(max_kv_size, keep)
    logits: list[np.ndarray] = []
    hidden: list[list[np.ndarray]] = []

    def step(ids: Sequence[int]) -> None:
        states: list[Any] = []
        out = model(xp.array(np.asarray(ids, dtype=np.int32))[None], cache, hidden_states=states)
        logits.append(_host(xp, out[0]))
        hidden.append([_host(xp, s[0]) for s in states])

    for start in range(0, len(prompt_ids), prefill_step_size):
        step(prompt_ids[start : start + prefill_step_size])
    tokens = list(prompt_ids)
    for i in range(n_tokens):
        tok = int(forced[i]) if forced is not None else int(np.argmax(logits[-1][-1]))
        tokens.append(tok)
        step([tok])
    layers = np.stack([np.concatenate([h[i] for h in hidden]) for i in range(len(hidden[0]))])
    return Trace(tokens, np.concatenate(logits), layers)


def _relative(a: np.ndarray, ref: np.ndarray, axis: Any) -> np.ndarray:
    scale = np.max(np.abs(ref), axis=axis)
    return np.max(np.abs(a - ref), axis=axis) / np.where(scale > 0, scale, 1.0)


def layer_name(i: int) -> str:
    return "embeddings" if i == 0 else f"layer {i - 1}"


@dataclass
class CheckReport:
    prompt_len: int
    n_tokens: int
    tolerance: float
    logits_abs: np.ndarray  # per position
    logits_rel: np.ndarray  # per position
    top1_agree: np.ndarray  # per position, bool
    top5_overlap: np.ndarray  # per position, fraction of the top 5 shared
    greedy_agree: np.ndarray  # per generated token, bool
    hidden_rel: np.ndarray  # per layer (embeddings first)
    notes: list[str] = field(default_factory=list)

    @property
    def first_divergent_layer(self) -> int | None:
        """Index into `hidden_rel` of the first layer beyond tolerance (0 = embeddings)."""
        bad = np.flatnonzero(self.hidden_rel > self.tolerance)
        return int(bad[0]) if len(bad) else None

    @property
    def passed(self) -> bool:
        return bool(self.logits_rel.max() <= self.tolerance and self.first_divergent_layer is None)

    def lines(self) -> list[str]:
        T = len(self.logits_rel)
        worst = int(np.argmax(self.logits_rel))
        g = self.greedy_agree
        first_bad = np.flatnonzero(~g)
        out = [
            f"positions: {T} ({self.prompt_len} prompt + {self.n_tokens} decoded); tolerance {self.tolerance:g} relative",
            f"logits: max abs diff {self.logits_abs.max():.3g}; relative max {self.logits_rel.max():.3g} "
            f"(position {worst}), median {np.median(self.logits_rel):.3g}",
            f"top-1 agreement: {int(self.top1_agree.sum())}/{T} positions; "
            f"top-5 overlap: {100 * self.top5_overlap.mean():.1f}%",
            f"greedy continuation: {int(g.sum())}/{len(g)} tokens agree"
            + (f" (first disagreement at token {int(first_bad[0])})" if len(first_bad) else ""),
            "hidden states, max relative diff per layer:",
        ]
        first = self.first_divergent_layer
        for i, r in enumerate(self.hidden_rel):
            flag = "  <- first beyond tolerance" if i == first else ""
            out.append(f"  {layer_name(i):>12}: {r:.3g}{flag}")
        out += self.notes
        if self.passed:
            out.append("OK: the MLX and NumPy backends agree within tolerance")
        elif first is not None:
            out.append(f"FAIL: the backends diverge first at {layer_name(first)}")
        else:
            out.append("FAIL: the logits diverge (final norm or lm_head) though every layer agrees")
        return out


def compare(mlx_model: Any, numpy_model: Any, prompt_ids: Sequence[int], *, tokens: int = 16,
            max_kv_size: int | None = None, keep: int = 4, prefill_step_size: int = 512,
            tolerance: float = TOLERANCES["float32"]) -> CheckReport:
    """Run both models on `prompt_ids` plus `tokens` greedy tokens of the MLX model and compare."""
    if max_kv_size is None:
        check_context(mlx_model, len(prompt_ids) + tokens)
    opts = dict(max_kv_size=max_kv_size, keep=keep, prefill_step_size=prefill_step_size)
    a = trace(mlx_model, prompt_ids, tokens, **opts)
    b = trace(numpy_model, prompt_ids, tokens, forced=a.tokens[len(prompt_ids):], **opts)
    k = min(5, a.logits.shape[-1] - 1)
    top_a = np.argpartition(-a.logits, k, axis=-1)[:, :k]
    top_b = np.argpartition(-b.logits, k, axis=-1)[:, :k]
    overlap = np.array([len(set(x) & set(y)) / k for x, y in zip(top_a, top_b)])
    n = len(prompt_ids)
    # Token i of the continuation was chosen from the logits at position n - 1 + i.
    greedy = np.argmax(b.logits[n - 1 : n - 1 + tokens], axis=-1) == np.asarray(a.tokens[n:], dtype=np.int64)
    report = CheckReport(
        prompt_len=n, n_tokens=tokens, tolerance=tolerance,
        logits_abs=np.max(np.abs(a.logits - b.logits), axis=-1),
        logits_rel=_relative(a.logits, b.logits, axis=-1),
        top1_agree=np.argmax(a.logits, -1) == np.argmax(b.logits, -1),
        top5_overlap=overlap, greedy_agree=greedy,
        hidden_rel=_relative(a.hidden, b.hidden, axis=(1, 2)),
    )
    ties = (~report.top1_agree) & (report.logits_rel <= tolerance)
    if ties.any():
        report.notes.append(f"note: {int(ties.sum())} top-1 disagreements are near-ties within tolerance")
    return report
