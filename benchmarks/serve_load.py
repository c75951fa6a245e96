#!/usr/bin/env python3
"""Concurrent streaming clients against `mlx-llama serve`, `llama-server --parallel N` and
`mlx_lm.server`, in ONE run; or a soak of our server alone (`--soak N`).

The servers get the same random weights: our 4-bit g64 MLX directory, GGUF Q4_0
for llama.cpp (written by benchmarks/throughput.py's code), and for mlx-lm the
same HF checkpoint converted by mlx-lm to float32 (its best CPU setting: float32
compute, with OpenBLAS loaded as benchmarks/throughput.py does).  The same
thread count and slot count (mlx-lm: `--decode-concurrency`), and the same
requests: for C = 1, 4, 8, 16 clients, each client streams `--requests`
completions one after another, prompts of mixed lengths of random token ids
(fixed seed; mlx_lm.server takes only text prompts, so it gets their decoded
text), `--max-tokens` greedy tokens each.  Per level: aggregate tok/s (tokens ÷
wall time), time to first token p50/p95, inter-token latency p50/p95, errors,
and the server's peak RSS.  Rounds interleave the servers (a busy machine slows
all alike); figures are medians over rounds.

    python benchmarks/serve_load.py                               # 1B, clients 1,4,8,16, 2 rounds
    python benchmarks/serve_load.py --clients 1,4,8 --rounds 1    # shorter
    python benchmarks/serve_load.py --soak 1000 --max-tokens 8    # our RSS over 1000 requests

The soak sends N requests from `--soak-clients` concurrent clients (streamed and
not, alternately) and reads our server's VmRSS from /proc every 50 requests:
first, last, max and the least-squares slope per 100 requests, over the whole run
and over its second half (after the prefix cache has filled its byte budget).

llama-server is looked up in --llama-cpp-bin, then $LLAMA_CPP_BIN, then PATH.
Writes benchmarks/results/serve-load-<preset>.{json,md} (the soak: serve-soak.{json,md});
weights go to --work (benchmarks/work/serve/).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import batch_throughput  # noqa: E402  (llama.cpp lookup and GGUF quantizing, reused)
import throughput  # noqa: E402  (random checkpoint and MLX conversion, reused)

log = throughput.log


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess; `peak_rss` is sampled from /proc while it runs."""

    def __init__(self, name: str, cmd: list[str], port: int, env: dict[str, str], log_path: Path) -> None:
        self.name, self.url = name, f"http://127.0.0.1:{port}"
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.peak_rss = 0
        self._stop = threading.Event()
        threading.Thread(target=self._sample_rss, daemon=True).start()

    def rss(self) -> int:
        """The process's resident set now (VmRSS), in bytes; raises OSError once it has exited."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise OSError(f"no VmRSS for {self.name}")

    def _sample_rss(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self.peak_rss = max(self.peak_rss, self.rss())
            except OSError:
                return

    def wait_healthy(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not become healthy in {timeout} s")

    def stop(self) -> None:
        self._stop.set()
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


Prompt = list[int] | str  # token ids, or their text for a server that takes only text


async def complete_one(client: httpx.AsyncClient, url: str, prompt: Prompt, max_tokens: int) -> dict[str, Any]:
    """One non-streamed completion (the soak mixes them with streamed ones)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    try:
        r = await client.post(f"{url}/v1/completions", json=body)
    except httpx.HTTPError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    if r.status_code != 200:
        return {"error": f"HTTP {r.status_code}: {r.text[:200]}"}
    return {"tokens": r.json()["usage"]["completion_tokens"]}


async def stream_one(client: httpx.AsyncClient, url: str, prompt: Prompt, max_tokens: int) -> dict[str, Any]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    stamps: list[float] = []
    finish = None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"error": str(chunk["error"])[:200]}
                choice = (chunk.get("choices") or [{}])[0]
                # One chunk per token on both servers (ours may hold back text, never a token's chunk
                # when the token has text; random ids below 128000 always do).
                if choice.get("text") or choice.get("token_ids"):
                    stamps.append(time.perf_counter())
                finish = choice.get("finish_reason") or finish
    except httpx.HTTPError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    if not stamps:
        # A greedy first token may be a stop token (random weights: 1 prompt in ~2000 here), a
        # complete answer with no text; a stream that ends without a finish_reason is an error.
        return {"ttft": None, "gaps": [], "tokens": 0} if finish == "stop" else {"error": "no tokens"}
    return {"ttft": stamps[0] - t0, "gaps": list(np.diff(stamps)), "tokens": len(stamps)}


