"""`mlx-llama generate` end to end, and its one-line errors."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mlx_llama import Sampler, SamplingParams, generate_tokens
from mlx_llama.cli.main import main
from mlx_llama.loader import load_model


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(main, list(args), input=input)


def assert_one_line_error(result, fragment: str) -> None:
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert fragment in lines[0]
    assert "Traceback" not in result.output


def test_generate_text(tiny_chat_model):
    r = run("generate", "-m", str(tiny_chat_model), "-p", "Hello", "-n", "8", "--verbose")
    assert r.exit_code == 0, r.output
    assert "generation: 8 tokens" in r.output


def test_generate_ids_with_bounded_cache_over_300_tokens(make_checkpoint):
    path = make_checkpoint()
    r = run("generate", "-m", str(path), "--prompt-ids", "1 5 9", "-n", "300", "--max-kv-size", "64",
            "--temp", "0.9", "--seed", "1")
    assert r.exit_code == 0, r.output
    assert 1 <= len(r.output.split()) <= 300


def test_presence_and_frequency_penalty_flags_reach_the_sampler(make_checkpoint):
    path = make_checkpoint()
    flags = ["--prompt-ids", "1 5 9", "-n", "16", "--temp", "0"]
    penalised = run("generate", "-m", str(path), *flags, "--presence-penalty", "0.5", "--frequency-penalty", "1.5")
    assert penalised.exit_code == 0, penalised.output
    sampler = Sampler(SamplingParams(presence_penalty=0.5, frequency_penalty=1.5))
    expected = list(generate_tokens(load_model(path, "float32"), [1, 5, 9], max_tokens=16, sampler=sampler))
    assert [int(t) for t in penalised.output.split()] == expected
    assert penalised.output != run("generate", "-m", str(path), *flags).output


def test_rotating_cache_never_exceeds_its_bound(make_checkpoint):
    model = load_model(make_checkpoint(), "float32")
    cache = model.make_cache(max_kv_size=64, keep=4)
    sizes = []
    for _ in generate_tokens(model, list(range(3, 40)), max_tokens=300, cache=cache):
        sizes.append(cache[0].size)
    assert len(sizes) == 300 and max(sizes) == 64
    assert cache[0].offset == 37 + 300  # prompt + every yielded token (the cache invariant)


def test_batch_mode_writes_predictions(tiny_chat_model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first prompt\n\nsecond 你好\n")
    out = tmp_path / "predictions.json"
    r = run("generate", "-m", str(tiny_chat_model), "--prompts-file", str(prompts), "-o", str(out), "-n", "4")
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert [d["input"] for d in data] == ["first prompt", "", "second 你好"]  # the empty line keeps its place
    assert all(isinstance(d["output"], str) for d in data)
    # The user's file is never overwritten without --force.
    r = run("generate", "-m", str(tiny_chat_model), "--prompts-file", str(prompts), "-o", str(out))
    assert_one_line_error(r, "--force")


def test_missing_model_dir(tmp_path):
    assert_one_line_error(run("generate", "-m", str(tmp_path / "nope"), "-p", "x"), "not found")


def test_unsupported_model_type(make_checkpoint, tmp_path):
    src = make_checkpoint()
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").symlink_to(src / "model.safetensors")
    assert_one_line_error(run("generate", "-m", str(tmp_path), "--prompt-ids", "1"), "gpt2")


def test_prompt_longer_than_context(make_checkpoint):
    path = make_checkpoint(max_position_embeddings=64)
    ids = ",".join(["5"] * 65)
    assert_one_line_error(run("generate", "-m", str(path), "--prompt-ids", ids), "--max-kv-size")
    # With a rotating cache the same prompt is fine.
    assert run("generate", "-m", str(path), "--prompt-ids", ids, "--max-kv-size", "32", "-n", "2").exit_code == 0


@pytest.mark.parametrize("flags,fragment", [
    (["--temp", "-1"], "--temp"),
    (["--top-p", "0"], "--top-p"),
    (["--max-kv-size", "4", "--keep", "4"], "keep"),
    (["--presence-penalty", "2.5"], "--presence-penalty"),
    (["--frequency-penalty", "nan"], "--frequency-penalty"),
])
def test_bad_sampling_flags(make_checkpoint, flags, fragment):
    assert_one_line_error(run("generate", "-m", str(make_checkpoint()), "--prompt-ids", "1", *flags), fragment)


def test_no_tokenizer_needs_prompt_ids(make_checkpoint):
    assert_one_line_error(run("generate", "-m", str(make_checkpoint()), "-p", "hi"), "--prompt-ids")
