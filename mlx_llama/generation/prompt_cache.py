"""Prompt caches on disk: the KV cache of a prompt prefix, reused across runs.

A file holds, per layer, the keys and values of token positions 0..n-1 (already
rotated by RoPE, so they are independent of the cache type that restores them),
plus metadata: a format tag, the model's fingerprint, the dtype and the n token
ids.  A file is only used when all of them match the running model, and then
only for the longest prefix its ids share with the new prompt; anything else is
reported and ignored, never trusted.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

import mlx.core as mx
import numpy as np

from mlx_llama.errors import MlxLlamaError
from mlx_llama.files import read_error, replaced_atomically
from mlx_llama.interfaces import KVCache, LanguageModel

FORMAT = "mlx-llama-prompt-cache/1"
_SAMPLE = 1 << 20  # bytes hashed from each end of every weight file
_MAX_HEADER = 100 << 20  # a safetensors header is JSON metadata: far below this


class PromptCacheMismatch(Exception):
    """The file cannot be used for this model/prompt; the message says why."""


def model_fingerprint(model_dir: str | Path) -> str:
    """A hash of config.json and, per weight file, its name, size and first/last MiB.

    Cheap even for large models, and it tells apart checkpoints with the same
    shape (different seeds, fine-tunes, re-quantizations).
    """
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    h.update((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(_SAMPLE))
            if size > 2 * _SAMPLE:
                fh.seek(size - _SAMPLE)
                h.update(fh.read(_SAMPLE))
    return h.hexdigest()


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def rollback(cache: Sequence[KVCache], n: int) -> bool:
    """Forget the last `n` tokens of every layer if that is exact; False when it is not."""
    if n == 0:
        return True
    if cache[0].offset < n or not cache[0].can_trim(n):
        return False
    return all(c.trim(n) == n for c in cache)


def prefix_state(layer_cache: KVCache, n: int) -> tuple[mx.array, mx.array] | None:
    """Keys and values of positions 0..n-1, or None when some were evicted."""
    keys, values, positions = layer_cache.state
    order = np.flatnonzero(np.asarray(positions) < n)
    if len(order) != n:
        return None
    order = order[np.argsort(np.asarray(positions)[order], kind="stable")]
    idx = mx.array(order.astype(np.int32))
    return mx.array(keys)[..., idx, :], mx.array(values)[..., idx, :]


def _stored_format(path: Path) -> str | None:
    """The format tag in a safetensors file's metadata; None when the file is not safetensors."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return None
            n = int.from_bytes(head, "little")
            if n > _MAX_HEADER:
                return None
            header = json.loads(f.read(n))
    except OSError as e:
        raise read_error(path, e) from None
    except (UnicodeDecodeError, ValueError):
        return None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta.get("format") if isinstance(meta, dict) else None


def refuse_foreign_file(path: str | Path) -> None:
    """A prompt cache file is rewritten at the end of a run: refuse one that is something else."""
    path = Path(path)
    if path.is_dir():
        raise MlxLlamaError(f"--prompt-cache {path} is a folder; give a file name")
    if path.exists() and _stored_format(path) != FORMAT:
        raise MlxLlamaError(f"--prompt-cache {path} exists and is not an mlx-llama prompt cache; "
                            "refusing to overwrite it (give a new file name)")


def save(path: str | Path, cache: Sequence[KVCache], ids: Sequence[int], *, fingerprint: str, dtype: str) -> bool:
    """Write the cache's first `len(ids)` positions; False when the cache no longer holds them all."""
    path = Path(path)
    n = len(ids)
    if n == 0:
        return False
    tensors: dict[str, mx.array] = {}
    for i, c in enumerate(cache):
        state = prefix_state(c, n)
        if state is None:
            return False
        tensors[f"layers.{i}.keys"], tensors[f"layers.{i}.values"] = state
    metadata = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "dtype": dtype,
        "num_layers": str(len(cache)),
        "token_ids": json.dumps([int(t) for t in ids]),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # mx.save_safetensors appends ".safetensors" to other names: the temporary file ends in it.
        with replaced_atomically(path, suffix=".safetensors") as tmp:
            mx.save_safetensors(tmp, tensors, metadata=metadata)
    except OSError as e:
        raise MlxLlamaError(f"cannot write the prompt cache {path}: {e.strerror or e}") from None
    except RuntimeError as e:  # MLX reports a failed write as RuntimeError
        raise MlxLlamaError(f"cannot write the prompt cache {path}: {e}") from None
    return True


