"""`mlx-llama convert`: Hugging Face LLaMA checkpoints to mlx-lm's (quantized) layout, streaming."""

from .pipeline import convert, convert_with_report
from .quantize import RECIPES

__all__ = ["convert", "convert_with_report", "RECIPES"]
