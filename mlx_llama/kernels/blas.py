"""Route MLX's CPU BLAS calls to OpenBLAS on Linux.

The Linux `mlx[cpu]` wheel links netlib's reference BLAS (float32 GEMM at a few
GFLOP/s), which makes every matmul, and so prefill, crawl.  OpenBLAS is one to
two orders of magnitude faster.  We take it from the `scipy-openblas32` wheel
(a plain PyPI dependency, no libgfortran, no system library).  That build
prefixes its symbols (`scipy_cblas_sgemm`), so preloading it cannot interpose
`cblas_sgemm`; instead, once `libmlx.so` is loaded, each of its relocation
slots for a BLAS/LAPACK function that OpenBLAS also exports is rebound to the
OpenBLAS function (the GOT/PLT entries only; nothing on disk changes).

`install()` runs when `mlx_llama` is imported, so the CLI, the library and the
tests all get it: it binds at once if `mlx.core` is already imported, else the
moment it is (an import hook), so code paths that never touch MLX (the NumPy
reference backend) do not pay for importing it.  `MLX_LLAMA_BLAS=reference` (or `off`) keeps the wheel's
reference BLAS, for comparison.

MLX runs every float matmul as `cblas_sgemm`, also the one-row products of
decoding; OpenBLAS's sgemm with M=1 runs 3-10x slower than its sgemv on this
build.  So `cblas_sgemm`'s slot is bound to a C dispatcher in our extension
(`_qmm_ext.sgemm_dispatch_address()`, csrc/blas_dispatch.cpp) that sends
one-row and one-column products to OpenBLAS's `cblas_sgemv` and everything else
to its `cblas_sgemm`: no Python and no GIL on MLX's worker thread.
`MLX_LLAMA_BLAS_GEMV=0` opts out (plain OpenBLAS sgemm); without the extension
the forward is skipped.  `OPENBLAS_NUM_THREADS` sets OpenBLAS's thread
count as usual (it defaults to the number of cores).

OpenBLAS's idle threads busy-wait 2^28 cycles (~0.1 s) after each call by
default, while our quantized kernels want the same cores: in a 4-bit prefill
(attention matmuls on OpenBLAS between kernel calls) the spinning thread took
22% of the CPU samples.  Unless `OPENBLAS_THREAD_TIMEOUT` is set, we set it to
its minimum (2^4 cycles) before OpenBLAS starts.
"""

from __future__ import annotations

import ctypes
import importlib.abc
import importlib.machinery
import os
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

ENV_VAR = "MLX_LLAMA_BLAS"
GEMV_ENV_VAR = "MLX_LLAMA_BLAS_GEMV"
_DISABLED = ("reference", "off", "none", "0", "false", "no")
_PREFIX = "scipy_"

# ELF relocation types whose slot holds a symbol's absolute address.
_SLOT_RELOCS = {
    62: (6, 7, 1),  # x86_64: GLOB_DAT, JUMP_SLOT, 64
    183: (1025, 1026, 257),  # aarch64: GLOB_DAT, JUMP_SLOT, ABS64
}


@dataclass
class BlasInfo:
    """What `setup()` did: `name` is "openblas", "reference" or "system"."""

    name: str
    library: str = ""
    version: str = ""
    threads: int = 0
    core: str = ""
    symbols: list[str] = field(default_factory=list)  # rebound in libmlx.so
    gemv_forward: bool = False  # one-row/one-column sgemm calls go to sgemv
    reason: str = ""  # why the reference BLAS stayed, if it did

    def describe(self) -> str:
        if self.name == "openblas":
            return (f"OpenBLAS {self.version} (scipy-openblas32, {self.core or 'core ?'}, "
                    f"{self.threads} threads; {len(self.symbols)} MLX BLAS/LAPACK symbols rebound"
                    f"{'; M=1 sgemm → sgemv' if self.gemv_forward else ''})")
        if self.name == "system":
            return "the platform BLAS MLX was built with (Accelerate on macOS)"
        return f"reference BLAS (netlib, bundled with mlx[cpu]){': ' + self.reason if self.reason else ''}"


_INFO: BlasInfo | None = None
_SLOTS: list[tuple[str, int, int]] = []  # (symbol, slot address, OpenBLAS function) rebound


def verify() -> bool:
    """True when every rebound slot in libmlx.so still points at OpenBLAS."""
    return bool(_SLOTS) and all(ctypes.c_void_p.from_address(a).value == f for _, a, f in _SLOTS)


