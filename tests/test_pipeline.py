"""Pipeline parallelism (mlx_llama.distributed): 2 ranks of the ring backend on 127.0.0.1 against one process."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import combinations
from pathlib import Path
from typing import Any, Callable

import httpx
import numpy as np
import pytest

from mlx_llama.cli.info import available_cores
from mlx_llama.distributed.partition import plan_stages, split_layers
from mlx_llama.distributed.pipeline import micro_batches, share_host_cores
from mlx_llama.distributed.stage import LAYER_BY_LAYER_TOKENS
from mlx_llama.errors import MlxLlamaError
from mlx_llama.threads import thread_pools

from conftest import STORIES260K
from serve_process import ServerProcess

BIN = Path(sys.executable).parent
PROBE = Path(__file__).with_name("pipeline_probe.py")
PROMPT = "1,7,30,12,99,5,61"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """`mlx.launch -n 2 --backend ring` on this host, on a free port."""
    cmd = [str(BIN / "mlx.launch"), "-n", "2", "--backend", "ring", "--starting-port", str(_free_port()), "--", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _start_ranks(args_per_rank: list[list[str]], tmp_path: Path, size: int = 2) -> list[subprocess.Popen]:
    """Start the first ranks of `size` directly, as the launcher would, so that no launcher ends the survivors."""
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{_free_port()}"] for _ in range(size)]))
    procs = []
    for rank, args in enumerate(args_per_rank):
        env = {**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)}
        procs.append(subprocess.Popen([str(BIN / "mlx-llama"), *args], env=env, text=True, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


# ---- the split ---------------------------------------------------------------------------------


def _brute_force_max(layer_bytes: list[int], size: int, first: int) -> int:
    n, best = len(layer_bytes), None
    for cuts in combinations(range(1, n), size - 1):
        bounds = [0, *cuts, n]
        parts = [sum(layer_bytes[a:b]) for a, b in zip(bounds, bounds[1:])]
        parts[0] += first
        best = max(parts) if best is None else min(best, max(parts))
    return best


def test_split_is_contiguous_and_minimises_the_largest_rank() -> None:
    rng = random.Random(0)
    for _ in range(200):
        n, size = rng.randint(1, 9), rng.randint(1, 4)
        if size > n:
            continue
        layer_bytes = [rng.randint(1, 100) for _ in range(n)]
        first = rng.randint(0, 300)
        ranges = split_layers(layer_bytes, size, first)
        assert [r.start for r in ranges] == [0] + [r.stop for r in ranges[:-1]] and ranges[-1].stop == n
        assert all(len(r) > 0 for r in ranges)
        parts = [sum(layer_bytes[i] for i in r) for r in ranges]
        parts[0] += first
        assert max(parts) == _brute_force_max(layer_bytes, size, first)


def test_rank_0_holds_the_embedding_and_the_head() -> None:
    tensors = {f"model.layers.{i}.mlp.weight": 10 for i in range(8)}
    tensors |= {"model.embed_tokens.weight": 30, "model.norm.weight": 1, "lm_head.weight": 30}
    # Tied: rank 0's 31 extra bytes (the stray lm_head copy is not counted) buy it 2 layers (51 vs 60 bytes).
    plans = plan_stages(tensors, 8, 2, tied_embeddings=True)
    assert [p.layers for p in plans] == [range(0, 2), range(2, 8)]
    first, last = plans
    assert first.holds("model.embed_tokens.weight", True) and first.holds("model.norm.weight", True)
    assert not first.holds("lm_head.weight", True) and first.holds("lm_head.weight", False)
    for tied in (True, False):
        assert not any(last.holds(n, tied) for n in ("model.embed_tokens.weight", "model.norm.weight",
                                                      "lm_head.weight"))
    # Its tokenizer's 20 bytes more on rank 0 (51): 1 layer (61 vs 70) beats 2 (71 vs 60).
    assert [p.layers for p in plan_stages(tensors, 8, 2, True, rank0_extra=20)] == [range(0, 1), range(1, 8)]
    # Untied: 61 extra bytes on rank 0, which keeps 1 layer (71 vs 70).
    assert [p.layers for p in plan_stages(tensors, 8, 2, tied_embeddings=False)] == [range(0, 1), range(1, 8)]
    with pytest.raises(MlxLlamaError, match="cannot be split across 9 ranks"):
        plan_stages(tensors, 8, 9, tied_embeddings=True)


# ---- two ranks against one process -------------------------------------------------------------


@pytest.fixture(scope="module")
def four_layers(make_checkpoint: Callable[..., Path]) -> Path:
    return make_checkpoint(num_hidden_layers=4, tie_word_embeddings=False)


def _probe(model: Path, out: Path, max_kv: int, mode: str, *extra: str, prompt: str = PROMPT,
           chunk: int = 3) -> dict[str, np.ndarray]:
    args = [sys.executable, str(PROBE), str(model), str(out), prompt, "12", str(max_kv), str(chunk), mode, *extra]
    run = _launch(args) if mode == "pipeline" else subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    with np.load(f"{out}.npz") as f:
        return dict(f)


def _assert_same_run(model: Path, tmp_path: Path, max_kv: int, *extra: str, **prompt: Any) -> None:
    single = _probe(model, tmp_path / "single", max_kv, "single", *extra, **prompt)
    piped = _probe(model, tmp_path / "pipe", max_kv, "pipeline", *extra, **prompt)
    assert single.keys() == piped.keys()
    for key in single:
        np.testing.assert_array_equal(single[key], piped[key], err_msg=key)  # bit-identical


@pytest.mark.parametrize("max_kv", [-1, 6], ids=["growing", "rotating"])
def test_two_ranks_give_the_single_process_ids_and_logits(four_layers: Path, tmp_path: Path, max_kv: int) -> None:
    _assert_same_run(four_layers, tmp_path, max_kv)


@pytest.mark.parametrize("max_kv", [-1, 6], ids=["growing", "rotating"])
def test_the_batched_engine_on_two_ranks_gives_the_single_process_ids_and_logits(
        four_layers: Path, tmp_path: Path, max_kv: int) -> None:
    # 4 prompts, 3 slots, prefill chunks of 3: sequences join, prefill beside decoding ones, and leave.
    _assert_same_run(four_layers, tmp_path, max_kv, "engine")


@pytest.mark.parametrize("max_kv, engine", [(-1, []), (6, []), (-1, ["engine"])],
                         ids=["growing", "rotating", "engine"])
def test_long_prompt_chunks_run_layer_by_layer_and_change_no_bit(
        make_quantized_dir: Callable[..., Path], tmp_path: Path, max_kv: int, engine: list[str]) -> None:
    # Chunks of LAYER_BY_LAYER_TOKENS: every rank evaluates them one layer at a time, the single process at once.
    # Quantized weights: our kernels give the same bits at any thread count, OpenBLAS's float32 matmuls
    # over the engine's steps of 16+ rows do not, and the ranks sharing this host run half the threads.
    prompt = ",".join(str(3 + 7 * i % 250) for i in range(2 * LAYER_BY_LAYER_TOKENS + 5))
    _assert_same_run(make_quantized_dir(4, 32), tmp_path, max_kv, *engine, prompt=prompt,
                     chunk=LAYER_BY_LAYER_TOKENS)


def test_micro_batches_cut_a_step_into_even_contiguous_groups() -> None:
    lengths, rows = [1, 1, 6, 1, 3], [0, 1, 8, 11]  # two decoding rows, a prompt chunk, two more
    groups = micro_batches(lengths, rows, parts=2, min_tokens=4)
    assert [(g.lo, g.hi, g.start, g.length, g.rows) for g in groups] == [(0, 3, 0, 8, [0, 1]), (3, 5, 8, 4, [0, 3])]
    assert len(micro_batches(lengths, rows, parts=2, min_tokens=7)) == 1  # 12 tokens: not two of 7
    assert len(micro_batches(lengths, rows, parts=2, min_tokens=0)) == 1
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 9) for _ in range(rng.randint(1, 8))]
        rows = sorted(rng.sample(range(sum(lengths)), rng.randint(0, min(4, sum(lengths)))))
        groups = micro_batches(lengths, rows, parts=rng.randint(1, 4), min_tokens=rng.randint(0, 10))
        assert [g.lo for g in groups] == [0] + [g.hi for g in groups[:-1]] and groups[-1].hi == len(lengths)
        assert all(g.hi > g.lo and g.length == sum(lengths[g.lo : g.hi]) for g in groups)
        assert [g.start + r for g in groups for r in g.rows] == rows


def test_micro_batches_on_two_ranks_give_the_single_process_ids_and_logits(
        make_quantized_dir: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Quantized weights: our kernels are row-invariant, so cutting a step's rows changes no bit.
    monkeypatch.setenv("MLX_LLAMA_PIPELINE_MICRO_TOKENS", "1")  # every step of several sequences is cut
    _assert_same_run(make_quantized_dir(4, 32), tmp_path, -1, "engine")


@pytest.mark.skipif(not STORIES260K.is_dir(), reason="stories260K fixture not present")
def test_two_ranks_match_on_stories260k(tmp_path: Path) -> None:
    _assert_same_run(STORIES260K, tmp_path, -1)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_each_rank_reads_only_its_tensors(make_checkpoint: Callable[..., Path], tmp_path: Path, tied: bool) -> None:
    # Layers of ~4 MB, so that the weights dwarf what else a process reads (its Python modules, sockets).
    model = make_checkpoint(num_hidden_layers=4, hidden_size=256, intermediate_size=1024, num_attention_heads=4,
                            head_dim=64, tie_word_embeddings=tied)
    out = tmp_path / "pipe"
    _probe(model, out, -1, "pipeline")
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(2)]
    layers = [{int(n.split(".")[2]) for n in r["tensors"] if n.startswith("model.layers.")} for r in ranks]
    assert layers == [{0, 1}, {2, 3}]
    ends = {"model.embed_tokens.weight", "model.norm.weight"} | (set() if tied else {"lm_head.weight"})
    assert ends <= set(ranks[0]["tensors"])  # the head, tied or not, is rank 0's alone
    assert not ends & set(ranks[1]["tensors"]) and "lm_head.weight" not in ranks[1]["tensors"]
    total = (model / "model.safetensors").stat().st_size
    for r in ranks:
        # What this process read is its tensors (plus headers, config, modules), not the whole file.
        assert r["tensor_bytes"] < 0.6 * total
        assert r["tensor_bytes"] <= r["bytes_read"] < r["tensor_bytes"] + 2_000_000


# ---- the CLI and failures ----------------------------------------------------------------------


def test_generate_pipeline_prints_the_single_process_tokens(four_layers: Path) -> None:
    args = ["-m", str(four_layers), "--prompt-ids", PROMPT, "-n", "10"]
    single = subprocess.run([str(BIN / "mlx-llama"), "generate", *args], capture_output=True, text=True, timeout=60)
    piped = _launch([str(BIN / "mlx-llama"), "generate", *args, "--pipeline", "-v"])
    assert single.returncode == 0 and piped.returncode == 0, piped.stderr
    assert piped.stdout.split() == single.stdout.split()  # rank 0 alone prints
    for rank in (0, 1):
        assert f"rank {rank} (" in piped.stderr and "per token: compute" in piped.stderr
    assert piped.stderr.count(" GB once loaded), ") == 2 and piped.stderr.count(" ms, between steps ") == 2
    # Both ranks on this host: each sizes its thread pools to half the cores.
    assert piped.stderr.count(f", {max(1, available_cores() // 2)}-thread pools)") == 2


def test_batch_mode_on_two_ranks_writes_the_single_process_answers(make_checkpoint: Callable[..., Path],
                                                                    tmp_path: Path) -> None:
    model = make_checkpoint(tokenizer=True, num_hidden_layers=4)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello there\n\nWhat is two plus two?\nA longer prompt, to be read in several chunks\n")
    args = ["generate", "-m", str(model), "--prompts-file", str(prompts), "-n", "8", "--batch-size", "2",
            "--prefill-step-size", "4"]
    single = subprocess.run([str(BIN / "mlx-llama"), *args, "-o", str(tmp_path / "single.json")],
                            capture_output=True, text=True, timeout=60)
    assert single.returncode == 0, single.stderr
    # Only rank 0 reads the prompts and writes the answers: the other rank is given files that do not exist.
    rank0 = [*args, "-o", str(tmp_path / "piped.json"), "--pipeline"]
    rank1 = [a.replace(str(tmp_path), str(tmp_path / "elsewhere")) for a in rank0]
    procs = _start_ranks([rank0, rank1], tmp_path)
    for p in procs:
        _, stderr = p.communicate(timeout=90)
        assert p.returncode == 0, stderr
    answers = json.loads((tmp_path / "piped.json").read_text())
    assert answers == json.loads((tmp_path / "single.json").read_text())
    assert [a["output"] != "" for a in answers] == [True, False, True, True]


@pytest.mark.parametrize("max_kv", [None, "24"], ids=["growing", "rotating"])
def test_chat_on_two_ranks_answers_as_one_process(make_checkpoint: Callable[..., Path], tmp_path: Path,
                                                   max_kv: str | None) -> None:
    model = make_checkpoint(tokenizer=True, num_hidden_layers=4)
    # /reset and /system roll the caches back (the rotating one may have to rebuild): rank 1 must follow.
    turns = "Hello there\nAnd then?\n/reset\nHello again\n/system Be brief\nWhy?\n"
    args = ["chat", "-m", str(model), "-n", "6", "--temp", "0", *(["--max-kv-size", max_kv] if max_kv else [])]
    single = subprocess.run([str(BIN / "mlx-llama"), *args], input=turns, capture_output=True, text=True, timeout=60)
    assert single.returncode == 0, single.stderr
    rank0, rank1 = _start_ranks([[*args, "--pipeline"]] * 2, tmp_path)
    out, err0 = rank0.communicate(turns, timeout=90)
    _, err1 = rank1.communicate(timeout=30)
    assert rank0.returncode == 0 and rank1.returncode == 0, err0 + err1
    assert out == single.stdout and len(out.splitlines()) == 4


def _complete(url: str, prompts: list[str]) -> list[str]:
    def one(prompt: str) -> str:
        r = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 6, "temperature": 0},
                       timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    with ThreadPoolExecutor(len(prompts)) as pool:  # at once: the engine batches them
        return list(pool.map(one, prompts))


def test_serve_on_two_ranks_answers_as_one_process(make_checkpoint: Callable[..., Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_checkpoint(tokenizer=True, num_hidden_layers=4)
    prompts = ["Hello there", "What is two plus two?", "Once upon a time"]
    single = ServerProcess(model, tmp_path / "single.log")
    try:
        expected = _complete(single.url, prompts)
    finally:
        single.stop_cleanly()
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{_free_port()}"] for _ in range(2)]))
    monkeypatch.setenv("MLX_HOSTFILE", str(hostfile))
    rank1 = subprocess.Popen([str(BIN / "mlx-llama"), "serve", "-m", str(model), "--pipeline"],
                             env={**os.environ, "MLX_RANK": "1"}, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        monkeypatch.setenv("MLX_RANK", "0")
        rank0 = ServerProcess(model, tmp_path / "rank0.log", "--pipeline")
        try:
            assert _complete(rank0.url, prompts) == expected
            r = httpx.post(f"{rank0.url}/v1/completions", json={"prompt": "x", "max_tokens": -1}, timeout=30)
            assert r.status_code == 400 and _complete(rank0.url, prompts[:1]) == expected[:1]  # still up
        finally:
            rank0.stop_cleanly()
        _, stderr = rank1.communicate(timeout=30)
        assert rank1.returncode == 0, stderr  # told to finish when rank 0's engine stopped
    finally:
        if rank1.poll() is None:
            rank1.kill()
            rank1.wait()


def test_ranks_sharing_a_host_share_its_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlx_llama.kernels import extension

    monkeypatch.delenv("MLX_LLAMA_NUM_THREADS", raising=False)
    with thread_pools():
        assert share_host_cores(["a", "b"], 0) is None  # alone on its host: every core
        assert share_host_cores(["a", "b", "a", "a"], 2) == max(1, available_cores() // 3)
        if extension.module() is not None:
            assert extension.module().num_threads() == max(1, available_cores() // 3)
        monkeypatch.setenv("MLX_LLAMA_NUM_THREADS", "2")
        assert share_host_cores(["a", "a"], 0) is None  # the user's setting wins


def test_info_shows_the_group() -> None:
    run = _launch([str(BIN / "mlx-llama"), "info"])
    assert run.returncode == 0, run.stderr
    assert "distributed: rank 0 of 2 over ring" in run.stdout and "distributed: rank 1 of 2 over ring" in run.stdout


def _last_error_line(stderr: str) -> str:
    # MLX's ring backend logs its socket errors on stderr too; ours is the one line starting "Error:".
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def _generate_args(model: Path, *extra: str) -> list[str]:
    return ["generate", "-m", str(model), "--prompt-ids", PROMPT, "-n", "100000", "--pipeline", *extra]


def _wait_for_tokens(proc: subprocess.Popen, n: int) -> None:
    for _ in range(n):
        assert proc.stdout.readline(), proc.stderr.read()


@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_a_lost_rank_ends_the_other_with_one_error_line(four_layers: Path, tmp_path: Path, how: str) -> None:
    args = _generate_args(four_layers, "--pipeline-timeout", "3")
    rank0, rank1 = _start_ranks([args, args], tmp_path)
    try:
        _wait_for_tokens(rank0, 3)
        os.kill(rank1.pid, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        t = time.monotonic()
        _, stderr = rank0.communicate(timeout=30)
        assert time.monotonic() - t < 30
        assert rank0.returncode == 1
        assert _last_error_line(stderr).startswith("Error: rank 0 (")
    finally:
        for p in (rank0, rank1):
            if p.poll() is None:
                p.kill()
            p.wait()


def test_a_killed_rank_ends_batch_mode_and_the_answers_so_far_are_kept(make_checkpoint: Callable[..., Path],
                                                                        tmp_path: Path) -> None:
    model = make_checkpoint(tokenizer=True, num_hidden_layers=4)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\nTell me a story\nAnd another one\n")  # the empty line is answered at once
    out = tmp_path / "out.json"
    args = ["generate", "-m", str(model), "--prompts-file", str(prompts), "-o", str(out), "-n", "2000",
            "--pipeline", "--pipeline-timeout", "3"]
    rank0, rank1 = _start_ranks([args, args], tmp_path)
    partial = tmp_path / "out.json.partial.jsonl"
    try:
        deadline = time.monotonic() + 60
        while not partial.exists() and rank0.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert partial.exists(), rank0.stderr.read() if rank0.poll() is not None else "no partial file"
        rank1.kill()
        t = time.monotonic()
        _, stderr = rank0.communicate(timeout=30)
        assert time.monotonic() - t < 30 and rank0.returncode == 1
        assert _last_error_line(stderr).startswith("Error: rank 0 (")
        assert not out.exists() and json.loads(partial.read_text().splitlines()[0])["output"] == ""
    finally:
        for p in (rank0, rank1):
            if p.poll() is None:
                p.kill()
            p.wait()


def test_an_idle_rank_ends_when_rank_0_dies(make_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    # Between chat turns or server requests the other ranks wait without a limit: a dead rank 0 still ends them.
    model = make_checkpoint(tokenizer=True, num_hidden_layers=4)
    args = ["chat", "-m", str(model), "--pipeline", "--pipeline-timeout", "2"]
    rank0, rank1 = _start_ranks([args, args], tmp_path)
    try:
        time.sleep(5)  # longer than the timeout: rank 1 is idle, not stuck
        assert rank1.poll() is None, rank1.stderr.read()
        rank0.kill()
        _, stderr = rank1.communicate(timeout=30)
        assert rank1.returncode == 1 and _last_error_line(stderr).startswith("Error: rank 1 (")
    finally:
        for p in (rank0, rank1):
            if p.poll() is None:
                p.kill()
            p.wait()


def test_a_rank_without_the_model_dir_is_named_by_every_rank(four_layers: Path, tmp_path: Path) -> None:
    missing = tmp_path / "not-here"
    procs = _start_ranks([_generate_args(four_layers), _generate_args(missing)], tmp_path)
    for p in procs:
        _, stderr = p.communicate(timeout=60)
        assert p.returncode == 1
        line = _last_error_line(stderr)
        assert line.startswith("Error: rank 1 (") and "not-here" in line and "not found" in line


def test_a_broken_tokenizer_on_rank_0_is_named_by_every_rank(four_layers: Path, tmp_path: Path) -> None:
    # Rank 0 loads its tokenizer with its layers: a failure there ends every rank before any step.
    model = tmp_path / "model"
    shutil.copytree(four_layers, model)
    (model / "tokenizer.json").write_text("{not json")
    procs = _start_ranks([_generate_args(model), _generate_args(model)], tmp_path)
    for p in procs:
        _, stderr = p.communicate(timeout=60)
        assert p.returncode == 1
        line = _last_error_line(stderr)
        assert line.startswith("Error: rank 0 (") and "tokenizer.json" in line


def test_an_error_on_rank_0_ends_the_other_ranks(four_layers: Path, tmp_path: Path) -> None:
    args = ["generate", "-m", str(four_layers), "--prompt", "hi", "--pipeline"]  # no tokenizer: rank 0 refuses
    rank0, rank1 = _start_ranks([args, args], tmp_path)
    _, err0 = rank0.communicate(timeout=60)
    _, err1 = rank1.communicate(timeout=60)
    assert rank0.returncode == 1 and "has no tokenizer.json: use --prompt-ids" in _last_error_line(err0)
    assert rank1.returncode == 1 and _last_error_line(err1).endswith("rank 0 stopped with an error")


def test_a_rank_that_cannot_connect_gives_up(four_layers: Path, tmp_path: Path) -> None:
    (rank0,) = _start_ranks([_generate_args(four_layers, "--pipeline-timeout", "2")], tmp_path)  # rank 1 never comes
    _, stderr = rank0.communicate(timeout=30)
    # Killed by its deadline process (MLX connects holding the GIL): SIGTERM, not exit status 1.
    assert rank0.returncode != 0 and "connecting to the other ranks" in _last_error_line(stderr)
