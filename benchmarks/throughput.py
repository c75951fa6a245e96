#!/usr/bin/env python3
"""Token throughput of mlx-llama side by side with mlx-lm and llama.cpp, in ONE run.

Every peer runs on the same random weights (one HF checkpoint, converted to MLX
4/8-bit directories and to GGUF Q4_0/Q8_0), with the same random prompt ids,
prompt/generation lengths and thread count, each in its own subprocess (fresh
memory).  Also measured: the machine's read bandwidth (→ the decode ceiling,
bandwidth ÷ weight bytes per token) and, for the quantized-matmul engineer,
`mx.quantized_matmul` vs dequantize-to-float32-then-BLAS at prefill shapes.

    python benchmarks/throughput.py                    # llama-3.2-1b, p128 g32, default peers
    python benchmarks/throughput.py --preset llama-3.2-3b --peers mlx-llama-q4,llamacpp-q4_0
    python benchmarks/throughput.py --ablations        # + float32/bf16, OpenBLAS off, async off
    python benchmarks/throughput.py --rounds 3 --peers mlx-llama-q4,llamacpp-q4_0   # interleaved

Writes benchmarks/results/throughput-<preset>.{json,md,png}; big files go to
benchmarks/work/ (gitignored).  A peer slower than its time budget is stopped
and reported from the tokens it finished ("partial"), never silently dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PROMPT_VOCAB = 128000  # random ids stay below Llama-3's special tokens

# name: (engine, weights, settings, note).  Weights: hf (bf16 HF dir), q4/q8 (MLX dirs), gguf-*.
PEERS: dict[str, dict[str, Any]] = {
    "mlx-llama-q4": dict(engine="mlx-llama", weights="q4", note="our runtime, 4-bit g64"),
    "mlx-llama-q8": dict(engine="mlx-llama", weights="q8", note="our runtime, 8-bit g64"),
    "mlx-llama-float": dict(engine="mlx-llama", weights="hf", note="our runtime, float32 compute"),
    "mlx-lm-best-q4": dict(engine="mlx-lm", weights="q4", float32=True, openblas=True,
                           note="mlx-lm, float32 compute + OpenBLAS"),
    "mlx-lm-best-q8": dict(engine="mlx-lm", weights="q8", float32=True, openblas=True,
                           note="mlx-lm, float32 compute + OpenBLAS"),
    "mlx-lm-best-float": dict(engine="mlx-lm", weights="hf", float32=True, openblas=True,
                              note="mlx-lm, float32 compute + OpenBLAS"),
    "mlx-lm-default-q4": dict(engine="mlx-lm", weights="q4", float32=False, openblas=False, budget=45,
                              note="mlx-lm defaults (bf16 compute, reference BLAS)"),
    "mlx-lm-default-float": dict(engine="mlx-lm", weights="hf", float32=False, openblas=False, budget=45,
                                 note="mlx-lm defaults (bf16 compute, reference BLAS)"),
    "llamacpp-q4_0": dict(engine="llama.cpp", weights="gguf-q4_0", note="llama-cpp-python, Q4_0"),
    "llamacpp-q8_0": dict(engine="llama.cpp", weights="gguf-q8_0", note="llama-cpp-python, Q8_0"),
}
ABLATIONS: dict[str, dict[str, Any]] = {
    "ablate-float-bf16": dict(engine="mlx-llama", weights="hf", dtype="bfloat16", budget=90,
                              note="our runtime, bfloat16 compute (vs float32)"),
    "ablate-float-refblas": dict(engine="mlx-llama", weights="hf", openblas=False, budget=120,
                                 note="our runtime, float32, reference BLAS (MLX_LLAMA_BLAS=reference)"),
    "ablate-q4-no-async": dict(engine="mlx-llama", weights="q4", no_async=True,
                               note="our runtime, 4-bit, async_eval lookahead off"),
    "ablate-float-no-async": dict(engine="mlx-llama", weights="hf", no_async=True,
                                  note="our runtime, float32, async_eval lookahead off"),
    "ablate-float-no-gemv": dict(engine="mlx-llama", weights="hf", env={"MLX_LLAMA_BLAS_GEMV": "0"},
                                 note="our runtime, float32, M=1 sgemm not forwarded to sgemv"),
    "ablate-q4-no-gemv": dict(engine="mlx-llama", weights="q4", env={"MLX_LLAMA_BLAS_GEMV": "0"},
                              note="our runtime, 4-bit, M=1 sgemm not forwarded to sgemv"),
}
DEFAULT_PEERS = list(PEERS)


# --------------------------------------------------------------------------- preparation


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def prepare_hf(work: Path, preset: str) -> Path:
    hf = work / "hf"
    if not (hf / "config.json").exists():
        log(f"writing random {preset} checkpoint to {hf}")
        subprocess.run([sys.executable, str(HERE / "make_checkpoint.py"), str(hf), "--preset", preset],
                       check=True)
    return hf


def prepare_mlx(hf: Path, work: Path, bits: int) -> Path:
    out = work / f"mlx-q{bits}"
    if (out / "config.json").exists():
        return out
    log(f"converting to MLX {bits}-bit g64 → {out}")
    code = (
        "import sys\n"
        "try:\n"
        "    from mlx_llama.convert import convert\n"
        f"    convert({str(hf)!r}, {str(out)!r}, bits={bits}, group_size=64, log=lambda m: None)\n"
        "except ImportError:\n"
        "    import mlx_lm\n"
        f"    mlx_lm.convert({str(hf)!r}, {str(out)!r}, quantize=True, q_bits={bits}, q_group_size=64)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    return out


def prepare_mlx_lm_float32(hf: Path, work: Path) -> Path:
    """The HF checkpoint converted by mlx-lm to float32 weights: mlx-lm's fastest CPU setting."""
    out = work / "mlx-lm-f32"
    if not (out / "config.json").exists():
        log(f"converting to float32 with mlx-lm → {out}")
        code = f"import mlx_lm; mlx_lm.convert({str(hf)!r}, {str(out)!r}, dtype='float32')"
        subprocess.run([sys.executable, "-c", code], check=True)
    return out


