"""Bad inputs to `mlx-llama convert`: one-line error, non-zero exit, nothing left behind."""

from __future__ import annotations

import errno
import json
import shutil
import struct
from pathlib import Path
from typing import Callable

import mlx.core as mx
import pytest
from click.testing import CliRunner

from mlx_llama.convert import convert
from mlx_llama.convert import writer as writer_mod
from mlx_llama.convert.command import convert_command


@pytest.fixture
def src(make_checkpoint: Callable[..., Path], tmp_path: Path) -> Path:
    """A private copy of a good tiny checkpoint, free to be damaged."""
    out = tmp_path / "src"
    shutil.copytree(make_checkpoint(tie_word_embeddings=False), out)
    return out


def run_fails(src: Path, *args: str, match: str) -> str:
    """Run the command, expect a one-line error containing `match`, and no output/staging dir."""
    parent = src.parent
    before = sorted(p.name for p in parent.iterdir())
    result = CliRunner().invoke(convert_command, [str(src), "-o", str(parent / "out"), *args])
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, (AssertionError, TypeError))
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and result.output.rstrip().endswith(errors[0]), result.output
    assert match in errors[0], errors[0]
    assert sorted(p.name for p in parent.iterdir()) == before  # no out/, no hidden staging dir
    return errors[0]


def rewrite_weights(src: Path, edit: Callable[[dict[str, mx.array]], None]) -> None:
    f = src / "model.safetensors"
    weights = dict(mx.load(str(f)))
    edit(weights)
    mx.save_safetensors(str(f), weights)


def test_truncated_safetensors(src):
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    run_fails(src, match="is truncated")


def test_corrupt_header(src):
    f = src / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"\xff" * 32
    f.write_bytes(bytes(data))
    run_fails(src, match="corrupt safetensors header")


def test_header_length_beyond_file(src):
    f = src / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", len(data)) + data[8:])
    run_fails(src, match="corrupt or truncated")


def test_missing_tensor(src):
    rewrite_weights(src, lambda w: w.pop("model.layers.1.mlp.up_proj.weight"))
    run_fails(src, match="lacks 1 expected tensor(s), e.g. model.layers.1.mlp.up_proj.weight")


def test_wrong_shape(src):
    rewrite_weights(src, lambda w: w.update({"model.layers.0.self_attn.k_proj.weight": mx.zeros((16, 64))}))
    run_fails(src, match="has shape [16, 64], expected [32, 64]")


def test_unexpected_tensor(src):
    rewrite_weights(src, lambda w: w.update({"model.layers.0.self_attn.q_proj.bias": mx.zeros((64,))}))
    run_fails(src, match="does not use")


def test_harmless_extras_are_ignored(src, tmp_path):
    rewrite_weights(src, lambda w: w.update({"model.layers.0.self_attn.rotary_emb.inv_freq": mx.zeros((8,))}))
    assert convert(src, tmp_path / "ok", log=lambda m: None).is_dir()


def test_unsupported_model_type(src):
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral"}))
    run_fails(src, match="unsupported model_type 'mistral'")


def test_pickle_only_checkpoint_is_refused_unread(src):
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04 would be unpickled")
    run_fails(src, match="pickle weights (pytorch_model.bin)")


@pytest.mark.parametrize("shard", ["../model.safetensors", "/etc/passwd.safetensors", "sub/../x.safetensors"])
def test_index_shard_outside_the_source(src, shard):
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": shard}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    run_fails(src, match="not a plain file name inside the model directory")


def test_existing_output_without_force(src):
    (src.parent / "out").mkdir()
    (src.parent / "out" / "keep.txt").write_text("mine")
    run_fails(src, match="already exists; pass --force")
    assert (src.parent / "out" / "keep.txt").read_text() == "mine"


def test_output_onto_source_refused_even_with_force(src):
    result = CliRunner().invoke(convert_command, [str(src), "-o", str(src), "--force"])
    assert result.exit_code != 0 and "would replace the source" in result.output
    assert (src / "model.safetensors").is_file()


def test_disk_full_mid_conversion(src, monkeypatch):
    real, calls = writer_mod.pwrite_all, []

    def failing(fd, data, offset):
        calls.append(offset)
        if len(calls) == 12:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data, offset)

    monkeypatch.setattr(writer_mod, "pwrite_all", failing)
    run_fails(src, match="no space left")
    assert len(calls) == 12


def test_disk_full_with_force_keeps_the_old_output(src, monkeypatch):
    old = src.parent / "out"
    old.mkdir()
    (old / "config.json").write_text("{}")

    def failing(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer_mod, "pwrite_all", failing)
    run_fails(src, "--force", match="no space left")
    assert (old / "config.json").read_text() == "{}"


def test_interrupt_leaves_nothing(src, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer_mod, "pwrite_all", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(src, src.parent / "out", log=lambda m: None)
    assert sorted(p.name for p in src.parent.iterdir()) == ["src"]


@pytest.mark.parametrize("args, match", [
    (["--bits", "4", "--recipe", "mixed-4-6"], "drop --bits"),
    (["--no-quantize", "--bits", "8"], "drop --bits/--recipe"),
])
def test_conflicting_flags(src, args, match):
    run_fails(src, *args, match=match)


def test_index_disagrees_with_shard_headers(src):
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model.safetensors",
                                            "model.norm.weight": "other.safetensors"}}
    (src / "other.safetensors").write_bytes(b"")
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    run_fails(src, match="truncated")  # the empty shard is caught first
    mx.save_safetensors(str(src / "other.safetensors"), {"x": mx.zeros((1,))})
    run_fails(src, match="puts model.norm.weight in other.safetensors")