async def load_level(url: str, prompts: list[Prompt], clients: int, requests: int,
                     max_tokens: int) -> dict[str, Any]:
    async def client_loop(k: int, client: httpx.AsyncClient) -> list[dict[str, Any]]:
        return [await stream_one(client, url, prompts[(k * requests + i) % len(prompts)], max_tokens)
                for i in range(requests)]

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        runs = await asyncio.gather(*(client_loop(k, client) for k in range(clients)))
        wall = time.perf_counter() - t0
    results = [r for run in runs for r in run]
    ok = [r for r in results if "error" not in r]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    gaps = [g for r in ok for g in r["gaps"]]

    def pct(xs: list[float], q: float) -> float | None:
        return float(np.percentile(xs, q)) if xs else None

    return {"tok_s": sum(r["tokens"] for r in ok) / wall, "wall_s": wall,
            "ttft_p50": pct(ttft, 50), "ttft_p95": pct(ttft, 95),
            "itl_p50": pct(gaps, 50), "itl_p95": pct(gaps, 95),
            "errors": len(results) - len(ok), "first_error": next((r["error"] for r in results if "error" in r), None)}


# mlx_lm.server with OpenBLAS for MLX's CPU matmuls, installed before MLX loads (as benchmarks/throughput.py
# runs mlx-lm); the rest of the command line is mlx_lm.server's own.
MLX_LM_SERVER = (
    "import sys\n"
    "from mlx_llama.kernels import blas\n"
    "blas.install()\n"
    "from mlx_lm.server import main\n"
    "sys.argv[0] = 'mlx_lm.server'\n"
    "main()\n"
)


def start_server(name: str, weights: dict[str, Path], args: argparse.Namespace, bin_dir: Path | None,
                 work: Path) -> Server:
    port = free_port()
    env = dict(os.environ)
    if name == "mlx-llama":
        cmd = [sys.executable, "-m", "mlx_llama", "serve", "-m", str(weights["mlx"]), "--port", str(port),
               "--parallel", str(args.parallel), "--log-level", "warning"]
    elif name == "llama-server":
        assert bin_dir is not None
        ctx = args.parallel * (max(args.prompt_lengths) + args.max_tokens + 16)
        cmd = [str(bin_dir / "llama-server"), "-m", str(weights["gguf"]), "--port", str(port), "--host", "127.0.0.1",
               "-np", str(args.parallel), "-c", str(ctx), "-t", str(args.threads), "-tb", str(args.threads),
               "--no-webui"]
        if args.llama_cpp_poll is not None:
            cmd += ["--poll", str(args.llama_cpp_poll)]
        env = batch_throughput._lib_env(bin_dir)
    elif name == "mlx-lm":
        cmd = [sys.executable, "-c", MLX_LM_SERVER, "--model", str(weights["mlx-lm"]), "--host", "127.0.0.1",
               "--port", str(port), "--decode-concurrency", str(args.parallel),
               "--prompt-concurrency", str(args.parallel), "--log-level", "WARNING"]
    log(f"starting {name}")
    server = Server(name, cmd, port, env, work / f"{name}.log")
    server.wait_healthy()
    return server


def run_round(name: str, weights: dict[str, Path], args: argparse.Namespace, bin_dir: Path | None,
              work: Path, prompts: list[Prompt]) -> dict[str, Any]:
    server = start_server(name, weights, args, bin_dir, work)
    try:
        asyncio.run(load_level(server.url, prompts[:1], 1, 1, 4))  # warm-up
        levels = {}
        for c in args.clients:
            levels[str(c)] = asyncio.run(load_level(server.url, prompts, c, args.requests, args.max_tokens))
            lv = levels[str(c)]
            log(f"{name:10s} {c:2d} clients: {lv['tok_s']:.1f} tok/s, TTFT p95 {lv['ttft_p95'] or 0:.2f} s, "
                f"errors {lv['errors']}")
        return {"levels": levels, "peak_rss": server.peak_rss}
    finally:
        server.stop()


def decoded(hf: Path, ids: list[int]) -> str:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(hf / "tokenizer.json")).decode(ids)


SOAK_EVERY = 50  # requests between two RSS samples


async def soak(server: Server, prompts: list[Prompt], clients: int, max_tokens: int) -> dict[str, Any]:
    """Every prompt once, from `clients` concurrent clients, streamed and not alternately; RSS every 50."""
    samples = [(0, server.rss())]
    todo = iter(enumerate(prompts))  # shared: each request is taken by one client
    done, errors, first_error = 0, 0, None

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal done, errors, first_error
        for i, prompt in todo:
            send = stream_one if i % 2 else complete_one
            r = await send(client, server.url, prompt, max_tokens)
            if "error" in r:
                errors += 1
                first_error = first_error or r["error"]
            done += 1
            if done % SOAK_EVERY == 0:
                samples.append((done, server.rss()))
                log(f"soak: {done} requests, RSS {samples[-1][1] / 2**20:.0f} MiB, errors {errors}")

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    return {"samples": samples, "errors": errors, "first_error": first_error, "wall_s": time.perf_counter() - t0}


