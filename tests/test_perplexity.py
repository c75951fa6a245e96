"""`mlx-llama perplexity`: the sliding-window value, KL vs a base model, one-line errors, kernel fidelity."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from click.testing import CliRunner
from tokenizers import Tokenizer

from conftest import STORIES260K
from mlx_llama.cli.main import main
from mlx_llama.convert import convert
from mlx_llama.generation.loop import generate_tokens
from mlx_llama.generation.sampler import Sampler, SamplingParams
from mlx_llama.kernels import extension
from mlx_llama.loader import load_model
from mlx_llama.reference.model import load_numpy_model
from mlx_llama.tools import perplexity as ppl

# The bound: the default kernel adds at most 5% to the exact kernel's KL vs the float model.
DEFAULT_KERNEL_KL_BOUND = 1.05


def run(*args: Any) -> Any:
    return CliRunner().invoke(main, ["perplexity", *map(str, args)])


def write_ids(path: Path, ids: Any) -> Path:
    path.write_text(" ".join(map(str, ids)) + "\n")
    return path


@pytest.fixture
def tiny(make_checkpoint: Callable[..., Path]) -> Path:
    return make_checkpoint()


@pytest.fixture
def ids_file(tmp_path: Path) -> Path:
    return write_ids(tmp_path / "ids.txt", np.random.default_rng(0).integers(0, 256, 40))


@pytest.mark.parametrize("ctx,stride", [(40, 20), (16, 6), (16, 16)])
def test_perplexity_is_exp_mean_nll_of_the_reference_logits(tiny: Path, ids_file: Path, ctx: int, stride: int) -> None:
    """Independent of tools/perplexity: one reference forward pass per target over exactly its window's prefix.

    The ids do not start with BOS (1), so the first window's BOS replacement counts too.
    """
    ids = ppl.read_ids(ids_file.read_text(), "ids")
    ref = load_numpy_model(tiny)
    nll = []
    for t in range(1, len(ids)):
        # The first window (starts 0, stride, ...) that holds token t, and t is not its first token.
        begin = next(b for b in range(0, t + 1, stride) if b + ctx > t)
        if begin == t:  # non-overlapping windows: a window's first token has no context there
            continue
        window = [ref.config.bos_token_id] + ids[begin + 1 : t]  # each window starts with BOS
        z = ref(np.asarray([window]), ref.make_cache())[0, -1].astype(np.float64)
        nll.append(np.log(np.sum(np.exp(z - z.max()))) + z.max() - z[ids[t]])
    expected = math.exp(float(np.mean(nll)))
    for backend in ("numpy", "mlx"):
        result = run("-m", tiny, "--ids", ids_file, "--ctx", ctx, "--stride", stride, "--backend", backend, "--json")
        assert result.exit_code == 0, result.output
        figures = json.loads(result.output)
        assert figures["scored_tokens"] == len(nll)
        assert figures["perplexity"] == pytest.approx(expected, rel=1e-4 if backend == "mlx" else 1e-5)


def test_windows_score_every_token_once() -> None:
    for n, ctx, stride in [(100, 32, 16), (100, 32, 32), (33, 32, 5), (32, 32, 16)]:
        targets = [t for w in ppl.windows(n, ctx, stride) for t in range(w.first_target, w.end)]
        assert len(targets) == len(set(targets))
        first_of_window = {w.begin for w in ppl.windows(n, ctx, stride)} if stride == ctx else set()
        assert set(targets) == set(range(1, n)) - first_of_window
        assert all(w.end - w.begin <= ctx for w in ppl.windows(n, ctx, stride))


def test_kl_of_a_model_against_itself_is_zero(tiny: Path, ids_file: Path) -> None:
    result = run("-m", tiny, "--ids", ids_file, "--ctx", 16, "--base", tiny, "--json")
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output)
    assert figures["kl_mean"] == 0.0 and figures["kl_max"] == 0.0
    assert figures["top1_agreement"] == 1.0 and figures["delta_perplexity"] == 0.0
    table = run("-m", tiny, "--ids", ids_file, "--ctx", 16, "--base", tiny, "--backend", "numpy").output
    assert "mean KL(base || model)  0.000000 ± 0.000000" in table and "top-1 agreement         100.00%" in table


def test_text_file_is_tokenized_with_bos(tiny_chat_model: Path, tmp_path: Path) -> None:
    text = tmp_path / "story.txt"
    text.write_text("Once upon a time there was a little robot who liked to count the stars. " * 3)
    result = run("-m", tiny_chat_model, "-f", text, "--ctx", 32, "--stride", 32, "--json")
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output)
    words = Tokenizer.from_file(str(tiny_chat_model / "tokenizer.json")).encode(text.read_text(), add_special_tokens=False)
    assert figures["tokens"] == 1 + len(words.ids)  # BOS, then the text
    assert figures["scored_tokens"] == figures["tokens"] - 2  # two windows of 32: neither first token


def test_bad_inputs_give_one_line_errors(tiny: Path, tiny_chat_model: Path, ids_file: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    words = tmp_path / "words.txt"
    words.write_text("1 2 three 4\n")
    out_of_range = write_ids(tmp_path / "big.txt", [1, 2, 256, 3] * 10)
    short = write_ids(tmp_path / "short.txt", [1, 2, 3])
    cases = [
        (["-m", tiny, "--ids", empty], "is empty"),
        (["-m", tiny, "--ids", short, "--ctx", 16], "fewer than one window"),
        (["-m", tiny, "--ids", ids_file, "--ctx", 1], "--ctx must be >= 2"),
        (["-m", tiny, "--ids", ids_file, "--ctx", 16, "--stride", 17], "--stride must be in"),
        (["-m", tiny, "--ids", ids_file, "--ctx", 4096], "exceeds the model's context"),
        (["-m", tiny, "--ids", words], "'three' is not an integer"),
        (["-m", tiny, "--ids", out_of_range, "--ctx", 16], "token id 256 is outside"),
        (["-m", tiny, "--ids", ids_file, "--ctx", 16, "--base", tiny_chat_model], "vocabulary (128256 tokens)"),
        (["-m", tiny, "-f", ids_file, "--ctx", 16], "has no tokenizer.json"),
        (["-m", tiny, "--ctx", 16], "exactly one of"),
        (["-m", tiny_chat_model, "-f", ids_file, "--ids", ids_file], "exactly one of"),
    ]
    for args, message in cases:
        result = run(*args)
        assert result.exit_code == 1, (args, result.output)
        assert message in result.output, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1 and result.output.startswith("Error: "), result.output


def _float_sample(path: Path, n: int) -> list[int]:
    """Text the float model itself writes (temperature 1): the distribution it was trained on, if any."""
    model = load_model(path, "float32")
    bos = model.config.bos_token_id
    sampler = Sampler(SamplingParams(temperature=1.0, seed=0))
    return [bos] + list(generate_tokens(model, [bos], max_tokens=n - 1, sampler=sampler))


@pytest.fixture(params=["random", "stories260K"])
def float_model(request: pytest.FixtureRequest, make_checkpoint: Callable[..., Path]) -> tuple[Path, list[int]]:
    if request.param == "stories260K":
        if not (STORIES260K / "model.safetensors").is_file():
            pytest.skip("../shared/fixtures/stories260K not present")
        return STORIES260K, _float_sample(STORIES260K, 256)
    return make_checkpoint(), np.random.default_rng(2).integers(0, 256, 256).tolist()


@pytest.mark.parametrize("bits,group_size", [(8, 32), (8, 64), (4, 32), (4, 64)])
def test_default_kernel_keeps_kl_within_5_percent_of_exact(float_model: tuple[Path, list[int]], bits: int,
                                                           group_size: int, tmp_path: Path, monkeypatch) -> None:
    """KL(float || quantized) under the default kernel mode ≤ 1.05 × under the exact kernel (issue 13)."""
    monkeypatch.delenv("MLX_LLAMA_QMM", raising=False)
    path, ids = float_model
    out = convert(path, tmp_path / "q", bits=bits, group_size=group_size, log=lambda msg: None)
    base, model = load_model(path, "float32"), load_model(out, "float32")
    kl = {}
    for mode in ("exact", None):  # None: no override, the default
        with extension.using_mode(mode):
            kl[mode] = float(ppl.score(model, ids, 64, 32, base=base).kl.mean())
    assert 0 < kl["exact"]
    assert kl[None] <= DEFAULT_KERNEL_KL_BOUND * kl["exact"], kl
