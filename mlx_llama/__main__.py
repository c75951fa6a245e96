"""`python -m mlx_llama` runs the `mlx-llama` command line."""

from mlx_llama.cli.main import main

if __name__ == "__main__":
    main(prog_name="mlx-llama")
