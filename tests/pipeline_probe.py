"""Run by tests/test_pipeline.py under `mlx.launch` (or alone): greedy ids and every step's logits to an .npz.

    python pipeline_probe.py MODEL_DIR OUT_PREFIX PROMPT_IDS MAX_TOKENS MAX_KV_SIZE(-1: growing) PREFILL_STEP
        single|pipeline [engine]

With `engine`, the batched engine answers several prompts made from PROMPT_IDS
(fewer slots than prompts, prefill chunks of PREFILL_STEP tokens, so sequences
join and leave mid-run); the .npz holds each request's ids and logits rows.

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


def run_engine(model: Any, prompt_ids: list[int], max_tokens: int, max_kv: int | None, step: int) -> dict[str, Any]:
    from mlx_llama.generation.engine import Engine, EngineConfig
    from mlx_llama.generation.requests import GenerationRequest

    prompts = [prompt_ids, prompt_ids[:2], prompt_ids[::-1] + prompt_ids, prompt_ids[3:]]
    engine = Engine(model, EngineConfig(max_batch=3, max_queue=len(prompts), max_kv_size=max_kv, keep=2,
                                        prefill_chunk=step, prefill_tokens_per_step=2 * step))
    ids = [engine.submit(GenerationRequest(p, max_tokens - i, return_logits=True)) for i, p in enumerate(prompts)]
    tokens: dict[int, list[int]] = {i: [] for i in ids}
    logits: dict[int, list[np.ndarray]] = {i: [] for i in ids}
    while engine.has_work:
        for ev in engine.step():
            if ev.token is not None:
                tokens[ev.request_id].append(ev.token)
                logits[ev.request_id].append(ev.logits)
    return {**{f"ids{i}": np.array(tokens[r]) for i, r in enumerate(ids)},
            **{f"logits{i}": np.stack(logits[r]) for i, r in enumerate(ids)}}


def main() -> None:
    model_dir, out, prompt, max_tokens, max_kv, step, mode, *engine = sys.argv[1:]
    prompt_ids = [int(t) for t in prompt.split(",")]
    if mode == "single":
        from mlx_llama.loader import load_model

        model = load_model(model_dir)
    else:
        from mlx_llama.distributed.pipeline import PipelineModel, start_pipeline

        before = _rchar()
        pipe, checkpoint, _ = start_pipeline(model_dir, None, timeout=60)
        read = _rchar() - before
        with open(f"{out}.rank{pipe.group.rank}.json", "w") as f:
            json.dump({"tensors": pipe.stage.tensor_names, "bytes_read": read,
                       "tensor_bytes": pipe.stage.tensor_bytes}, f)
        if pipe.group.rank > 0:
            pipe.serve()
            return
        model = PipelineModel(pipe, checkpoint.model_dir.path, {})
    max_kv_size = None if int(max_kv) < 0 else int(max_kv)
    if engine:
        arrays = run_engine(model, prompt_ids, int(max_tokens), max_kv_size, int(step))
    else:
        rec = Recording(model)
        ids = list(generate_tokens(rec, prompt_ids, max_tokens=int(max_tokens), prefill_step_size=int(step),
                                   max_kv_size=max_kv_size, keep=2))
        arrays = {"ids": np.array(ids), **{f"logits{i}": a for i, a in enumerate(rec.logits)}}
    if mode != "single":
        pipe.stop()
    np.savez(f"{out}.npz", **arrays)


if __name__ == "__main__":
    main()
