"""One rank's slice of the model: some decoder layers, plus on rank 0 the embedding and the output head.

The stage's parameters carry the checkpoint's names (layer i stays
`model.layers.i`, the list is padded with None below the rank's first layer,
as mlx-lm's pipeline models do), so the common loader quantizes, casts and
fuses it exactly as it does the whole model, and per-module quantization
overrides still apply.  Only the tensors the stage holds are read from the
shards: `mx.load` maps a safetensors file lazily, tensor by tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn

from mlx_llama.config import ModelConfig
from mlx_llama.distributed.partition import StagePlan, plan_stages
from mlx_llama.interfaces import KVCache
from mlx_llama.kernels import extension
from mlx_llama.loader import DTYPES, default_dtype, load_weights_into, read_weights
from mlx_llama.model.cache import make_cache
from mlx_llama.model.llama import DecoderLayer, RMSNorm, input_embeddings, output_logits, packed_layers
from mlx_llama.model_dir import ModelDir

# Steps over at least this many tokens (prompt chunks) run their layers one evaluation each: MLX
# evaluating several layers' graph at once holds the intermediates of more than one layer (40 MB
# more at 128 tokens of the 1B shape), and that peak counts in every rank's RSS.  Decode steps
# keep one graph: there an evaluation per layer costs time and the intermediates are small.
LAYER_BY_LAYER_TOKENS = 16

# Resident memory of a loaded HF tokenizer per byte of its tokenizer.json, once what parsing it
# freed is returned (distributed.memory): the Llama-3 tokenizer (9.1 MB) keeps 45 MB on rank 0.
TOKENIZER_MEMORY_PER_FILE_BYTE = 5


class _StageBody(nn.Module):
    """The part of `LlamaModel` one rank holds, under the same attribute names."""

    def __init__(self, cfg: ModelConfig, plan: StagePlan) -> None:
        super().__init__()
        if plan.first:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.layers = [None] * plan.layers.start + [DecoderLayer(cfg) for _ in plan.layers]


class PipelineStage(nn.Module):
    """Rank `plan.rank`'s layers of the model; on rank 0 also `embed` and `logits`."""

    def __init__(self, cfg: ModelConfig, plan: StagePlan, dtype: mx.Dtype) -> None:
        super().__init__()
        self.config = cfg
        self.plan = plan
        self.compute_dtype = dtype
        self.model = _StageBody(cfg, plan)
        if plan.first and not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tensor_names: list[str] = []  # the checkpoint tensors this rank read
        self.tensor_bytes = 0

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.layers[self.plan.layers.start :]

    def make_cache(self, max_kv_size: int | None = None, keep: int = 4) -> list[KVCache]:
        """Caches for this rank's layers only."""
        return make_cache(len(self.layers), max_kv_size, keep)

    def embed(self, tokens: mx.array) -> mx.array:
        return input_embeddings(self, tokens, self.compute_dtype)

    def forward_layers(self, h: mx.array, cache: Sequence[KVCache]) -> mx.array:
        """This rank's layers over hidden states `h` (B, L, hidden), updating its caches."""
        one_by_one = h.shape[1] >= LAYER_BY_LAYER_TOKENS
        with extension.resolved():
            mask = cache[0].make_mask(h.shape[1])
            for layer, c in zip(self.layers, cache):
                h = layer(h, mask, c)
                if one_by_one:
                    mx.eval(h, *c.state[:2])
        return h

    def forward_packed_layers(self, h: mx.array, segments: Sequence[tuple[int, Sequence[KVCache]]]) -> mx.array:
        """This rank's layers over several sequences packed in `h` (1, N, hidden), as the batched engine runs them."""
        with extension.resolved():
            if h.shape[1] < LAYER_BY_LAYER_TOKENS:
                return packed_layers(self.layers, h, segments)
            for i, layer in enumerate(self.layers):
                # Layer i alone: its masks come from cache i, where cache 0 was before the step.
                h = packed_layers([layer], h, [(n, cache[i : i + 1]) for n, cache in segments])
                mx.eval(h, *[cache[i].state[0] for _, cache in segments])
        return h

    def logits(self, h: mx.array, last_only: bool) -> mx.array:
        with extension.resolved():
            return output_logits(self, h, last_only)


@dataclass(frozen=True)
class OpenedCheckpoint:
    """A model directory and the size of each tensor in its shards (only their headers read)."""

    model_dir: ModelDir
    tensor_bytes: dict[str, int]

    @classmethod
    def open(cls, path: str | Path) -> "OpenedCheckpoint":
        model_dir = ModelDir.open(path)
        # Sizes only: a lazy array kept here would keep its data alive once the stage has read it.
        return cls(model_dir, {name: t.nbytes for name, t in read_weights(model_dir).items()})

    def plans(self, size: int) -> list[StagePlan]:
        cfg = self.model_dir.config
        tokenizer = self.model_dir.path / "tokenizer.json"
        tokenizer_memory = TOKENIZER_MEMORY_PER_FILE_BYTE * tokenizer.stat().st_size if tokenizer.is_file() else 0
        return plan_stages(self.tensor_bytes, cfg.num_hidden_layers, size, cfg.tie_word_embeddings, tokenizer_memory)


def load_stage(checkpoint: OpenedCheckpoint, rank: int, size: int, dtype: str | None = None) -> PipelineStage:
    """Rank `rank` of `size`'s stage, reading only its tensors from the shards."""
    cfg = checkpoint.model_dir.config
    plan = checkpoint.plans(size)[rank]
    dtype = dtype or default_dtype()
    # An unknown dtype name is refused, with the loader's message, by load_weights_into.
    stage = PipelineStage(cfg, plan, DTYPES.get(dtype, mx.float32))
    stage.tensor_names = sorted(k for k in checkpoint.tensor_bytes if plan.holds(k, cfg.tie_word_embeddings))
    stage.tensor_bytes = sum(checkpoint.tensor_bytes[k] for k in stage.tensor_names)
    mine = set(stage.tensor_names)
    # Built in the call, so that no name here keeps the unfused q/k/v and gate/up parts alive afterwards.
    return load_weights_into(stage, checkpoint.model_dir,
                             {k: v for k, v in read_weights(checkpoint.model_dir).items() if k in mine}, dtype)
