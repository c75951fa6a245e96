"""`mlx-llama bench` and `mlx-llama info` on a tiny random model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
from click.testing import CliRunner

from mlx_llama.cli.main import main


@pytest.fixture(scope="module")
def tiny(make_checkpoint: Callable[..., Path]) -> Path:
    return make_checkpoint()


def test_bench_json_fields_are_sane(tiny: Path) -> None:
    res = CliRunner().invoke(main, ["bench", "-m", str(tiny), "-p", "24", "-g", "6", "-r", "2", "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    assert (r["n_prompt"], r["n_gen"], r["repetitions"]) == (24, 6, 2)
    for key in ("pp_tps", "tg_tps", "ttft_s", "bandwidth_gbs"):
        assert len(r[key]["values"]) == 2
        assert r[key]["mean"] > 0 and r[key]["std"] >= 0
        assert r[key]["min"] <= r[key]["mean"] <= r[key]["max"]
    # pp counts the prompt over the time to first token.
    assert r["pp_tps"]["values"][0] == pytest.approx(24 / r["ttft_s"]["values"][0])
    # The tiny model ties its embeddings: every weight byte is read per token.
    assert r["bytes_per_token"] == r["weight_bytes"] > 0
    assert r["params"] * 4 == r["weight_bytes"]  # float32
    assert r["bandwidth_gbs"]["mean"] == pytest.approx(r["bytes_per_token"] * r["tg_tps"]["mean"] / 1e9)
    assert r["peak_memory_bytes"] > 0 and r["rss_peak_bytes"] >= r["rss_bytes"] > 0
    assert r["quantization"] == "float32"
    assert r["env"]["blas_name"] in ("openblas", "reference", "system")
    assert r["env"]["qmatmul"]


def test_bench_table_and_quantized_model(tiny: Path, tmp_path: Path) -> None:
    import mlx.core as mx
    import mlx.nn as nn

    from mlx_llama.tools.bench import count_params, run_bench, weight_bytes
    from mlx_llama.loader import load_model

    model = load_model(tiny)
    n_float = count_params(model)
    nn.quantize(model, group_size=32, bits=4)
    model.config.quantization = {"group_size": 32, "bits": 4}
    assert count_params(model) == n_float  # logical count survives packing
    wb = weight_bytes(model)
    assert wb["total"] < n_float * 4 / 4  # 4-bit plus scales is well under a quarter of float32
    r = run_bench(model, 8, 3, 1, warmup=False)
    assert r["quantization"].startswith("q4 g32")
    assert r["tg_tps"]["mean"] > 0
    mx.clear_cache()

    res = CliRunner().invoke(main, ["bench", "-m", str(tiny), "-p", "8", "-g", "3", "-r", "1", "-t", "1"])
    assert res.exit_code == 0, res.output
    assert "| pp8 |" in res.output and "| tg3 |" in res.output
    assert "time to first token" in res.output


def test_bench_rejects_bad_lengths(tiny: Path) -> None:
    res = CliRunner().invoke(main, ["bench", "-m", str(tiny), "-g", "1"])
    assert res.exit_code != 0
    assert "-g" in res.output
    res = CliRunner().invoke(main, ["bench", "-m", str(tiny), "-p", "4000", "-g", "8"])
    assert res.exit_code != 0 and "context" in res.output


def test_info_runs() -> None:
    res = CliRunner().invoke(main, ["info"])
    assert res.exit_code == 0, res.output
    assert "BLAS:" in res.output and "quantized matmul:" in res.output and "ISA:" in res.output
    res = CliRunner().invoke(main, ["info", "--json"])
    data = json.loads(res.output)
    assert data["versions"]["mlx"]
    assert data["cpu"]["cores"] >= 1
    assert data["blas"]["active"] in ("openblas", "reference", "system")
    assert data["extension"].startswith(("present", "absent"))
