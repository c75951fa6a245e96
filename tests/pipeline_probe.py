"""Run by tests/test_pipeline.py under `mlx.launch` (or alone): greedy ids and every step's logits to an .npz.

    python pipeline_probe.py MODEL_DIR OUT_PREFIX PROMPT_IDS MAX_TOKENS MAX_KV_SIZE(-1: growing) PREFILL_STEP single|pipeline

Each rank of a pipeline also writes OUT_PREFIX.rank<r>.json: the tensors it read
and the bytes it read from disk while loading (/proc/self/io rchar).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_llama.generation.loop import generate_tokens


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar"))


class Recording:
    """A LanguageModel that keeps a copy of every logits array the loop receives."""

    def __init__(self, model: Any) -> None:
        self.model, self.logits = model, []
        self.config, self.xp, self.dtype = model.config, model.xp, model.dtype

    def make_cache(self, max_kv_size: int | None = None, keep: int = 4) -> list:
        return self.model.make_cache(max_kv_size, keep)

    def __call__(self, tokens: mx.array, cache: Any = None, *, last_only: bool = False) -> mx.array:
        out = self.model(tokens, cache, last_only=last_only)
        self.logits.append(np.array(out))
        return out


def main() -> None:
    model_dir, out, prompt, max_tokens, max_kv, step, mode = sys.argv[1:]
    prompt_ids = [int(t) for t in prompt.split(",")]
    if mode == "single":
        from mlx_llama.loader import load_model

        model = load_model(model_dir)
    else:
        from mlx_llama.distributed.pipeline import PipelineModel, start_pipeline

        before = _rchar()
        pipe, checkpoint = start_pipeline(model_dir, None, timeout=60)
        read = _rchar() - before
        with open(f"{out}.rank{pipe.group.rank}.json", "w") as f:
            json.dump({"tensors": pipe.stage.tensor_names, "bytes_read": read,
                       "tensor_bytes": pipe.stage.tensor_bytes}, f)
        if pipe.group.rank > 0:
            pipe.serve()
            return
        model = PipelineModel(pipe, checkpoint.model_dir.path, {})
    rec = Recording(model)
    ids = list(generate_tokens(rec, prompt_ids, max_tokens=int(max_tokens), prefill_step_size=int(step),
                               max_kv_size=None if int(max_kv) < 0 else int(max_kv), keep=2))
    if mode != "single":
        pipe.stop()
    np.savez(f"{out}.npz", ids=np.array(ids), **{f"logits{i}": a for i, a in enumerate(rec.logits)})


if __name__ == "__main__":
    main()
