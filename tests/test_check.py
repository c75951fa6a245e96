"""`mlx-llama check`: the exact kernel at a float32 tolerance, the default kernel's deviation on its own line.

These run under the kernel mode the user gets (no MLX_LLAMA_QMM override,
unlike tests/test_numpy_backend.py): the strict comparison must hold for the
exact path whatever the default is, and the default's deviation line must be
there and within its bound.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from click.testing import CliRunner

from mlx_llama.cli.main import main
from mlx_llama.kernels import extension
from mlx_llama.loader import load_model
from mlx_llama.reference.model import load_numpy_model
from mlx_llama.tools.check import KERNEL_DEVIATION_BOUND, TOLERANCES, compare

PROMPT = np.random.default_rng(1).integers(0, 256, 23).tolist()


@pytest.fixture(autouse=True)
def default_kernel_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLX_LLAMA_QMM", raising=False)


@pytest.fixture
def models(make_checkpoint: Callable[..., Path], make_quantized_dir: Callable[..., Path]) -> dict[str, Path]:
    return {"float": make_checkpoint(), "8bit-g64": make_quantized_dir(8, 64), "4bit-g32": make_quantized_dir(4, 32)}


def run_check(path: Path, *args: str) -> Any:
    return CliRunner().invoke(main, ["check", "-m", str(path), "--tokens", "8", *args])


@pytest.mark.parametrize("name", ["float", "8bit-g64", "4bit-g32"])
def test_check_passes_on_healthy_models_at_float32_tolerance(models: dict[str, Path], name: str) -> None:
    for extra in ([], ["--max-kv-size", "12", "--keep", "2", "--prefill-step-size", "5"]):
        result = run_check(models[name], *extra)
        assert result.exit_code == 0, result.output
        assert f"tolerance {TOLERANCES['float32']:g} relative" in result.output
        assert "OK: the MLX and NumPy backends agree" in result.output
        # Quantized models: the default kernel's deviation from the exact one, on its own line.
        deviation = [line for line in result.output.splitlines() if line.startswith("default kernel (")]
        assert len(deviation) == (0 if name == "float" else 1), result.output
        if deviation:
            assert f"within its bound {KERNEL_DEVIATION_BOUND:g}" in deviation[0]
            assert "float32 exact" in result.output.splitlines()[0]  # what the strict comparison ran


@pytest.mark.parametrize("name", ["8bit-g64", "4bit-g32"])
def test_kernel_default_compares_the_default_kernel_at_its_bound(models: dict[str, Path], name: str) -> None:
    result = run_check(models[name], "--kernel", "default")
    assert result.exit_code == 0, result.output
    assert f"tolerance {KERNEL_DEVIATION_BOUND:g} relative" in result.output
    with extension.using_mode(None):
        assert extension.backend_name() in result.output.splitlines()[0]
    assert "default kernel (" not in result.output  # it is what the main comparison ran


def _corrupt_one_layer(model: Any, factor: float = 1.01) -> Any:
    """Layer 1's down projection 1% off: its scales if quantized, else its weight."""
    proj = model.layers[1].mlp.down_proj
    if "scales" in proj:
        proj.scales = proj.scales * factor
    else:
        proj.weight = proj.weight * factor
    return model


@pytest.mark.parametrize("name", ["float", "8bit-g64", "4bit-g32"])
def test_one_corrupted_tensor_fails_and_names_its_layer(models: dict[str, Path], name: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A tensor 1% off on the MLX side only fails `check` at the layer it is in.

    Why in memory: the NumPy reference reads the same safetensors files, so a
    corrupted file would corrupt both sides alike and `check` (a cross-check of
    two implementations of the same weights) would rightly pass.  The bugs it
    is for make one side compute something else from the same files (a kernel
    misreading scales, a loader casting or fusing wrongly); perturbing the
    loaded MLX model's parameters is such a bug, and the NumPy side stays
    untouched.
    """
    import mlx_llama.cli.check as check_module

    monkeypatch.setattr(check_module, "load_model", lambda path, dtype=None: _corrupt_one_layer(load_model(path, dtype)))
    result = run_check(models[name], "--tokens", "4")
    assert result.exit_code == 1, result.output
    assert "FAIL: the backends diverge first at layer 1" in result.output
    assert "layer 0: " in result.output and "<- first beyond tolerance" in result.output


def test_the_old_loosened_tolerance_let_the_corruption_through(models: dict[str, Path]) -> None:
    """Why the strict default: at the old 0.1 tolerance for quantized models, the same 1% error passed."""
    path = models["4bit-g32"]
    broken = _corrupt_one_layer(load_model(path, "float32"))
    with extension.using_mode("exact"):
        strict = compare(broken, load_numpy_model(path), PROMPT, tokens=4)
        loose = compare(broken, load_numpy_model(path), PROMPT, tokens=4, tolerance=0.1)
    assert not strict.passed and strict.first_divergent_layer == 2  # index 0 is the embeddings
    assert loose.passed


def test_default_kernel_beyond_its_bound_fails(models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The deviation line counts: the int8-activation kernel cannot meet a bound of 1e-9."""
    monkeypatch.setenv("MLX_LLAMA_QMM", "q8")
    path = models["8bit-g64"]
    with extension.using_mode("exact"):
        report = compare(load_model(path, "float32"), load_numpy_model(path), PROMPT, tokens=4,
                         default_kernel_bound=1e-9)
    assert report.agrees and not report.passed
    assert report.deviation is not None and report.deviation.logits_rel.max() > 1e-9
    assert report.lines()[-1] == "FAIL: the default kernel deviates from the exact one beyond its bound"
