"""The `mlx-llama` command line: the click group in main.py and one module per command."""