def llama3_rope_factors(cfg: dict[str, Any], head_dim: int) -> Any:
    """llama.cpp's rope_freqs tensor for rope_type llama3 (as convert_hf_to_gguf writes it)."""
    import math

    import numpy as np

    rs = cfg.get("rope_scaling") or {}
    if rs.get("rope_type", rs.get("type")) != "llama3":
        return None
    base, factor = cfg.get("rope_theta", 10000.0), rs.get("factor", 8.0)
    low, high = rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
    old = rs.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    low_wavelen, high_wavelen = old / low, old / high
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def permute_qk(w: Any, n_head: int, n_head_kv: int | None = None) -> Any:
    """llama.cpp's row order for RoPE'd projections (convert_hf_to_gguf's LlamaModel.permute)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf_f16(hf: Path, out: Path) -> None:
    """An F16 GGUF (llama arch, Llama-3 BPE vocab) from our HF checkpoint, with the gguf package."""
    import gguf
    import mlx.core as mx
    import numpy as np

    cfg = json.loads((hf / "config.json").read_text())
    h, nq, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // nq
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("random-" + hf.parent.name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(h)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_rope_dimension_count(hd)
    w.add_head_count(nq)
    w.add_head_count_kv(nkv)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-5))
    w.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    tok = json.loads((hf / "tokenizer.json").read_text())
    vocab = dict(tok["model"]["vocab"])
    special = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    vocab.update(special)
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(cfg["vocab_size"]):
        t = by_id.get(i, f"[PAD{i}]")
        tokens.append(t)
        types.append(gguf.TokenType.CONTROL if t in special or i not in by_id else gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(str(hf), load_merges=True, n_vocab=len(tokens)).add_to_gguf(w)

    weights: dict[str, Any] = {}
    for f in sorted(hf.glob("*.safetensors")):
        weights.update(mx.load(str(f)))

    def f16(name: str) -> Any:
        return np.array(weights.pop(name).astype(mx.float16))

    def f32(name: str) -> Any:
        return np.array(weights.pop(name).astype(mx.float32))

    rope = llama3_rope_factors(cfg, hd)
    if rope is not None:
        w.add_tensor("rope_freqs.weight", rope)
    w.add_tensor("token_embd.weight", f16("model.embed_tokens.weight"))
    for i in range(cfg["num_hidden_layers"]):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", f32(p + "input_layernorm.weight"))
        w.add_tensor(b + "attn_q.weight", permute_qk(f16(p + "self_attn.q_proj.weight"), nq, nq))
        w.add_tensor(b + "attn_k.weight", permute_qk(f16(p + "self_attn.k_proj.weight"), nq, nkv))
        w.add_tensor(b + "attn_v.weight", f16(p + "self_attn.v_proj.weight"))
        w.add_tensor(b + "attn_output.weight", f16(p + "self_attn.o_proj.weight"))
        w.add_tensor(b + "ffn_norm.weight", f32(p + "post_attention_layernorm.weight"))
        w.add_tensor(b + "ffn_gate.weight", f16(p + "mlp.gate_proj.weight"))
        w.add_tensor(b + "ffn_up.weight", f16(p + "mlp.up_proj.weight"))
        w.add_tensor(b + "ffn_down.weight", f16(p + "mlp.down_proj.weight"))
    w.add_tensor("output_norm.weight", f32("model.norm.weight"))
    if "lm_head.weight" in weights:
        w.add_tensor("output.weight", f16("lm_head.weight"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def prepare_gguf_f16(hf: Path, work: Path) -> Path:
    """The F16 GGUF of `hf`, written with gguf (once; then reused)."""
    f16 = work / "model-f16.gguf"
    if not f16.exists():
        log(f"writing {f16}")
        subprocess.run([sys.executable, str(Path(__file__)), "--_write-gguf", str(hf), str(f16)], check=True)
    return f16


def prepare_gguf(hf: Path, work: Path, kind: str, threads: int) -> Path:
    """GGUF `kind` (q4_0, q8_0): F16 written with gguf, quantized by llama.cpp itself."""
    out = work / f"model-{kind}.gguf"
    if out.exists():
        return out
    f16 = prepare_gguf_f16(hf, work)
    log(f"quantizing {f16.name} → {out.name} with llama_model_quantize")
    ftype = {"q4_0": 2, "q8_0": 7}[kind]  # LLAMA_FTYPE_MOSTLY_Q4_0 / Q8_0
    code = (
        "import ctypes, llama_cpp, sys\n"
        "p = llama_cpp.llama_model_quantize_default_params()\n"
        f"p.ftype = {ftype}; p.nthread = {threads}\n"
        f"rc = llama_cpp.llama_model_quantize({str(f16).encode()!r}, {str(out).encode()!r}, ctypes.byref(p))\n"
        "sys.exit(rc)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    return out


# --------------------------------------------------------------------------- machine


def measure_read_bandwidth(threads: int, gib: float = 1.0) -> dict[str, float]:
    """Sustained read bandwidth (GB/s): numpy sums over a buffer larger than the caches."""
    import concurrent.futures as cf

    import numpy as np

    a = np.ones(int(gib * 2**30) // 4, dtype=np.float32)
    a.sum()  # fault pages in
    best: dict[str, float] = {}
    for n in sorted({1, threads}):
        parts = np.array_split(a, n)
        with cf.ThreadPoolExecutor(n) as pool:
            times = []
            for _ in range(5):
                t = time.perf_counter()
                list(pool.map(np.sum, parts))  # numpy releases the GIL in reductions
                times.append(time.perf_counter() - t)
        best[f"{n}_thread"] = a.nbytes / min(times) / 1e9
    best["best"] = max(best.values())
    return best


# --------------------------------------------------------------------------- workers (subprocesses)


def emit(**kw: Any) -> None:
    print("@@" + json.dumps(kw), flush=True)


def _timed_stream(tokens: Iterator[Any], t0: float, rep: int, n_prompt: int) -> list[float]:
    """Drive a token generator, reporting the time of each token as it comes."""
    times: list[float] = []
    for _ in tokens:
        times.append(time.perf_counter())
        if len(times) == 1:
            emit(event="first", rep=rep, ttft=times[0] - t0, n_prompt=n_prompt)
        else:
            emit(event="token", rep=rep, n=len(times), decode_s=times[-1] - times[0])
    return times


def worker(spec: dict[str, Any]) -> None:
    """Run one peer; prints '@@{json}' progress lines and a final result line."""
    import numpy as np

    engine, path = spec["engine"], spec["path"]
    n_prompt, n_gen, reps, threads = spec["n_prompt"], spec["n_gen"], spec["repetitions"], spec["threads"]
    rng = np.random.default_rng(spec["seed"])
    prompts = [rng.integers(0, PROMPT_VOCAB, size=n_prompt).tolist() for _ in range(reps)]
    info: dict[str, Any] = {}

    if engine in ("mlx-llama", "mlx-lm"):
        if spec.get("openblas", True):
            os.environ.pop("MLX_LLAMA_BLAS", None)
        else:
            os.environ["MLX_LLAMA_BLAS"] = "reference"
        from mlx_llama.kernels import blas

        blas.install()
        import mlx.core as mx
        import mlx.nn as nn

        from mlx_llama.tools.bench import qmatmul_backend, rss_bytes

        info["blas"] = blas.info().describe()
        t_load = time.perf_counter()
        if engine == "mlx-llama":
            from mlx_llama.generation import loop as gen_mod
            from mlx_llama.tools.bench import weight_bytes
            from mlx_llama.loader import load_model

            info["qmatmul"] = qmatmul_backend()
            if spec.get("no_async"):
                gen_mod._start = gen_mod._sync  # evaluate each step before yielding: no lookahead
            model = load_model(path, spec.get("dtype"))
            info["bytes_per_token"] = weight_bytes(model)["per_token"]
            info["weight_bytes"] = weight_bytes(model)["total"]

            def run(prompt: list[int], n: int) -> Iterator[Any]:
                return gen_mod.generate_tokens(model, prompt, max_tokens=n, prefill_step_size=512)
        else:
            import mlx_lm
            from mlx_lm.generate import stream_generate

            info["mlx_lm"] = mlx_lm.__version__
            model, tokenizer = mlx_lm.load(path)
            if spec.get("float32"):
                model.set_dtype(mx.float32)
            mx.eval(model.parameters())
            info["compute_dtype"] = str(model.model.norm.weight.dtype)
            total = sum(v.nbytes for _, v in nn.utils.tree_flatten(model.parameters()))
            embed = sum(v.nbytes for _, v in nn.utils.tree_flatten(model.model.embed_tokens.parameters()))
            tied = not hasattr(model, "lm_head")
            info["weight_bytes"] = total
            info["bytes_per_token"] = total if tied else total - embed

            def run(prompt: list[int], n: int) -> Iterator[Any]:
                return stream_generate(model, tokenizer, mx.array(prompt), max_tokens=n)
        info["load_s"] = time.perf_counter() - t_load

        def reset_peak() -> None:
            mx.clear_cache()
            mx.reset_peak_memory()

        def peak() -> int:
            return mx.get_peak_memory()
    elif engine == "llama.cpp":
        import llama_cpp

        from mlx_llama.tools.bench import rss_bytes

        info["llama_cpp_python"] = llama_cpp.__version__
        t_load = time.perf_counter()
        llm = llama_cpp.Llama(model_path=path, n_ctx=n_prompt + n_gen + 8, n_batch=512, n_ubatch=512,
                              n_threads=threads, n_threads_batch=threads, verbose=False)
        info["load_s"] = time.perf_counter() - t_load
        from gguf import GGUFReader

        tensors = GGUFReader(path).tensors
        info["weight_bytes"] = sum(int(t.n_bytes) for t in tensors)
        tied = not any(t.name == "output.weight" for t in tensors)
        embd = sum(int(t.n_bytes) for t in tensors if t.name == "token_embd.weight")
        info["bytes_per_token"] = info["weight_bytes"] if tied else info["weight_bytes"] - embd
        info["types"] = sorted({t.tensor_type.name for t in tensors})
        try:
            info["system_info"] = llama_cpp.llama_print_system_info().decode()
        except Exception:
            pass

        def run(prompt: list[int], n: int) -> Iterator[Any]:
            def g() -> Iterator[int]:
                for i, tok in enumerate(llm.generate(prompt, temp=0.0, top_k=1, reset=True)):
                    yield tok
                    if i + 1 >= n:
                        return
            return g()

        def reset_peak() -> None:
            pass

        def peak() -> int:
            return 0
    else:
        raise SystemExit(f"unknown engine {engine}")

    emit(event="loaded", info=info)
    # Warm-up: a short prompt and a few tokens (kernels, allocator, thread pools).
    for _ in run(prompts[0][:16], 3):
        pass
    for rep, prompt in enumerate(prompts):
        reset_peak()
        t0 = time.perf_counter()
        gen = run(prompt, n_gen)
        times = _timed_stream(gen, t0, rep, n_prompt)
        if hasattr(gen, "close"):
            gen.close()
        rss_now, rss_peak = rss_bytes()
        emit(event="rep", rep=rep, ttft=times[0] - t0, n_tokens=len(times),
             decode_s=times[-1] - times[0], peak_memory_bytes=peak(), rss_bytes=rss_now, rss_peak_bytes=rss_peak)
    if engine == "mlx-llama":
        # Python cost of one decode step: build the lazy graph for a token without evaluating it
        # (the most that mx.compile or a leaner loop could save per token).
        cache = model.make_cache()
        mx.eval(model(mx.array([prompts[0][:8]]), cache, last_only=True))
        tok = mx.array([[1]])
        t = time.perf_counter()
        outs = [model(tok, cache, last_only=True) for _ in range(16)]
        build = (time.perf_counter() - t) / 16
        mx.eval(outs)
        emit(event="overhead", graph_build_ms=build * 1e3)
    emit(event="done")


def kernels_worker(spec: dict[str, Any]) -> None:
    """mx.quantized_matmul vs dequantize→float32 BLAS vs float32 BLAS at the model's shapes."""
    from mlx_llama.kernels import blas

    blas.install()
    import mlx.core as mx

    cfg = spec["config"]
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    nq, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // nq
    shapes = {"q_proj/o_proj": (h, nq * hd), "k/v_proj": (h, nkv * hd), "gate/up_proj": (h, inter),
              "down_proj": (inter, h)}
    emit(event="loaded", info={"blas": blas.info().describe()})
    rows = []

    def timeit(fn: Callable[[], Any], budget: float = 4.0) -> float:
        mx.eval(fn())
        times, t_end = [], time.perf_counter() + budget
        while len(times) < 3 and (not times or time.perf_counter() < t_end):
            t = time.perf_counter()
            mx.eval(fn())
            times.append(time.perf_counter() - t)
        return min(times)

    for bits in (4, 8):
        for name, (k, n) in shapes.items():
            wf = mx.random.normal((n, k)) * 0.02
            wq, s, b = mx.quantize(wf, group_size=64, bits=bits)
            wd = mx.dequantize(wq, s, b, group_size=64, bits=bits)
            mx.eval(wq, s, b, wd)
            for m in spec["ms"]:
                x = mx.random.normal((m, k))
                mx.eval(x)
                flop = 2.0 * m * k * n
                qmm = timeit(lambda: mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=64, bits=bits))
                deq = timeit(lambda: x @ mx.dequantize(wq, s, b, group_size=64, bits=bits).T)
                pre = timeit(lambda: x @ wd.T)
                row = dict(bits=bits, layer=name, m=m, k=k, n=n, qmm_ms=qmm * 1e3, dequant_blas_ms=deq * 1e3,
                           float_blas_ms=pre * 1e3, qmm_gflops=flop / qmm / 1e9,
                           dequant_blas_gflops=flop / deq / 1e9, float_blas_gflops=flop / pre / 1e9)
                rows.append(row)
                emit(event="kernel", row=row)
    emit(event="kernels", rows=rows)
    emit(event="done")