def rss_slope(samples: list[tuple[int, int]]) -> float:
    """Least-squares RSS growth in bytes per 100 requests."""
    x, y = np.array(samples, dtype=np.float64).T
    return float(np.polyfit(x, y, 1)[0] * 100) if len(x) > 1 else 0.0


def run_soak(weights: dict[str, Path], args: argparse.Namespace, prompts: list[Prompt]) -> int:
    server = start_server("mlx-llama", weights, args, None, args.work)
    try:
        result = asyncio.run(soak(server, prompts, args.soak_clients, args.max_tokens))
    finally:
        server.stop()
    samples = result["samples"]
    rss = [r for _, r in samples]
    half = [s for s in samples if s[0] >= samples[-1][0] / 2]
    result |= {"first": rss[0], "last": rss[-1], "max": max(rss), "slope_per_100": rss_slope(samples),
               "slope_per_100_second_half": rss_slope(half), "meta": {
                   "preset": args.preset, "requests": args.soak, "clients": args.soak_clients,
                   "max_tokens": args.max_tokens, "prompt_lengths": args.prompt_lengths, "parallel": args.parallel,
                   "load_average": os.getloadavg(),
                   "command": " ".join(["python", "benchmarks/serve_load.py", *sys.argv[1:]])}}
    mib = 2**20
    m = result["meta"]
    text = "\n".join([
        f"# serve soak, {m['preset']} random weights (4-bit), {m['requests']} requests", "",
        f"`{m['command']}`: {m['clients']} concurrent clients, streamed and non-streamed alternately, prompts "
        f"{m['prompt_lengths']} random token ids, {m['max_tokens']} greedy tokens each, {m['parallel']} slots, "
        f"the server's default prefix cache; {result['wall_s']:.0f} s, {result['errors']} errors"
        + (f" (first: {result['first_error']})" if result["first_error"] else "")
        + f", load average at the end {m['load_average'][0]:.1f}.", "",
        f"RSS first {result['first'] / mib:.0f} MiB (after start-up), last {result['last'] / mib:.0f} MiB, "
        f"max {result['max'] / mib:.0f} MiB; slope {result['slope_per_100'] / mib:+.2f} MiB per 100 requests "
        f"over the run, {result['slope_per_100_second_half'] / mib:+.2f} MiB per 100 over its second half.", "",
        "| requests | RSS (MiB) |", "|---|---|",
        *(f"| {n} | {r / mib:.0f} |" for n, r in samples)]) + "\n"
    out = HERE / "results" / "serve-soak"
    Path(f"{out}.json").write_text(json.dumps(result, indent=2) + "\n")
    Path(f"{out}.md").write_text(text)
    print(text)
    return 0 if result["errors"] == 0 else 1


