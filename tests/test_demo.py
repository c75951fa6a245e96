"""`mlx-llama demo`: the README's offline main job."""

from __future__ import annotations

from click.testing import CliRunner

from mlx_llama.cli.main import main


def test_demo_runs_offline_and_cross_checks(tiny_chat_model, tmp_path):
    work = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--dir", str(work), "-n", "6"])
    assert result.exit_code == 0, result.output
    assert "bits per weight" in result.output
    assert "OK: the MLX and NumPy backends agree" in result.output
    assert (work / "random-tiny-4bit" / "config.json").is_file()
    # A second run reuses the checkpoint and rewrites its own output.
    again = CliRunner().invoke(main, ["demo", "--dir", str(work), "-n", "2"])
    assert again.exit_code == 0 and "reusing" in again.output


def test_demo_refuses_a_directory_it_did_not_make(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    result = CliRunner().invoke(main, ["demo", "--dir", str(tmp_path)])
    assert result.exit_code != 0
    assert result.output.startswith("Error: ") and "not made by the demo" in result.output
    assert (tmp_path / "mine.txt").read_text() == "keep me"
