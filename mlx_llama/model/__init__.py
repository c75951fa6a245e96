"""The LLaMA-3 model in MLX: decoder layers, RoPE, KV caches, quantized layers and the load-time weight fusion."""
