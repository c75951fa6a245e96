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

Tolerances (for both ratios) depend on the MLX compute dtype; the NumPy side
computes in float32 (or float64).  Float, 8-bit and 4-bit models all use the
same ones, checked through the exact quantized-matmul kernel: both sides
dequantize to identical float32 weights, so only the summation order of the
float32 products differs (~1e-6 on tiny models, ~1e-5 on a 1B model), and a
float32 tolerance of 1e-4 catches a weight that is 1% off in one layer.

The default kernel may be approximate (int8 activations, say), so it is not
held to that tolerance; `kernel_deviation` measures what it adds to the exact
kernel on the same tokens and holds that to its own bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import mlx.core as mx
import numpy as np

from mlx_llama.generation.loop import check_context
from mlx_llama.kernels import extension
from mlx_llama.generation.sampler import log_softmax

TOLERANCES = {"float32": 1e-4, "float16": 5e-2, "bfloat16": 1e-1}
# The most the default kernel may add to the exact kernel's logits (relative, as
# above).  An approximate kernel's error per matmul is bounded (int8
# activations: ~0.5% of the largest output, tests/test_qmatmul.py), but it
# compounds over the layers and is largest on random weights, so this bound
# catches a broken kernel, not a slightly worse one: fidelity is measured with
# `mlx-llama perplexity --base` (KL divergence vs the float model).
KERNEL_DEVIATION_BOUND = 0.1


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
class KernelDeviation:
    """What the default kernel adds to the exact one on the same tokens, per position."""

    kernel: str  # extension.backend_name() under the default mode
    bound: float
    logits_rel: np.ndarray  # max |default - exact| / max |exact|
    kl: np.ndarray  # KL(exact || default) of the next-token distributions
    top1_agree: np.ndarray

    @property
    def passed(self) -> bool:
        return bool(self.logits_rel.max() <= self.bound)

    def line(self) -> str:
        verdict = "within" if self.passed else "BEYOND"
        return (f"default kernel ({self.kernel}) vs exact: logits relative max {self.logits_rel.max():.3g}, "
                f"mean KL {self.kl.mean():.3g}, top-1 {int(self.top1_agree.sum())}/{len(self.top1_agree)}; "
                f"{verdict} its bound {self.bound:g}")


def default_kernel_deviation(model: Any, exact: Trace, prompt_len: int, bound: float,
                             **opts: Any) -> KernelDeviation:
    """Trace `model` under the default kernel mode on `exact`'s tokens and compare the logits."""
    with extension.using_mode(None):  # no override: $MLX_LLAMA_QMM, else the built-in default
        kernel = extension.backend_name()
        d = trace(model, exact.tokens[:prompt_len], len(exact.tokens) - prompt_len,
                  forced=exact.tokens[prompt_len:], **opts)
    lp, lq = log_softmax(exact.logits), log_softmax(d.logits)
    return KernelDeviation(
        kernel=kernel, bound=bound,
        logits_rel=_relative(d.logits, exact.logits, axis=-1),
        kl=(np.exp(lp) * (lp - lq)).sum(axis=-1),
        top1_agree=np.argmax(d.logits, -1) == np.argmax(exact.logits, -1),
    )


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
    deviation: KernelDeviation | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def first_divergent_layer(self) -> int | None:
        """Index into `hidden_rel` of the first layer beyond tolerance (0 = embeddings)."""
        bad = np.flatnonzero(self.hidden_rel > self.tolerance)
        return int(bad[0]) if len(bad) else None

    @property
    def agrees(self) -> bool:
        """Whether the MLX model agrees with the reference within tolerance."""
        return bool(self.logits_rel.max() <= self.tolerance and self.first_divergent_layer is None)

    @property
    def passed(self) -> bool:
        return self.agrees and (self.deviation is None or self.deviation.passed)

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
        if self.deviation is not None:
            out.append(self.deviation.line())
        if self.agrees:
            out.append("OK: the MLX and NumPy backends agree within tolerance")
        elif first is not None:
            out.append(f"FAIL: the backends diverge first at {layer_name(first)}")
        else:
            out.append("FAIL: the logits diverge (final norm or lm_head) though every layer agrees")
        if self.deviation is not None and not self.deviation.passed:
            out.append("FAIL: the default kernel deviates from the exact one beyond its bound")
        return out


def compare(mlx_model: Any, numpy_model: Any, prompt_ids: Sequence[int], *, tokens: int = 16,
            max_kv_size: int | None = None, keep: int = 4, prefill_step_size: int = 512,
            tolerance: float = TOLERANCES["float32"], default_kernel_bound: float | None = None) -> CheckReport:
    """Run both models on `prompt_ids` plus `tokens` greedy tokens of the MLX model and compare.

    The MLX model runs under the kernel mode in force (the caller's
    `extension.using_mode`).  With `default_kernel_bound`, it runs once more
    under the default mode (`$MLX_LLAMA_QMM`, else the built-in default) on the
    same tokens, and the report holds that run's deviation from the first one,
    which must stay within the bound.
    """
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
    if default_kernel_bound is not None:
        report.deviation = default_kernel_deviation(mlx_model, a, n, default_kernel_bound, **opts)
    ties = (~report.top1_agree) & (report.logits_rel <= tolerance)
    if ties.any():
        report.notes.append(f"note: {int(ties.sum())} top-1 disagreements are near-ties within tolerance")
    return report