def merge(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    levels = {}
    for c in rounds[0]["levels"]:
        runs = [r["levels"][c] for r in rounds]
        levels[c] = {k: statistics.median([x[k] for x in runs if x[k] is not None] or [0.0])
                     for k in ("tok_s", "ttft_p50", "ttft_p95", "itl_p50", "itl_p95")}
        levels[c]["errors"] = sum(x["errors"] for x in runs)
        levels[c]["first_error"] = next((x["first_error"] for x in runs if x["first_error"]), None)
    return {"levels": levels, "peak_rss": max(r["peak_rss"] for r in rounds)}


def markdown(result: dict[str, Any]) -> str:
    m = result["meta"]
    lines = [f"# serve load, {m['preset']} random weights (4-bit / Q4_0; mlx-lm: float32)", "",
             f"{m['parallel']} slots, {m['threads']} threads, {m['requests']} requests per client, prompts "
             f"{m['prompt_lengths']} tokens, {m['max_tokens']} greedy tokens, {m['rounds']} round(s), "
             f"medians over rounds, llama-server --poll {m['llama_cpp_poll'] if m['llama_cpp_poll'] is not None else 'default'}, "
             f"load average at the end {m['load_average'][0]:.1f}. `{m['command']}`", "",
             "| server | clients | tok/s | TTFT p50 | TTFT p95 | ITL p50 | ITL p95 | errors | peak RSS |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["servers"].items():
        for c, lv in r["levels"].items():
            lines.append(f"| {name} | {c} | {lv['tok_s']:.1f} | {lv['ttft_p50']:.2f} s | {lv['ttft_p95']:.2f} s | "
                         f"{1e3 * lv['itl_p50']:.0f} ms | {1e3 * lv['itl_p95']:.0f} ms | {lv['errors']} | "
                         f"{r['peak_rss'] / 2**30:.2f} GiB |")
    ours = result["servers"].get("mlx-llama")
    for name, peer in result["servers"].items():
        if ours is None or name == "mlx-llama":
            continue
        lines += ["", f"| clients | tok/s ratio (ours ÷ {name}) | TTFT p95 ratio |", "|---|---|---|"]
        for c in ours["levels"]:
            a, b = ours["levels"][c], peer["levels"][c]
            lines.append(f"| {c} | {a['tok_s'] / b['tok_s']:.2f}× | {a['ttft_p95'] / b['ttft_p95']:.2f}× |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-3.2-1b")
    ap.add_argument("--clients", default="1,4,8,16", help="concurrency levels")
    ap.add_argument("--requests", type=int, default=2, help="requests per client at each level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-lengths", default="16,64,128", help="prompt lengths, cycled over requests")
    ap.add_argument("--parallel", type=int, default=8, help="slots of both servers")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peers", default="mlx-llama,llama-server,mlx-lm")
    ap.add_argument("--llama-cpp-bin", help="folder holding llama-server and llama-quantize")
    ap.add_argument("--llama-cpp-poll", type=int, default=None,
                    help="llama-server's --poll (0: its threads sleep instead of spinning; fairer on a busy machine)")
    ap.add_argument("--work", type=Path, default=HERE / "work" / "serve")
    ap.add_argument("--soak", type=int, default=0, metavar="N",
                    help="instead of the load levels: N requests to our server alone, its RSS every 50")
    ap.add_argument("--soak-clients", type=int, default=4, help="concurrent clients of the soak")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the running server on the way out
    args.clients = [int(c) for c in args.clients.split(",")]
    args.prompt_lengths = [int(n) for n in args.prompt_lengths.split(",")]
    peers = ["mlx-llama"] if args.soak else args.peers.split(",")
    args.work.mkdir(parents=True, exist_ok=True)

    hf = throughput.prepare_hf(args.work, args.preset)
    weights = {"mlx": throughput.prepare_mlx(hf, args.work, 4)}
    bin_dir = batch_throughput.find_llama_cpp(args.llama_cpp_bin)
    if "llama-server" in peers:
        if bin_dir is None or not (bin_dir / "llama-server").exists():
            log("llama-server not found (--llama-cpp-bin, $LLAMA_CPP_BIN, PATH): skipped")
            peers.remove("llama-server")
        else:
            weights["gguf"] = batch_throughput.gguf(hf, args.work, "q4_0", bin_dir, args.threads)

    if "mlx-lm" in peers:
        weights["mlx-lm"] = throughput.prepare_mlx_lm_float32(hf, args.work)

    rng = np.random.default_rng(args.seed)
    n_prompts = args.soak or max(args.clients) * args.requests
    prompts = [rng.integers(0, throughput.PROMPT_VOCAB, args.prompt_lengths[i % len(args.prompt_lengths)]).tolist()
               for i in range(n_prompts)]
    if args.soak:
        return run_soak(weights, args, prompts)
    texts = [decoded(hf, p) for p in prompts] if "mlx-lm" in peers else []
    rounds: dict[str, list[dict[str, Any]]] = {p: [] for p in peers}
    for rnd in range(args.rounds):
        for name in peers if rnd % 2 == 0 else peers[::-1]:
            rounds[name].append(run_round(name, weights, args, bin_dir, args.work,
                                          texts if name == "mlx-lm" else prompts))
    result = {"meta": {"preset": args.preset, "llama_cpp_poll": args.llama_cpp_poll,
                       "load_average": os.getloadavg(), "parallel": args.parallel, "threads": args.threads,
                       "requests": args.requests, "prompt_lengths": args.prompt_lengths,
                       "max_tokens": args.max_tokens, "rounds": args.rounds,
                       "command": " ".join(["python", "benchmarks/serve_load.py", *(argv or sys.argv[1:])])},
              "servers": {name: merge(r) for name, r in rounds.items()}}
    poll = "" if args.llama_cpp_poll is None else f"-poll{args.llama_cpp_poll}"
    out = HERE / "results" / f"serve-load-{args.preset}{poll}"  # the preset has dots: no with_suffix
    Path(f"{out}.json").write_text(json.dumps(result, indent=2) + "\n")
    Path(f"{out}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
