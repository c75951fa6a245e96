"""`mlx-llama info`: versions, device, active BLAS and quantized-matmul kernel, CPU features."""

from __future__ import annotations

import json
import os
import platform
import socket
from importlib import metadata
from typing import Any

import click

# CPU features that decide which SIMD kernels (ours, OpenBLAS's, llama.cpp's) can run.
_ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
              "avx_vnni", "avx512_bf16", "amx_tile", "neon", "asimd", "asimddp", "sve", "i8mm", "bf16")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def cpu_info() -> dict[str, Any]:
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "cpu model") and not model:
                    model = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {
        "model": model or platform.processor() or platform.machine(),
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "usable_cores": available_cores(),
        "isa": [f for f in _ISA_FLAGS if f in flags],
    }


def blas_libraries() -> list[str]:
    """BLAS-looking shared libraries mapped into this process."""
    from mlx_llama.kernels.blas import loaded_libraries

    try:
        libs = loaded_libraries()
    except OSError:
        return []
    return [p for p in libs if any(k in os.path.basename(p).lower() for k in ("blas", "lapack", "mkl"))]


def extension() -> str:
    """Whether the C++ extension (our CPU kernels) is installed and loads (it need not: see setup.py)."""
    from mlx_llama.kernels import extension as ext

    if not ext.available():
        return f"absent: {ext.backend_name()}"
    panels = ", AVX-512 VNNI panels for 4/8-bit" if ext.module().panel_kernels() else ""
    return f"present ({ext.module().isa()} kernels{panels})"


def collect() -> dict[str, Any]:
    import mlx.core as mx

    from mlx_llama.generation import invariance
    from mlx_llama.kernels import blas
    from mlx_llama.tools.bench import qmatmul_backend

    b = blas.info()
    env = {k: os.environ[k] for k in (blas.ENV_VAR, "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS") if k in os.environ}
    return {
        "versions": {
            "mlx-llama": _version("mlx-llama"),
            "mlx": mx.__version__,
            "mlx-lm": _version("mlx-lm"),
            "numpy": _version("numpy"),
            "scipy-openblas32": _version("scipy-openblas32"),
            "python": platform.python_version(),
        },
        "device": {"default": "cpu" if mx.default_device() == mx.cpu else "gpu",
                   "metal_available": bool(getattr(mx, "metal", None) and mx.metal.is_available())},
        "blas": {"active": b.name, "description": b.describe(), "threads": b.threads,
                 "rebound_symbols": len(b.symbols), "verified": blas.verify(), "loaded_libraries": blas_libraries()},
        "extension": extension(),
        "quantized_matmul": qmatmul_backend(),
        "batch_invariance": invariance.describe(),
        "cpu": cpu_info(),
        "env": env,
        "distributed": distributed_info(),
    }


def distributed_info() -> dict[str, Any] | None:
    """Rank, size and backend of the group `mlx.launch` (or mpirun) started this process in; None on its own."""
    from mlx_llama.distributed.group import join_group

    group = join_group(timeout=60)
    if group.backend == "none":
        return None
    return {"rank": group.rank, "size": group.size, "backend": group.backend, "host": socket.gethostname()}


@click.command("info")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info_command(as_json: bool) -> None:
    """Show versions, the MLX device, the active BLAS, the quantized-matmul kernel and CPU features."""
    data = collect()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    v = data["versions"]
    click.echo("versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val))
    click.echo(f"device: MLX default {data['device']['default']}"
               f"{' (Metal available)' if data['device']['metal_available'] else ''}")
    click.echo(f"BLAS: {data['blas']['description']}"
               f"{' [slots verified]' if data['blas']['verified'] else ''}")
    for lib in data["blas"]["loaded_libraries"]:
        click.echo(f"  loaded: {lib}")
    click.echo(f"C++ extension (CPU kernels): {data['extension']}")
    click.echo(f"quantized matmul: {data['quantized_matmul']}")
    click.echo(f"batch-invariant rows (batched engine): {data['batch_invariance']}")
    c = data["cpu"]
    click.echo(f"CPU: {c['model']} ({c['machine']}), {c['usable_cores']} of {c['cores']} cores usable")
    click.echo(f"ISA: {' '.join(c['isa']) or '?'}")
    if data["distributed"]:
        d = data["distributed"]
        click.echo(f"distributed: rank {d['rank']} of {d['size']} over {d['backend']} on {d['host']}")
    for k, val in data["env"].items():
        click.echo(f"env: {k}={val}")
