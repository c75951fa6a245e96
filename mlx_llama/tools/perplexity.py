"""Perplexity over a token sequence, and how far a model's next-token distributions are from a base model's.

Scoring convention (Hugging Face's "perplexity of fixed-length models", a
sliding window): windows of `ctx` tokens start every `stride` tokens; each
window is one forward pass from an empty cache, and scores only the tokens no
earlier window scored.  So every token after the first is scored exactly once,
and (after the first window) with at least `ctx - stride` tokens of context.
`stride = ctx // 2` (the default) is close to llama.cpp's `llama-perplexity`
(which scores the second half of non-overlapping chunks); `stride = ctx` gives
non-overlapping windows that score every token but the first of each, as
`mlx_lm.perplexity` does.  As in `llama-perplexity`, the first token of
every window is replaced by the model's BOS token (when it has one), so each
window starts as the documents the model was trained on; that token is
context only, never a target.  Short windows on text that leans on long
context score worse (stories260K on its own samples: perplexity 17 with the
whole 512-token document as context, ~640 in windows of 128 every 64; the
transformers model agrees): compare models at the same --ctx.

With a base model (`llama-perplexity --kl-divergence`), both models see the
same windows and, per scored token, we record KL(base || model) of the
next-token distributions, whether their top-1 tokens agree, and both NLLs:
how a quantization recipe is chosen.  Log-probabilities are taken in float64
from the models' logits (float32 on the host), so a model compared with
itself gives KL exactly 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from mlx_llama.errors import MlxLlamaError
from mlx_llama.generation.sampler import log_softmax
from mlx_llama.interfaces import LanguageModel

ROWS_PER_CHUNK = 64  # log-softmax over the vocabulary this many positions at a time (128k vocab: 64 MB)


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) go through the model; targets [first_target, end) are scored."""

    begin: int
    end: int
    first_target: int


def windows(n_tokens: int, ctx: int, stride: int) -> list[Window]:
    """The sliding windows over `n_tokens` tokens (module docstring); the caller checks the sizes."""
    out: list[Window] = []
    scored_to = 1  # token 0 has no context: never a target
    for begin in range(0, n_tokens - 1, stride):
        end = min(begin + ctx, n_tokens)
        out.append(Window(begin, end, max(scored_to, begin + 1)))
        scored_to = end
        if end == n_tokens:
            break
    return out