# --------------------------------------------------------------------------- driver


def run_peer(name: str, spec: dict[str, Any], budget: float, load_budget: float = 240) -> dict[str, Any]:
    """Run a worker subprocess, collect its events; on timeout keep what it measured.

    `budget` counts from the end of model loading (which gets `load_budget`).
    """
    env = dict(os.environ)
    t = str(spec.get("threads", 2))
    env.update(OPENBLAS_NUM_THREADS=t, OMP_NUM_THREADS=t, MLX_LLAMA_NUM_THREADS=t, PYTHONUNBUFFERED="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(spec.get("env", {}))
    cmd = [sys.executable, str(Path(__file__)), "--_worker", json.dumps(spec)]
    log(f"running {name} (budget {budget:.0f} s)")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    events: list[dict[str, Any]] = []
    import threading

    err_lines: list[str] = []
    threading.Thread(target=lambda: err_lines.extend(proc.stderr), daemon=True).start()

    def reader() -> None:
        for line in proc.stdout:
            if line.startswith("@@"):
                events.append(json.loads(line[2:]))

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    loaded_at = None
    while th.is_alive():
        now = time.perf_counter()
        if loaded_at is None and any(e["event"] == "loaded" for e in events):
            loaded_at = now
        deadline = (loaded_at + budget) if loaded_at is not None else (t0 + load_budget)
        if now >= deadline:
            break
        th.join(min(1.0, deadline - now))
    timed_out = th.is_alive()
    if timed_out:
        proc.kill()
    proc.wait()
    th.join(5)
    spec = {**spec, "budget_s": budget}
    out: dict[str, Any] = {"name": name, "spec": spec, "wall_s": time.perf_counter() - t0, "timed_out": timed_out,
                           "returncode": proc.returncode, "events": events}
    if proc.returncode not in (0, None) and not timed_out:
        out["error"] = "".join(err_lines[-15:])
    return out


def merge_rounds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One peer's runs from several rounds as one run: repetitions pooled."""
    out = {**runs[0], "wall_s": sum(r["wall_s"] for r in runs), "timed_out": any(r["timed_out"] for r in runs),
           "events": [e for r in runs for e in r["events"]]}
    errors = [r["error"] for r in runs if "error" in r]
    if errors:
        out["error"] = errors[0]
    return out


def summarize(raw: dict[str, Any], n_prompt: int, n_gen: int) -> dict[str, Any]:
    ev = raw["events"]
    info = next((e["info"] for e in ev if e["event"] == "loaded"), {})
    reps = [e for e in ev if e["event"] == "rep"]
    s: dict[str, Any] = {"name": raw["name"], "note": raw["spec"].get("note", ""), "info": info,
                         "wall_s": raw["wall_s"], "status": "ok"}
    if "error" in raw:
        s["status"] = "error"
        s["error"] = raw["error"]
    ttfts = [e["ttft"] for e in reps]
    tgs = [(e["n_tokens"] - 1) / e["decode_s"] for e in reps if e["decode_s"] > 0]
    if not reps:
        # Partial: what the last (unfinished) repetition reached before the budget ran out.
        firsts = [e for e in ev if e["event"] == "first"]
        toks = [e for e in ev if e["event"] == "token"]
        if firsts:
            ttfts = [firsts[-1]["ttft"]]
        if toks and toks[-1]["decode_s"] > 0:
            tgs = [(toks[-1]["n"] - 1) / toks[-1]["decode_s"]]
            s["partial_tokens"] = toks[-1]["n"]
        if raw["timed_out"]:
            s["status"] = "partial" if (ttfts or tgs) else "timeout"
            if not ttfts:
                # Not even the first token within the budget: prefill is slower than this.
                budget = raw["spec"].get("budget_s", 0)
                s["pp_upper_bound_tps"] = n_prompt / budget if budget else None
    elif raw["timed_out"]:
        s["status"] = f"partial ({len(reps)} reps)"

    def stat(vals: list[float]) -> dict[str, float] | None:
        if not vals:
            return None
        return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                "values": vals}

    s["ttft_s"] = stat(ttfts)
    s["pp_tps"] = stat([n_prompt / t for t in ttfts])
    s["tg_tps"] = stat(tgs)
    bpt = info.get("bytes_per_token")
    s["bytes_per_token"] = bpt
    s["weight_bytes"] = info.get("weight_bytes")
    s["bandwidth_gbs"] = bpt * s["tg_tps"]["mean"] / 1e9 if bpt and s["tg_tps"] else None
    s["peak_memory_bytes"] = max((e["peak_memory_bytes"] for e in reps), default=None)
    s["rss_peak_bytes"] = max((e["rss_peak_bytes"] for e in reps), default=None)
    s["graph_build_ms"] = next((e["graph_build_ms"] for e in ev if e["event"] == "overhead"), None)
    return s


