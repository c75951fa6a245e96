"""Multi-turn conversations that keep their KV cache between turns."""