def validate(tokens: Sequence[int], vocab_size: int, ctx: int, stride: int, max_positions: int) -> None:
    """One-line errors for tokens that cannot be scored in these windows."""
    if ctx < 2:
        raise MlxLlamaError("--ctx must be >= 2 (a window scores its tokens after the first)")
    if not 1 <= stride <= ctx:
        raise MlxLlamaError(f"--stride must be in [1, --ctx] = [1, {ctx}]")
    if ctx > max_positions:
        raise MlxLlamaError(f"--ctx {ctx} exceeds the model's context ({max_positions} positions)")
    if not tokens:
        raise MlxLlamaError("the input is empty: no tokens to score")
    if len(tokens) < ctx:
        raise MlxLlamaError(f"the input has {len(tokens)} tokens, fewer than one window (--ctx {ctx}): "
                            "give a longer input or a smaller --ctx")
    bad = next((i for i in tokens if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise MlxLlamaError(f"token id {bad} is outside the model's vocabulary [0, {vocab_size})")


def read_ids(text: str, source: str) -> list[int]:
    """An ids file: integers separated by whitespace and/or commas."""
    ids: list[int] = []
    for n, line in enumerate(text.splitlines(), 1):
        for tok in line.replace(",", " ").split():
            try:
                ids.append(int(tok))
            except ValueError:
                raise MlxLlamaError(f"{source}:{n}: {tok[:40]!r} is not an integer token id") from None
    return ids


def window_logits(model: LanguageModel, tokens: Sequence[int], window: Window) -> np.ndarray:
    """Float32 host logits at the positions that predict the window's targets: (n_targets, vocab)."""
    xp = model.xp
    ids = np.array(tokens[window.begin : window.end], dtype=np.int32)
    bos = model.config.bos_token_id
    if bos is not None:
        ids[0] = bos  # every window starts like a document (the first token is context only, never a target)
    out = model(xp.array(ids)[None], model.make_cache())[0]
    # Position p predicts token p + 1.
    rows = out[window.first_target - 1 - window.begin : window.end - 1 - window.begin]
    return np.asarray(rows.astype(xp.float32))


@dataclass
class Scores:
    """Per scored token: the model's NLL and, with a base, the base's NLL, KL(base || model), top-1 agreement."""

    nll: np.ndarray
    base_nll: np.ndarray | None = None
    kl: np.ndarray | None = None
    top1_agree: np.ndarray | None = None

    @property
    def perplexity(self) -> float:
        return math.exp(float(self.nll.mean()))

    @property
    def base_perplexity(self) -> float | None:
        return None if self.base_nll is None else math.exp(float(self.base_nll.mean()))


def _score_rows(logits: np.ndarray, targets: np.ndarray, base_logits: np.ndarray | None,
                ) -> tuple[np.ndarray, ...]:
    lq = log_softmax(logits)
    nll = -lq[np.arange(len(targets)), targets]
    if base_logits is None:
        return (nll,)
    lp = log_softmax(base_logits)
    base_nll = -lp[np.arange(len(targets)), targets]
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    agree = np.argmax(logits, axis=-1) == np.argmax(base_logits, axis=-1)
    return nll, base_nll, kl, agree


def score(model: LanguageModel, tokens: Sequence[int], ctx: int, stride: int, *,
          base: LanguageModel | None = None,
          progress: Callable[[Iterator[Window], int], Iterator[Window]] | None = None) -> Scores:
    """Score `tokens` with `model` (and compare with `base`) over the sliding windows.

    `progress(windows, total)` may wrap the iteration (a progress bar).
    """
    validate(tokens, model.config.vocab_size, ctx, stride, model.config.max_position_embeddings)
    if base is not None and base.config.vocab_size != model.config.vocab_size:
        raise MlxLlamaError(f"the base model's vocabulary ({base.config.vocab_size} tokens) is not this "
                            f"model's ({model.config.vocab_size}): KL needs the same tokens")
    plan = windows(len(tokens), ctx, stride)
    it: Iterator[Window] = iter(plan)
    if progress is not None:
        it = progress(it, len(plan))
    parts: list[tuple[np.ndarray, ...]] = []
    all_ids = np.asarray(tokens, dtype=np.int64)
    for w in it:
        logits = window_logits(model, tokens, w)
        base_logits = window_logits(base, tokens, w) if base is not None else None
        targets = all_ids[w.first_target : w.end]
        for r in range(0, len(targets), ROWS_PER_CHUNK):
            rows = slice(r, r + ROWS_PER_CHUNK)
            parts.append(_score_rows(logits[rows], targets[rows],
                                     None if base_logits is None else base_logits[rows]))
    columns = [np.concatenate(c) for c in zip(*parts)]
    return Scores(*columns)


def summary(scores: Scores) -> dict[str, Any]:
    """The figures `mlx-llama perplexity` prints (and writes with --json)."""
    n = len(scores.nll)
    out: dict[str, Any] = {
        "scored_tokens": n,
        "perplexity": scores.perplexity,
        "nll_mean": float(scores.nll.mean()),
        # The standard error of the mean NLL, carried to the perplexity by the delta method.
        "perplexity_stderr": scores.perplexity * float(scores.nll.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
    }
    if scores.kl is not None and scores.base_nll is not None and scores.top1_agree is not None:
        kl = scores.kl
        base_ppl = scores.base_perplexity
        out.update({
            "base_perplexity": base_ppl,
            "delta_perplexity": scores.perplexity - base_ppl,
            "perplexity_ratio": scores.perplexity / base_ppl,
            "kl_mean": float(kl.mean()),
            "kl_stderr": float(kl.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
            "kl_median": float(np.median(kl)),
            "kl_p99": float(np.percentile(kl, 99)),
            "kl_max": float(kl.max()),
            "top1_agreement": float(scores.top1_agree.mean()),
        })
    return out


def format_table(figures: dict[str, Any]) -> str:
    """A two-column summary table of `summary()`'s figures."""
    rows = [
        ("scored tokens", f"{figures['scored_tokens']}"),
        ("perplexity", f"{figures['perplexity']:.4f} ± {figures['perplexity_stderr']:.4f}"),
        ("mean NLL", f"{figures['nll_mean']:.6f}"),
    ]
    if "kl_mean" in figures:
        rows += [
            ("base perplexity", f"{figures['base_perplexity']:.4f}"),
            ("Δ perplexity", f"{figures['delta_perplexity']:+.4f} ({100 * (figures['perplexity_ratio'] - 1):+.3f}%)"),
            ("mean KL(base || model)", f"{figures['kl_mean']:.6f} ± {figures['kl_stderr']:.6f}"),
            ("median / 99% / max KL", f"{figures['kl_median']:.6f} / {figures['kl_p99']:.6f} / {figures['kl_max']:.6f}"),
            ("top-1 agreement", f"{100 * figures['top1_agreement']:.2f}%"),
        ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