def load(path: str | Path, model: LanguageModel, *, fingerprint: str, dtype: str,
         max_kv_size: int | None = None, keep: int = 4) -> tuple[list[KVCache], list[int]]:
    """A fresh cache for `model` filled from the file, and the file's token ids.

    Raises PromptCacheMismatch (with a reason) for a missing, unreadable, stale
    or foreign file.
    """
    path = Path(path)
    if not path.is_file():
        raise PromptCacheMismatch(f"{path} does not exist yet")
    try:
        tensors, meta = mx.load(str(path), format="safetensors", return_metadata=True)
    except Exception as e:  # corrupt or not safetensors
        raise PromptCacheMismatch(f"{path} is not a readable prompt cache ({e})") from None
    if meta.get("format") != FORMAT:
        raise PromptCacheMismatch(f"{path} is not an mlx-llama prompt cache")
    if meta.get("fingerprint") != fingerprint:
        raise PromptCacheMismatch(f"{path} was made with a different model")
    if meta.get("dtype") != dtype:
        raise PromptCacheMismatch(f"{path} holds {meta.get('dtype')} values, the model runs in {dtype}")
    try:
        ids = [int(t) for t in json.loads(meta.get("token_ids", ""))]
    except (ValueError, TypeError):
        raise PromptCacheMismatch(f"{path} has unreadable token ids") from None
    cfg = model.config
    expected = (1, cfg.num_key_value_heads, len(ids), cfg.head_dim)
    layers = []
    for i in range(cfg.num_hidden_layers):
        k, v = tensors.get(f"layers.{i}.keys"), tensors.get(f"layers.{i}.values")
        if k is None or v is None or tuple(k.shape) != expected or tuple(v.shape) != expected:
            raise PromptCacheMismatch(f"{path} does not fit the model's layers")
        layers.append((k, v))
    if len(tensors) != 2 * cfg.num_hidden_layers or not ids:
        raise PromptCacheMismatch(f"{path} does not fit the model's layers")
    cache = model.make_cache(max_kv_size, keep)
    for c, (k, v) in zip(cache, layers):
        # Stored keys already carry their RoPE rotation: feeding them as one chunk
        # leaves any cache type exactly as a prefill of those ids would.
        c.update_and_fetch(k, v)
    mx.eval([c.keys for c in cache] + [c.values for c in cache])
    return cache, ids


def dtype_name(model: LanguageModel) -> str:
    return str(model.dtype).replace("mlx.core.", "")


class PromptCacheFile:
    """`--prompt-cache FILE` for one run: restore the longest usable prefix, then store
    one prompt (the run's first) so the next run can reuse it."""

    def __init__(self, path: str | Path, model_dir: str | Path, model: LanguageModel,
                 notify: Callable[[str], None]) -> None:
        self.path, self.model, self.notify = Path(path), model, notify
        self.fingerprint = model_fingerprint(model_dir)
        self.dtype = dtype_name(model)
        self.stored: list[int] | None = None
        self.done = False

    def load(self, max_kv_size: int | None, keep: int) -> tuple[list[KVCache], list[int]] | None:
        try:
            cache, ids = load(self.path, self.model, fingerprint=self.fingerprint, dtype=self.dtype,
                              max_kv_size=max_kv_size, keep=keep)
        except PromptCacheMismatch as e:
            if self.path.exists():
                self.notify(f"[prompt cache ignored: {e}]")
            return None
        self.stored = ids
        self.notify(f"[prompt cache: {len(ids)} tokens loaded from {self.path}]")
        return cache, ids

    def start(self, prompt_ids: Sequence[int], max_kv_size: int | None, keep: int) -> tuple[list[KVCache], list[int]]:
        """A cache for `prompt_ids` and the ids still to feed (at least one)."""
        prompt_ids = list(prompt_ids)
        loaded = self.load(max_kv_size, keep)
        if loaded is not None:
            cache, ids = loaded
            p = min(common_prefix(ids, prompt_ids), len(prompt_ids) - 1)
            if rollback(cache, len(ids) - p):
                return cache, prompt_ids[p:]
        return self.model.make_cache(max_kv_size, keep), prompt_ids

    def store(self, cache: Sequence[KVCache], ids: Sequence[int] | None) -> None:
        """Save the cache's first `len(ids)` positions, once per run, unless the file has them."""
        if self.done or not ids:
            return
        self.done = True
        ids = list(ids)
        if ids == self.stored:
            return
        if save(self.path, cache, ids, fingerprint=self.fingerprint, dtype=self.dtype):
            self.notify(f"[prompt cache: saved {len(ids)} tokens to {self.path}]")
        else:
            self.notify("[prompt cache not saved: the rotating cache already evicted part of the prompt]")
