"""Batch mode (`generate --prompts-file`) and `mlx_llama.batch_generate` on the engine."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
from click.testing import CliRunner

import mlx_llama
from mlx_llama.cli.main import main
from mlx_llama.generation.engine import Engine
from mlx_llama.loader import load, load_model

PROMPTS = "  leading and trailing spaces  \n\nsecond 你好\nthird\n"
LINES = PROMPTS.splitlines()


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def answer_alone(model_dir, text: str) -> str:
    r = run("generate", "-m", str(model_dir), "-p", text, "-n", "6")
    assert r.exit_code == 0, r.output
    return r.stdout[:-1]  # generate -p ends the answer with a newline


def test_batch_mode_keeps_order_lines_and_answers_as_generate_p(tiny_chat_model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS, encoding="utf-8")
    out = tmp_path / "out.json"
    r = run("generate", "-m", str(tiny_chat_model), "--prompts-file", str(prompts), "-o", str(out), "-n", "6",
            "--batch-size", "2")
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text(encoding="utf-8"))
    assert [d["input"] for d in data] == LINES
    assert data[1]["output"] == ""  # an empty line gets an empty answer, in its place
    for d in data:
        if d["input"]:
            assert d["output"] == answer_alone(tiny_chat_model, d["input"])
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~_umask()
    assert not (tmp_path / "out.json.partial.jsonl").exists()
    assert "tok/s" in r.stderr


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_dash_prints_the_json_to_stdout(tiny_chat_model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo\n")
    r = run("generate", "-m", str(tiny_chat_model), "--prompts-file", str(prompts), "-o", "-", "-n", "3")
    assert r.exit_code == 0, r.output
    assert [d["input"] for d in json.loads(r.stdout)] == ["one", "two"]


@pytest.mark.parametrize("target", ["missing-folder/out.json", "a-folder"])
def test_unwritable_output_is_refused_before_loading(tmp_path, target):
    (tmp_path / "a-folder").mkdir()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\n")
    # The model path does not exist either: the output is checked first.
    r = run("generate", "-m", str(tmp_path / "no-model"), "--prompts-file", str(prompts),
            "-o", str(tmp_path / target))
    assert r.exit_code != 0 and "Error:" in r.output and "Traceback" not in r.output, r.output
    assert "no-model" not in r.output  # refused before the model was looked at


def test_a_failure_part_way_keeps_the_finished_answers(tiny_chat_model, tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo\nthree\n")
    out = tmp_path / "out.json"
    real_step, calls = Engine.step, []

    def failing_step(self):
        calls.append(1)
        if len(calls) > 4:  # the first answer (3 tokens: 3 steps) has finished
            raise RuntimeError("disk on fire")
        return real_step(self)

    monkeypatch.setattr(Engine, "step", failing_step)
    r = run("generate", "-m", str(tiny_chat_model), "--prompts-file", str(prompts), "-o", str(out),
            "--batch-size", "1", "-n", "3")
    assert r.exit_code != 0 and not out.exists()
    partial = tmp_path / "out.json.partial.jsonl"
    assert f"the finished ones are in {partial}" in r.stderr
    kept = [json.loads(line) for line in partial.read_text().splitlines()]
    assert [k["input"] for k in kept][:1] == ["one"] and kept[0]["index"] == 0
    # A rerun does not clobber the kept answers without --force.
    monkeypatch.setattr(Engine, "step", real_step)
    r = run("generate", "-m", str(tiny_chat_model), "--prompts-file", str(prompts), "-o", str(out))
    assert r.exit_code == 1 and "interrupted run" in r.output


def test_batch_generate_api_matches_generate_tokens(make_checkpoint):
    model = load_model(make_checkpoint(), "float32")
    prompts = [[1, 5, 9], [], list(range(3, 60)), [7]]
    results = mlx_llama.batch_generate(model, prompts, max_tokens=5, batch_size=3)
    assert results[1].token_ids == [] and results[1].finish_reason is None
    for p, r in zip(prompts, results):
        if p:
            expected = list(mlx_llama.generate_tokens(model, p, max_tokens=5, stop_ids=[2]))
            assert r.token_ids == expected


def test_batch_generate_text_stops_at_stop_strings(tiny_chat_model):
    model, tokenizer = load(tiny_chat_model)
    ids = tokenizer.encode("hello", add_bos=True)
    full = mlx_llama.batch_generate(model, [ids], tokenizer=tokenizer, max_tokens=12)[0]
    stop = full.text[3:5]
    if not stop.strip():
        pytest.fail(f"pick another stop string for {full.text!r}")
    cut = mlx_llama.batch_generate(model, [ids], tokenizer=tokenizer, max_tokens=12, stop_strings=[stop])[0]
    assert cut.text == full.text[: full.text.index(stop)] and cut.finish_reason == "stop"
    assert np.all(np.asarray(cut.token_ids) == np.asarray(full.token_ids[: len(cut.token_ids)]))
