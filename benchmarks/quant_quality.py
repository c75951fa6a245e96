#!/usr/bin/env python3
"""Quantization quality and speed by bits × group size × kernel mode: KL vs float, top-1, tok/s.

    python benchmarks/quant_quality.py                       # stories260K + random 1B shape
    python benchmarks/quant_quality.py --models stories260K --rounds 3

For each model, the float checkpoint is converted (mlx_llama.convert) to every
bits × group size; each quantized model is then scored under each kernel mode
(`default`: no MLX_LLAMA_QMM, whatever the build's default is; `exact`; `q8`)
against the float model on the same tokens with `mlx_llama.tools.perplexity`
(what `mlx-llama perplexity --base` reports: mean KL(float || quantized) of
the next-token distributions, top-1 agreement, Δ-perplexity), and timed with
`mlx-llama bench --json` in a subprocess per mode.  Speed ratios come from
interleaved rounds (every configuration once per round, in turn), medians over
rounds.

Tokens: stories260K (a trained model without a tokenizer) is scored on text it
samples itself from the float model (temperature 1, seed 0: in-distribution
text); the random 1B-shaped model has no distribution worth sampling, so it is
scored on uniform random ids (seed 0).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from mlx_llama.convert import convert
from mlx_llama.generation.loop import generate_tokens
from mlx_llama.generation.sampler import Sampler, SamplingParams
from mlx_llama.kernels import extension
from mlx_llama.loader import load_model
from mlx_llama.tools import perplexity as ppl
from mlx_llama.tools.random_checkpoint import make_config, write_checkpoint

HERE = Path(__file__).resolve().parent
STORIES260K = HERE.parent.parent / "shared" / "fixtures" / "stories260K"
MODES = ("default", "exact", "q8")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def float_source(name: str, work: Path) -> Path:
    if name == "stories260K":
        if not (STORIES260K / "model.safetensors").is_file():
            raise SystemExit(f"{STORIES260K} not present")
        return STORIES260K
    hf = work / name / "hf"
    if not (hf / "config.json").exists():
        log(f"writing a random {name} checkpoint to {hf}")
        write_checkpoint(hf, make_config(name), seed=0, dtype="bfloat16", tokenizer=False)
    return hf


def token_ids(name: str, source: Path, n: int) -> tuple[list[int], str]:
    if name == "stories260K":
        model = load_model(source, "float32")
        bos = model.config.bos_token_id
        sampler = Sampler(SamplingParams(temperature=1.0, seed=0))
        ids = [bos] + list(generate_tokens(model, [bos], max_tokens=n - 1, sampler=sampler))
        return ids, "sampled from the float model (temperature 1, seed 0)"
    vocab = make_config(name)["vocab_size"]
    return np.random.default_rng(0).integers(0, vocab, n).tolist(), "uniform random ids (seed 0)"


def quantized(source: Path, work: Path, name: str, bits: int, group_size: int) -> Path:
    out = work / name / f"q{bits}-g{group_size}"
    if not (out / "config.json").exists():
        log(f"converting {name} to {bits}-bit g{group_size}")
        out.parent.mkdir(parents=True, exist_ok=True)
        convert(source, out, bits=bits, group_size=group_size, log=lambda msg: None, force=True)
    return out


class RunOnce:
    """The float base model, run once per window: every recipe and kernel mode is compared with the same logits."""

    def __init__(self, model: Any) -> None:
        self.model, self.config, self.xp = model, model.config, model.xp
        self._logits: dict[bytes, Any] = {}

    def make_cache(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.make_cache(*args, **kwargs)

    def __call__(self, tokens: Any, cache: Any = None, **kwargs: Any) -> Any:
        key = np.asarray(tokens).tobytes()
        if key not in self._logits:
            self._logits[key] = self.model(tokens, cache, **kwargs)
        return self._logits[key]


def mode_override(mode: str) -> str | None:
    return None if mode == "default" else mode


def quality(model_dir: Path, base: Any, ids: list[int], ctx: int, stride: int,
            modes: list[str]) -> dict[str, dict[str, Any]]:
    model = load_model(model_dir, "float32")
    out = {}
    for mode in modes:
        with extension.using_mode(mode_override(mode)):
            kernel = extension.backend_name()
            figures = ppl.summary(ppl.score(model, ids, ctx, stride, base=base))
        out[mode] = {"kernel": kernel, **figures}
        log(f"  {model_dir.name} {mode:>7}: KL {figures['kl_mean']:.5f}, top-1 {100 * figures['top1_agreement']:.2f}%")
    return out


def bench(model_dir: Path, mode: str, n_prompt: int, n_gen: int, reps: int) -> dict[str, float]:
    env = dict(os.environ)
    env.pop("MLX_LLAMA_QMM", None)
    if mode != "default":
        env["MLX_LLAMA_QMM"] = mode
    cmd = [sys.executable, "-m", "mlx_llama", "bench", "-m", str(model_dir), "-p", str(n_prompt), "-g", str(n_gen),
           "-r", str(reps), "--json"]
    result = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
    return {"pp": result["pp_tps"]["mean"], "tg": result["tg_tps"]["mean"]}


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"# Quantization quality × kernel mode ({meta['date']})",
        "",
        f"`{meta['command']}`",
        "",
        f"Quality: mean KL(float ‖ quantized) of the next-token distributions and top-1 agreement over "
        f"{meta['tokens']} tokens in windows of {meta['ctx']} every {meta['stride']} (`mlx-llama perplexity "
        f"--base`). Speed: `mlx-llama bench -p {meta['n_prompt']} -g {meta['n_gen']} -r {meta['reps']}`, "
        f"median of {meta['rounds']} interleaved round(s); ÷ exact is the median of the per-round ratios. "
        f"{meta['cpu']}, shared machine (load average at start {meta['load']}).",
        "",
    ]
    for name, how in meta["token_source"].items():
        lines.append(f"- {name}: {how}; float perplexity {meta['float_ppl'][name]:.3f}")
    lines += [
        "",
        "| model | bits | group | kernel mode | KL vs float | top-1 | Δ ppl | prefill tok/s | decode tok/s | pp ÷ exact | tg ÷ exact |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        speed = r.get("speed")
        cells = [r["model"], str(r["bits"]), str(r["group_size"]), r["mode"],
                 f"{r['kl_mean']:.5f}", f"{100 * r['top1_agreement']:.2f}%",
                 f"{100 * (r['perplexity_ratio'] - 1):+.2f}%"]
        if speed:
            cells += [f"{speed['pp']:.1f}", f"{speed['tg']:.1f}", f"{speed['pp_vs_exact']:.2f}×",
                      f"{speed['tg_vs_exact']:.2f}×"]
        else:
            cells += ["", "", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "What each mode ran (`mlx-llama info` wording):", ""]
    lines += [f"- {mode}: {kernel}" for mode, kernel in meta["kernels"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="stories260K,llama-3.2-1b", help="stories260K and/or a random_checkpoint preset")
    ap.add_argument("--bits", default="4,8")
    ap.add_argument("--group-sizes", default="32,64")
    ap.add_argument("--tokens", type=int, default=512, help="tokens scored per model")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("-p", "--n-prompt", type=int, default=128)
    ap.add_argument("-g", "--n-gen", type=int, default=32)
    ap.add_argument("-r", "--repetitions", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--modes", default=",".join(MODES), help="kernel modes (default: no MLX_LLAMA_QMM)")
    ap.add_argument("--no-bench", action="store_true", help="quality only")
    ap.add_argument("--work", type=Path, default=HERE / "work" / "quant_quality")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    names = [m for m in args.models.split(",") if m]
    modes = [m for m in args.modes.split(",") if m]
    if "exact" not in modes:
        raise SystemExit("--modes must include exact (the speed ratios' reference)")
    configs = [(int(b), int(g)) for b in args.bits.split(",") for g in args.group_sizes.split(",")]
    meta: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(["python", *sys.argv]),
        "tokens": args.tokens, "ctx": args.ctx, "stride": args.stride, "n_prompt": args.n_prompt,
        "n_gen": args.n_gen, "reps": args.repetitions, "rounds": args.rounds,
        "cpu": f"{os.cpu_count()} cores", "load": f"{os.getloadavg()[0]:.1f}",
        "token_source": {}, "float_ppl": {}, "kernels": {},
    }
    rows: list[dict[str, Any]] = []
    dirs: dict[tuple[str, int, int], Path] = {}
    for name in names:
        source = float_source(name, args.work)
        ids, how = token_ids(name, source, args.tokens)
        ids_file = args.work / name / "ids.txt"  # for `mlx-llama perplexity --ids` on the same tokens
        ids_file.parent.mkdir(parents=True, exist_ok=True)
        ids_file.write_text(" ".join(map(str, ids)) + "\n")
        meta["token_source"][name] = how
        base = RunOnce(load_model(source, "float32"))
        meta["float_ppl"][name] = ppl.summary(ppl.score(base, ids, args.ctx, args.stride))["perplexity"]
        for bits, gs in configs:
            dirs[name, bits, gs] = q = quantized(source, args.work, name, bits, gs)
            for mode, figures in quality(q, base, ids, args.ctx, args.stride, modes).items():
                meta["kernels"].setdefault(f"{mode}, {bits}-bit", figures["kernel"])
                rows.append({"model": name, "bits": bits, "group_size": gs, "mode": mode, **figures})
        del base
    if not args.no_bench:
        runs: dict[tuple[str, int, int, str], list[dict[str, float]]] = {}
        for rnd in range(args.rounds):
            for key, q in dirs.items():
                for mode in modes:
                    log(f"round {rnd + 1}: bench {q.parent.name}/{q.name} {mode}")
                    runs.setdefault((*key, mode), []).append(bench(q, mode, args.n_prompt, args.n_gen,
                                                                   args.repetitions))
        for r in rows:
            mine, exact = runs[r["model"], r["bits"], r["group_size"], r["mode"]], \
                runs[r["model"], r["bits"], r["group_size"], "exact"]
            r["speed"] = {
                "pp": statistics.median(x["pp"] for x in mine), "tg": statistics.median(x["tg"] for x in mine),
                "pp_vs_exact": statistics.median(a["pp"] / b["pp"] for a, b in zip(mine, exact)),
                "tg_vs_exact": statistics.median(a["tg"] / b["tg"] for a, b in zip(mine, exact)),
                "rounds": mine,
            }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "quant_quality-" + "-".join(names)
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    table = markdown(rows, meta)
    (args.out / f"{stem}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