def fmt(d: dict[str, float] | None, digits: int = 2) -> str:
    if not d:
        return "—"
    return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}" if d["std"] else f"{d['mean']:.{digits}f}"


def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> str:
    if not a or not b or not a.get(key) or not b.get(key):
        return "—"
    return f"{a[key]['mean'] / b[key]['mean']:.2f}×"


def markdown(result: dict[str, Any]) -> str:
    m, peers = result["meta"], {p["name"]: p for p in result["peers"]}
    bw = result.get("bandwidth", {}).get("best")
    lines = [
        f"# Token throughput — {m['preset']} (random weights), p{m['n_prompt']} g{m['n_gen']}, "
        f"{m['threads']} threads, {m['repetitions']} reps" + (f" × {m['rounds']} rounds" if m.get("rounds", 1) > 1 else ""),
        "",
        f"Machine: {m['cpu']} ({m['cores']} cores), {m['date']}. Read bandwidth {bw:.1f} GB/s "
        f"(measured: numpy sums over 1 GiB). pp = prompt tokens ÷ time to first token; tg = decode tok/s.",
        "",
        "| peer | settings | weights GB | bytes/token MB | pp tok/s | tg tok/s | TTFT s | bandwidth GB/s | "
        "% of ceiling | ceiling tok/s | peak MLX GB | peak RSS GB | status |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for p in result["peers"]:
        bpt = p.get("bytes_per_token")
        ceiling = bw * 1e9 / bpt if bw and bpt else None
        pct = 100 * p["tg_tps"]["mean"] / ceiling if ceiling and p.get("tg_tps") else None
        wb = p.get("weight_bytes")
        lines.append(
            f"| {p['name']} | {p['note']} | {wb / 1e9:.2f} | " if wb else f"| {p['name']} | {p['note']} | — | "
        )
        lines[-1] += (
            f"{bpt / 1e6:.0f} | " if bpt else "— | "
        ) + (
            f"{fmt(p.get('pp_tps'))} | {fmt(p.get('tg_tps'))} | {fmt(p.get('ttft_s'), 3)} | "
            f"{p['bandwidth_gbs']:.2f} | " if p.get("bandwidth_gbs") else
            f"{fmt(p.get('pp_tps'))} | {fmt(p.get('tg_tps'))} | {fmt(p.get('ttft_s'), 3)} | — | "
        ) + (f"{pct:.0f}% | " if pct else "— | ") + (f"{ceiling:.1f} | " if ceiling else "— | ") + (
            f"{p['peak_memory_bytes'] / 1e9:.2f} | " if p.get("peak_memory_bytes") else "— | "
        ) + (f"{p['rss_peak_bytes'] / 1e9:.2f} | " if p.get("rss_peak_bytes") else "— | ") + p["status"] + " |"
    lines += ["", "## Ratios (same run)", "", "| comparison | pp | tg |", "| --- | ---: | ---: |"]
    for a, b in (("mlx-llama-q4", "mlx-lm-best-q4"), ("mlx-llama-q4", "mlx-lm-default-q4"),
                 ("mlx-llama-q8", "mlx-lm-best-q8"), ("mlx-llama-float", "mlx-lm-best-float"),
                 ("mlx-llama-q4", "llamacpp-q4_0"), ("mlx-llama-q8", "llamacpp-q8_0"),
                 ("mlx-llama-float", "ablate-float-bf16"), ("mlx-llama-float", "ablate-float-refblas"),
                 ("mlx-llama-q4", "ablate-q4-no-async"), ("mlx-llama-float", "ablate-float-no-async"),
                 ("mlx-llama-float", "ablate-float-no-gemv"), ("mlx-llama-q4", "ablate-q4-no-gemv")):
        if a in peers and b in peers:
            lines.append(f"| {a} ÷ {b} | {ratio(peers[a], peers[b], 'pp_tps')} | "
                         f"{ratio(peers[a], peers[b], 'tg_tps')} |")
    if result.get("kernels"):
        lines += ["", "## Quantized matmul at the model's shapes: mx.quantized_matmul vs dequantize→float32 BLAS",
                  "", "Times are per call (ms, best of ≤3); dequant+BLAS dequantizes the weight on every call.", "",
                  "| bits | layer | M | K×N | quantized_matmul ms (GFLOP/s) | dequant+BLAS ms (GFLOP/s) | "
                  "float32 BLAS ms (GFLOP/s) | dequant+BLAS speed-up |",
                  "| ---: | --- | ---: | --- | ---: | ---: | ---: | ---: |"]
        for r in result["kernels"]:
            lines.append(
                f"| {r['bits']} | {r['layer']} | {r['m']} | {r['k']}×{r['n']} | {r['qmm_ms']:.2f} "
                f"({r['qmm_gflops']:.1f}) | {r['dequant_blas_ms']:.2f} ({r['dequant_blas_gflops']:.1f}) | "
                f"{r['float_blas_ms']:.2f} ({r['float_blas_gflops']:.1f}) | "
                f"{r['qmm_ms'] / r['dequant_blas_ms']:.1f}× |")
    errors = [p for p in result["peers"] if p["status"] != "ok"]
    if errors:
        lines += ["", "## Peers that did not finish", ""]
        for p in errors:
            msg = p.get("error", "").strip().splitlines()[-1:] or [""]
            bound = p.get("pp_upper_bound_tps")
            lines.append(f"- {p['name']}: {p['status']} after {p['wall_s']:.0f} s"
                         f"{f' (no first token: prefill < {bound:.2f} tok/s)' if bound else ''}"
                         f"{' (partial: ' + str(p['partial_tokens']) + ' tokens decoded)' if p.get('partial_tokens') else ''}"
                         f"{': ' + msg[0] if msg[0] else ''}")
    over = [(p["name"], p["graph_build_ms"], p["tg_tps"]["mean"]) for p in result["peers"]
            if p.get("graph_build_ms") and p.get("tg_tps")]
    if over:
        lines += ["", "## Per-token Python overhead (building one decode step's lazy graph, not evaluated)", ""]
        for name, ms_, tg in over:
            lines.append(f"- {name}: {ms_:.2f} ms of {1e3 / tg:.1f} ms per token ({100 * ms_ * tg / 1e3:.1f}%)")
    for note in result.get("notes", []):
        lines.append(f"- {note}")
    lines += ["", "Environment:", ""]
    for p in result["peers"]:
        i = p["info"]
        extra = {k: i[k] for k in ("blas", "qmatmul", "compute_dtype", "mlx_lm", "llama_cpp_python", "types")
                 if k in i}
        if extra:
            lines.append(f"- {p['name']}: " + "; ".join(f"{k}: {v}" for k, v in extra.items()))
    return "\n".join(lines) + "\n"


def chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peers = [p for p in result["peers"] if p.get("pp_tps") or p.get("tg_tps")]
    names = [p["name"] for p in peers]
    colors = ["tab:blue" if n.startswith("mlx-llama") else "tab:orange" if n.startswith("mlx-lm")
              else "tab:green" if n.startswith("llamacpp") else "tab:gray" for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.45 * len(names) + 2), sharey=True)
    for ax, key, title in ((axes[0], "pp_tps", "prefill (pp) tok/s"), (axes[1], "tg_tps", "decode (tg) tok/s")):
        vals = [p[key]["mean"] if p.get(key) else 0 for p in peers]
        errs = [p[key]["std"] if p.get(key) else 0 for p in peers]
        ax.barh(names, vals, xerr=errs, color=colors)
        ax.set_xscale("log")
        ax.set_title(title)
        for y, v in enumerate(vals):
            if v:
                ax.text(v, y, f" {v:.3g}", va="center", fontsize=8)
        if key == "tg_tps":
            bw = result.get("bandwidth", {}).get("best")
            for p, y in zip(peers, range(len(peers))):
                if bw and p.get("bytes_per_token"):
                    ax.plot([bw * 1e9 / p["bytes_per_token"]], [y], "k|", markersize=12)
            ax.set_xlabel("| = bandwidth ceiling")
    axes[0].invert_yaxis()
    m = result["meta"]
    fig.suptitle(f"{m['preset']} random weights, p{m['n_prompt']} g{m['n_gen']}, {m['threads']} threads ({m['cpu']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-3.2-1b", help="llama-3.2-1b (default), llama-3.2-3b, llama-3-8b, tiny")
    ap.add_argument("-p", "--n-prompt", type=int, default=128)
    ap.add_argument("-g", "--n-gen", type=int, default=32)
    ap.add_argument("-r", "--repetitions", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the peer list this many times, interleaved (each round: every peer's reps); "
                         "repetitions are pooled, so drift in the machine's load hits every peer alike")
    ap.add_argument("-t", "--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--peers", default=",".join(DEFAULT_PEERS),
                    help=f"comma-separated, from: {', '.join(list(PEERS) + list(ABLATIONS))}")
    ap.add_argument("--ablations", action="store_true", help="also run the ablation peers")
    ap.add_argument("--no-kernels", action="store_true", help="skip the quantized-matmul microbenchmark")
    ap.add_argument("--kernel-m", default="1,128,512", help="row counts (tokens) for the kernel microbenchmark")
    ap.add_argument("--budget", type=float, default=120,
                    help="seconds per peer (after loading) before it is stopped and reported partial")
    ap.add_argument("--work", type=Path, default=HERE / "work")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    ap.add_argument("--_write-gguf", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._worker:
        spec = json.loads(args._worker)
        (kernels_worker if spec["engine"] == "kernels" else worker)(spec)
        return 0
    if args._write_gguf:
        write_gguf_f16(Path(args._write_gguf[0]), Path(args._write_gguf[1]))
        return 0

    names = [n for n in args.peers.split(",") if n]
    if args.ablations:
        names += [n for n in ABLATIONS if n not in names]
    table = {**PEERS, **ABLATIONS}
    unknown = [n for n in names if n not in table]
    if unknown:
        ap.error(f"unknown peers: {', '.join(unknown)}")

    t_start = time.perf_counter()
    work = args.work / args.preset
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    hf = prepare_hf(work, args.preset)
    cfg = json.loads((hf / "config.json").read_text())
    notes: list[str] = []
    paths: dict[str, str] = {"hf": str(hf)}
    weights_needed = {table[n]["weights"] for n in names}
    for bits in (4, 8):
        if f"q{bits}" in weights_needed:
            paths[f"q{bits}"] = str(prepare_mlx(hf, work, bits))
    llamacpp_ok = True
    if any(w.startswith("gguf") for w in weights_needed):
        try:
            import gguf  # noqa: F401
            import llama_cpp  # noqa: F401
        except ImportError as e:
            llamacpp_ok = False
            notes.append(f"llama.cpp peers not run: {e} (pip install llama-cpp-python gguf)")
        if llamacpp_ok:
            for kind in ("q4_0", "q8_0"):
                if f"gguf-{kind}" in weights_needed:
                    try:
                        paths[f"gguf-{kind}"] = str(prepare_gguf(hf, work, kind, args.threads))
                    except subprocess.CalledProcessError as e:
                        notes.append(f"GGUF {kind} could not be written: {e}")
    log(f"prepared weights in {time.perf_counter() - t_start:.0f} s")

    bandwidth = measure_read_bandwidth(args.threads)
    log(f"read bandwidth: {bandwidth}")
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names if table[n]["weights"] in paths}
    for rnd in range(args.rounds):
        for n in runs:
            p = table[n]
            # Each round its own prompts, so pooled reps are not the same prompts again.
            spec = {**p, "path": paths[p["weights"]], "n_prompt": args.n_prompt, "n_gen": args.n_gen,
                    "repetitions": args.repetitions, "threads": args.threads, "seed": args.seed + rnd}
            raw = run_peer(n, spec, min(args.budget, p.get("budget", args.budget)))
            s = summarize(raw, args.n_prompt, args.n_gen)
            log(f"  {n}: pp {fmt(s['pp_tps'])} tg {fmt(s['tg_tps'])} [{s['status']}]")
            runs[n].append(raw)
    peers = []
    for n in names:
        if n not in runs:
            peers.append({"name": n, "note": table[n]["note"], "info": {}, "status": "not run", "wall_s": 0.0})
        else:
            peers.append(summarize(merge_rounds(runs[n]), args.n_prompt, args.n_gen))
    kernels = []
    if not args.no_kernels:
        spec = {"engine": "kernels", "config": cfg, "ms": [int(x) for x in args.kernel_m.split(",")],
                "threads": args.threads}
        raw = run_peer("kernels", spec, max(args.budget, 300))
        kernels = [e["row"] for e in raw["events"] if e["event"] == "kernel"]
        if raw["timed_out"]:
            notes.append("kernel microbenchmark stopped at its time budget (partial rows)")
    result = {
        "meta": {"preset": args.preset, "n_prompt": args.n_prompt, "n_gen": args.n_gen,
                 "repetitions": args.repetitions, "rounds": args.rounds, "threads": args.threads, "cores": os.cpu_count(),
                 "cpu": _cpu_name(), "machine": platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
                 "wall_s": time.perf_counter() - t_start},
        "bandwidth": bandwidth,
        "peers": peers,
        "kernels": kernels,
        "notes": notes,
    }
    stem = args.out / f"throughput-{args.preset}"
    # (not with_suffix: preset names hold dots, e.g. llama-3.2-1b)
    Path(f"{stem}.json").write_text(json.dumps(result, indent=2))
    md = markdown(result)
    Path(f"{stem}.md").write_text(md)
    try:
        chart(result, Path(f"{stem}.png"))
    except ImportError:
        log("matplotlib missing: no chart (pip install matplotlib)")
    print(md)
    log(f"done in {time.perf_counter() - t_start:.0f} s → {stem}.{{json,md,png}}")
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
