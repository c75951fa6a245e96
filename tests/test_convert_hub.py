"""`mlx-llama convert org/name` from a pre-populated Hugging Face cache, with no network."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
from click.testing import CliRunner

from mlx_llama.cli.main import main

REVISION = "0123456789abcdef0123456789abcdef01234567"


def populate_cache(cache: Path, repo_id: str, files: Path) -> None:
    """The hub cache layout: models--org--name/{refs/main, snapshots/<rev>/...}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(files, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)


@pytest.fixture
def offline_cache(make_checkpoint: Callable[..., Path], tmp_path: Path, monkeypatch) -> Path:
    cache = tmp_path / "hf-cache"
    populate_cache(cache, "org/tiny-llama", make_checkpoint())
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return cache


def test_offline_hub_repo(offline_cache, tmp_path):
    result = CliRunner().invoke(main, ["convert", "org/tiny-llama", "--bits", "8"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "tiny-llama-8bit"
    assert (out / "config.json").is_file() and (out / "model.safetensors.index.json").is_file()


def test_offline_hub_repo_in_a_fresh_process(offline_cache, tmp_path):
    """The real entry point, with the environment set before huggingface_hub is imported."""
    env = {**os.environ, "HF_HUB_CACHE": str(offline_cache), "HF_HUB_OFFLINE": "1"}
    code = "import sys; from mlx_llama.cli.main import main; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-c", code, "convert", "org/tiny-llama", "-o", "out"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "config.json").is_file()


def test_offline_repo_not_cached(offline_cache, tmp_path):
    result = CliRunner().invoke(main, ["convert", "org/absent"])
    assert result.exit_code != 0
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("Error:") and "not in the local Hugging Face cache" in line
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf-cache"]


def test_gated_repo_message(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def gated(*args, **kwargs):
        response = SimpleNamespace(status_code=403, headers={}, request=None)
        raise GatedRepoError("403 gated", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["convert", "meta-llama/Meta-Llama-3-8B"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "accept its license" in result.output and "huggingface-cli login" in result.output


def test_neither_directory_nor_repo_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["convert", "no such thing"])
    assert result.exit_code != 0 and "neither a directory nor a Hugging Face repo id" in result.output


def test_existing_output_refused_before_any_download(offline_cache, tmp_path):
    (tmp_path / "absent-4bit").mkdir()
    result = CliRunner().invoke(main, ["convert", "org/absent"])  # not cached: a fetch would fail
    assert result.exit_code != 0 and "already exists; pass --force" in result.output
