"""The package layout's promises: `--help` loads no MLX; the reference implementation imports no mlx."""

import subprocess
import sys


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_help_imports_no_mlx() -> None:
    mods = _modules_after("from click.testing import CliRunner\nfrom mlx_llama.cli.main import main\n"
                          "r = CliRunner().invoke(main, ['--help'])\nassert r.exit_code == 0 and 'generate' in r.output")
    assert not any(m == "mlx" or m.startswith("mlx.") for m in mods)


def test_reference_model_imports_no_mlx() -> None:
    mods = _modules_after("import mlx_llama.reference.model")
    assert not any(m == "mlx" or m.startswith("mlx.") for m in mods)


def test_every_listed_command_loads() -> None:
    from mlx_llama.cli.main import COMMANDS, main

    for name in COMMANDS:
        assert main.get_command(None, name).name == name


def test_public_api_is_listed_and_resolves() -> None:
    import mlx_llama

    assert {"load", "generate_tokens", "Sampler", "SamplingParams", "stream_text"} <= set(dir(mlx_llama))
    for name in mlx_llama.__all__:
        assert getattr(mlx_llama, name) is not None