class _Loader(importlib.abc.Loader):
    """Wraps mlx.core's loader: once the extension (and so libmlx.so) is loaded, bind."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec):  # type: ignore[no-untyped-def]
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:  # type: ignore[no-untyped-def]
        self.inner.exec_module(module)
        setup()


class _MlxCoreHook(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):  # type: ignore[no-untyped-def]
        if fullname != "mlx.core":
            return None
        _remove_hook()
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _MlxCoreHook)]


def install() -> None:
    """Bind now if mlx.core is loaded, else as soon as it is imported."""
    if _INFO is not None:
        return
    if "mlx.core" in sys.modules:
        setup()
    elif not any(isinstance(f, _MlxCoreHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _MlxCoreHook())


def info() -> BlasInfo:
    """The result of `setup()` (running it if needed)."""
    return _INFO if _INFO is not None else setup()


def setup() -> BlasInfo:
    """Bind MLX to OpenBLAS once per process; never raises."""
    global _INFO
    if _INFO is not None:
        return _INFO
    _remove_hook()
    if not sys.platform.startswith("linux"):
        _INFO = BlasInfo("system")
    elif os.environ.get(ENV_VAR, "").strip().lower() in _DISABLED:
        _INFO = BlasInfo("reference", reason=f"{ENV_VAR}={os.environ[ENV_VAR]}")
    else:
        try:
            _INFO = _bind_openblas()
        except Exception as e:  # a missing wheel or an odd libmlx must not stop the runner
            _INFO = BlasInfo("reference", reason=f"OpenBLAS not bound: {e}")
    return _INFO


def _bind_openblas() -> BlasInfo:
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # read when the library starts
    try:
        import scipy_openblas32
    except ImportError:
        raise RuntimeError("the scipy-openblas32 package is not installed") from None
    lib_path = Path(scipy_openblas32.get_lib_dir()) / f"lib{scipy_openblas32.get_library()}.so"
    openblas = ctypes.CDLL(str(lib_path), mode=ctypes.RTLD_GLOBAL)

    import mlx.core  # noqa: F401  (loads libmlx.so, whose slots we rebind)

    mlx_lib = _loaded_library("libmlx.so")
    if mlx_lib is None:
        raise RuntimeError("libmlx.so is not loaded")
    bound = _rebind(mlx_lib, openblas)
    if "cblas_sgemm" not in bound:
        raise RuntimeError("libmlx.so has no cblas_sgemm slot to rebind")
    gemv = os.environ.get(GEMV_ENV_VAR, "1").strip().lower() not in _DISABLED
    if gemv:
        gemv = _forward_gemv(openblas)

    def call(name: str, restype):  # optional introspection helpers
        fn = getattr(openblas, _PREFIX + name, None)
        if fn is None:
            return None
        fn.restype = restype
        return fn()

    config = call("openblas_get_config", ctypes.c_char_p) or b""
    version = config.decode().split()[1] if config.startswith(b"OpenBLAS") else ""
    core = (call("openblas_get_corename", ctypes.c_char_p) or b"").decode()
    return BlasInfo("openblas", library=str(lib_path), version=version,
                    threads=call("openblas_get_num_threads", ctypes.c_int) or 0, core=core, symbols=bound,
                    gemv_forward=gemv)


def _forward_gemv(openblas: ctypes.CDLL) -> bool:
    """Bind libmlx.so's cblas_sgemm slot to the extension's dispatcher (M=1 or N=1 → sgemv)."""
    from mlx_llama.kernels import extension

    ext = extension.module()
    if ext is None:  # built without the extension (MLX_LLAMA_SKIP_EXT=1)
        return False
    if not hasattr(ext, "sgemm_dispatch_address"):  # a stale build
        return False
    addr = {n: ctypes.cast(getattr(openblas, _PREFIX + n), ctypes.c_void_p).value
            for n in ("cblas_sgemm", "cblas_sgemv")}
    ext.set_blas_pointers(addr["cblas_sgemm"], addr["cblas_sgemv"])
    target = ext.sgemm_dispatch_address()
    for i, (name, slot, _) in enumerate(_SLOTS):
        if name == "cblas_sgemm":
            _write_slot(slot, target)
            _SLOTS[i] = (name, slot, target)
    return True


def gemv_calls() -> int:
    """sgemm calls the dispatcher has sent to sgemv in this process (0 when it is not bound)."""
    if not info().gemv_forward:
        return 0
    from mlx_llama.kernels import extension

    return int(extension.module().gemv_calls())


def set_threads(n: int) -> None:
    """Set OpenBLAS's thread count (no-op unless OpenBLAS is bound)."""
    i = info()
    if i.name != "openblas":
        return
    fn = getattr(ctypes.CDLL(i.library), _PREFIX + "openblas_set_num_threads")
    fn(ctypes.c_int(n))
    i.threads = n


