"""The conversion itself: validate, plan, stream tensor by tensor, stage, rename."""

from __future__ import annotations

import dataclasses
import errno
import json
import shutil
import time
from pathlib import Path
from typing import Callable

import mlx.core as mx

from mlx_llama.errors import MlxLlamaError
from mlx_llama.loader import DTYPES
from .layout import layer_of, module_of
from .quantize import Plan, make_plan, quantize_chunk, quantized_shapes
from .report import Report, dir_size
from .safetensors_io import OutTensor, RowReader, TensorRef
from .source import Source, open_source, source_name
from .writer import MAX_SHARD_BYTES, ShardWriter, check_output_dir, staged_output

# Copied verbatim when present: tokenizer, chat template, generation defaults.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
              "tokenizer.model", "chat_template.json", "generation_config.json")
SIDE_GLOBS = ("*.jinja", "*.tiktoken")
CHUNK_BYTES = 64 << 20  # source bytes read per step: bounds memory whatever the model size
ERROR_SAMPLE_ROWS = 1024  # rows per tensor (at least) the quantization error is measured on


def default_out_name(name: str, bits: int | None, recipe: str | None, dtype: str) -> str:
    return f"{name}-{recipe or (f'{bits}bit' if bits else dtype)}"


def convert(source: str | Path, out_dir: str | Path | None = None, *, bits: int | None = 4,
            group_size: int = 64, dtype: str | None = None, quantize: bool = True,
            recipe: str | None = None, revision: str | None = None, force: bool = False,
            log: Callable[[str], None] = print) -> Path:
    """Convert a HF LLaMA checkpoint (directory or hub repo id) to mlx-lm's layout; returns OUT_DIR."""
    return convert_with_report(source, out_dir, bits=bits, group_size=group_size, dtype=dtype,
                               quantize=quantize, recipe=recipe, revision=revision, force=force,
                               log=log).out_dir


def convert_with_report(source: str | Path, out_dir: str | Path | None = None, *, bits: int | None = 4,
                        group_size: int = 64, dtype: str | None = None, quantize: bool = True,
                        recipe: str | None = None, revision: str | None = None, force: bool = False,
                        log: Callable[[str], None] = print,
                        max_shard_bytes: int = MAX_SHARD_BYTES) -> Report:
    t0 = time.perf_counter()
    if dtype is not None and dtype not in DTYPES:
        raise MlxLlamaError(f"unknown dtype {dtype!r}: choose from {', '.join(DTYPES)}")
    if not quantize:
        bits, recipe = None, None
    if out_dir is not None or bits or recipe:  # refuse an existing OUT_DIR before any download
        early = out_dir or default_out_name(source_name(str(source)), bits, recipe, "")
        check_output_dir(Path(early), force, Path(str(source)))
    src = open_source(str(source), revision, log)
    target = dtype or src.dtype
    out = Path(out_dir) if out_dir is not None else Path.cwd() / default_out_name(src.name, bits, recipe, target)
    plan = make_plan(src.config, {k: r.shape for k, r in src.tensors.items()}, bits, group_size, recipe)
    check_output_dir(out, force, src.path)
    for name in plan.skipped:
        log(f"keeping {name} unquantized: input dim {src.tensors[name].shape[1]} "
            f"is not divisible by group size {group_size}")

    description = recipe or (f"{bits}-bit, group size {group_size}" if bits else target)
    log(f"converting {src.name} ({src.dtype}) to {description}")
    report = Report(description=description, skipped=plan.skipped)
    try:
        with staged_output(out, force) as tmp:
            _write_weights(src, plan, DTYPES[target], tmp, report, log, max_shard_bytes)
            _write_config(src, plan, target, tmp)
            _copy_side_files(src, tmp, log)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise MlxLlamaError(f"no space left on the device writing {out}; free some space "
                                "or choose another -o (nothing was left behind)") from None
        raise MlxLlamaError(f"writing {out} failed: {e.strerror or e} (nothing was left behind)") from None
    report.out_dir = out
    report.disk_bytes = dir_size(out)
    report.seconds = time.perf_counter() - t0
    return report


def _out_tensors(src: Source, plan: Plan, dtype: mx.Dtype) -> list[OutTensor]:
    specs: list[OutTensor] = []
    for name, ref in src.tensors.items():
        p = plan.params[name]
        if p is None:
            specs.append(OutTensor(name, dtype, ref.shape))
            continue
        for part, shape in quantized_shapes(ref.shape, p).items():
            specs.append(OutTensor(f"{module_of(name)}.{part}", mx.uint32 if part == "weight" else dtype, shape))
    return specs


def _write_weights(src: Source, plan: Plan, dtype: mx.Dtype, tmp: Path, report: Report,
                   log: Callable[[str], None], max_shard_bytes: int) -> None:
    report.parameters = sum(r.numel for r in src.tensors.values())
    writer = ShardWriter(tmp, _out_tensors(src, plan, dtype), report.parameters, max_shard_bytes)
    reader = RowReader()
    n_layers, last_layer = src.config.num_hidden_layers, None
    try:
        for name, ref in src.tensors.items():
            layer = layer_of(name)
            if layer is not None and layer != last_layer:
                log(f"  layer {layer + 1}/{n_layers}")
                last_layer = layer
            _convert_tensor(name, ref, plan, dtype, reader, writer, report)
        report.weight_bytes = writer.close()
    finally:
        writer.abort()
        reader.close()


def _convert_tensor(name: str, ref: TensorRef, plan: Plan, dtype: mx.Dtype, reader: RowReader,
                    writer: ShardWriter, report: Report) -> None:
    """Stream one tensor through in row chunks of about CHUNK_BYTES source bytes."""
    p = plan.params[name]
    n_rows = ref.shape[0] if len(ref.shape) > 1 else 1
    step = max(1, CHUNK_BYTES // max(1, ref.nbytes // n_rows))
    stride = max(1, n_rows // ERROR_SAMPLE_ROWS)
    err2 = ref2 = 0.0
    for start in range(0, n_rows, step):
        rows = reader.rows(ref, start, min(start + step, n_rows))
        if p is None:
            out = rows.astype(dtype)
            mx.eval(out)
            writer.write(name, out)
            continue
        parts, e2, r2 = quantize_chunk(rows, dtype, p, stride)
        mx.eval(parts, e2, r2)
        for part, arr in parts.items():
            writer.write(f"{module_of(name)}.{part}", arr)
        err2 += e2.item()
        ref2 += r2.item()
    if p is not None:
        report.add_error(name, err2, ref2)


def _write_config(src: Source, plan: Plan, dtype: str, tmp: Path) -> None:
    # Always the rope_theta + rope_scaling dialect mlx-lm reads, whatever the source wrote.
    cfg = dataclasses.replace(src.config, quantization=plan.config, torch_dtype=dtype)
    (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=4))


def _copy_side_files(src: Source, tmp: Path, log: Callable[[str], None]) -> None:
    names = [n for n in SIDE_FILES if (src.path / n).is_file()]
    names += sorted({p.name for g in SIDE_GLOBS for p in src.path.glob(g) if p.is_file()})
    for n in names:
        shutil.copyfile(src.path / n, tmp / n)  # follows the HF cache's symlinks to blobs
    if not any(n in names for n in ("tokenizer.json", "tokenizer.model")):
        log(f"warning: {src.name} has no tokenizer files; the output needs a tokenizer added to run")
    if "generation_config.json" not in names:
        cfg = src.config
        gen = {"bos_token_id": cfg.bos_token_id,
               "eos_token_id": cfg.eos_token_id[0] if len(cfg.eos_token_id) == 1 else cfg.eos_token_id}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=4))