def _loaded_library(basename: str) -> str | None:
    """Path of a shared library mapped into this process (from /proc/self/maps)."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and os.path.basename(parts[5].strip()) == basename:
                return parts[5].strip()
    return None


def loaded_libraries() -> list[str]:
    """Every file-backed shared object mapped into this process."""
    seen: list[str] = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and ".so" in parts[5]:
                p = parts[5].strip()
                if p not in seen:
                    seen.append(p)
    return seen


def _rebind(lib_path: str, target: ctypes.CDLL) -> list[str]:
    """Point each of `lib_path`'s symbol slots at `target`'s prefixed function; returns names."""
    data = Path(lib_path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise RuntimeError("libmlx.so is not a 64-bit little-endian ELF")
    machine = struct.unpack_from("<H", data, 18)[0]
    if machine not in _SLOT_RELOCS:
        raise RuntimeError(f"unsupported ELF machine {machine}")
    slot_types = _SLOT_RELOCS[machine]
    shoff, = struct.unpack_from("<Q", data, 40)
    shentsize, shnum = struct.unpack_from("<HH", data, 58)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    # (name, type, flags, addr, offset, size, link, info, addralign, entsize)
    SHT_RELA, SHT_DYNSYM = 4, 11
    dynsym = next((s for s in sections if s[1] == SHT_DYNSYM), None)
    if dynsym is None:
        raise RuntimeError("libmlx.so has no dynamic symbol table")
    strtab = sections[dynsym[6]]

    def sym_name(index: int) -> str:
        st_name, = struct.unpack_from("<I", data, dynsym[4] + index * 24)
        start = strtab[4] + st_name
        return data[start : data.index(b"\0", start)].decode()

    slots: list[tuple[int, str]] = []
    for sec in sections:
        if sec[1] != SHT_RELA or sec[6] is None or sections[sec[6]] is not dynsym:
            continue
        for off in range(sec[4], sec[4] + sec[5], 24):
            r_offset, r_info, _addend = struct.unpack_from("<QQq", data, off)
            if (r_info & 0xFFFFFFFF) in slot_types and r_info >> 32:
                slots.append((r_offset, sym_name(r_info >> 32)))

    base = _load_bias(lib_path)
    bound: list[str] = []
    for r_offset, name in slots:
        fn = getattr(target, _PREFIX + name, None)
        if fn is None:
            continue
        value = ctypes.cast(fn, ctypes.c_void_p).value
        _write_slot(base + r_offset, value)
        _SLOTS.append((name, base + r_offset, value))
        bound.append(name)
    return bound


def _write_slot(addr: int, value: int) -> None:
    """Store a pointer at `addr`, lifting a read-only (RELRO) page's protection for the write."""
    page = os.sysconf("SC_PAGE_SIZE")
    start = addr & ~(page - 1)
    prot = _page_protection(start)
    if not prot & 2:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        if libc.mprotect(ctypes.c_void_p(start), page, prot | 2) != 0:
            raise OSError(ctypes.get_errno(), f"mprotect failed at {addr:#x}")
        ctypes.c_void_p.from_address(addr).value = value
        libc.mprotect(ctypes.c_void_p(start), page, prot)
    else:
        ctypes.c_void_p.from_address(addr).value = value


def _page_protection(addr: int) -> int:
    """PROT_* bits of the mapping holding `addr`."""
    with open("/proc/self/maps") as f:
        for line in f:
            span, perms = line.split()[:2]
            lo, hi = (int(x, 16) for x in span.split("-"))
            if lo <= addr < hi:
                return (1 if perms[0] == "r" else 0) | (2 if perms[1] == "w" else 0) | (4 if perms[2] == "x" else 0)
    raise RuntimeError(f"address {addr:#x} is not mapped")


def _load_bias(lib_path: str) -> int:
    """The load bias (link_map.l_addr) of an already-loaded library."""
    handle = ctypes.CDLL(lib_path, mode=os.RTLD_NOLOAD | os.RTLD_GLOBAL)._handle
    # glibc's dlopen handle is the `struct link_map *`, whose first member is l_addr.
    return ctypes.c_void_p.from_address(handle).value or 0
