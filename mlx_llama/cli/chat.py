"""`mlx-llama chat`: a terminal REPL over ChatSession, or a line-per-turn filter when piped."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import click

from mlx_llama.generation.prompt_cache import PromptCacheFile, refuse_foreign_file
from mlx_llama.backends import load_backend
from mlx_llama.chat.session import ChatSession
from mlx_llama.cli.options import cache_kwargs, model_options, sampling_options, sampling_params
from mlx_llama.cli.pipeline_options import join_pipeline, pipeline_options
from mlx_llama.errors import MlxLlamaError

PROMPT = ">>> "
CONTINUE_PROMPT = "... "
BLOCK = '"""'

HELP = """\
Commands:
  /help          this help
  /reset         start a new conversation (same system prompt)
  /system TEXT   set the system prompt (/system alone shows it)
  /save FILE     save the conversation as JSON
  /load FILE     load a conversation saved with /save
  /stats         cache size and the last turn's speed
  /exit          leave (Ctrl-D works too)
Multi-line messages: end a line with \\ to continue it, or wrap the message in \"\"\" ... \"\"\".
Ctrl-C stops an answer; the partial answer stays in the conversation."""


def read_message(first: str, more: Callable[[], str | None]) -> str:
    """One user message starting with the line `first`; `more()` gives the next line (None: no more input).

    As in ollama: a message opened with three double quotes runs until a line ending with them;
    a line ending with a backslash continues on the next line.
    """
    lines = []
    if first.startswith(BLOCK):
        line: str | None = first[len(BLOCK):]
        while line is not None and not line.endswith(BLOCK):
            lines.append(line)
            line = more()
        if line is not None:
            lines.append(line[: -len(BLOCK)])
        return "\n".join(lines).strip("\n")
    line = first
    while line is not None and line.endswith("\\"):
        lines.append(line[:-1])
        line = more()
    if line is not None:
        lines.append(line)
    return "\n".join(lines)


def escape_newlines(text: str) -> str:
    """Piped answers stay one per line: backslash, newline and carriage return written as \\\\, \\n, \\r."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def _stats_line(session: ChatSession) -> str:
    cache = f"cache: {session.cache_tokens} tokens"
    cache += f" (max {session.max_kv_size}, system kept: {session.keep})" if session.rotating else \
        f" (context {session.context_limit})"
    st = session.last_stats
    if st is None:
        return cache + " | no turn yet"
    return (f"{cache} | last turn: prefill {st.prompt_tokens} tokens at {st.prompt_tps:.1f} tok/s, "
            f"generated {st.generation_tokens} tokens at {st.generation_tps:.1f} tok/s")


def _command(session: ChatSession, line: str, say: Callable[[str], None]) -> bool:
    """Run a /command; False means leave."""
    name, _, arg = line.strip().partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit"):
        return False
    if name == "/help":
        say(HELP)
    elif name == "/reset":
        session.reset()
        say("[new conversation]")
    elif name == "/system":
        if arg:
            session.set_system(arg)
            say("[system prompt set]")
        else:
            say(session.system if session.system is not None else "[no system prompt]")
    elif name == "/save":
        if not arg:
            raise MlxLlamaError("usage: /save FILE")
        session.save(Path(arg).expanduser())
        say(f"[saved {len(session.messages)} messages to {arg}]")
    elif name == "/load":
        if not arg:
            raise MlxLlamaError("usage: /load FILE")
        session.load(Path(arg).expanduser())
        say(f"[loaded {len(session.messages)} messages from {arg}]")
    elif name == "/stats":
        say(_stats_line(session))
    else:
        say(f"unknown command {name}; /help lists the commands")
    return True


def _more_input() -> str | None:
    try:
        return input(CONTINUE_PROMPT)
    except EOFError:
        return None


def _interactive(session: ChatSession, after_turn: Callable[[], None]) -> None:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    out = sys.stdout
    click.echo("mlx-llama chat: /help for commands, Ctrl-C stops an answer, Ctrl-D quits.")
    while True:
        try:
            line = input(PROMPT)
        except EOFError:
            click.echo()
            return
        except KeyboardInterrupt:
            click.echo()  # like a shell: Ctrl-C at the prompt clears the line
            continue
        if not line.strip():
            continue
        try:
            if line.startswith("/"):
                if not _command(session, line, click.echo):
                    return
                continue
            text = read_message(line, _more_input)
        except KeyboardInterrupt:
            click.echo()  # Ctrl-C inside a multi-line message drops it
            continue
        except MlxLlamaError as e:
            click.echo(f"error: {e}")
            continue
        try:
            answer = session.ask(text)
        except MlxLlamaError as e:
            click.echo(f"error: {e}")
            continue
        except KeyboardInterrupt:
            click.echo(" [interrupted]")
            continue
        try:
            for piece in answer:
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            out.write(" [interrupted]")
        except MlxLlamaError as e:
            out.write(f"\nerror: {e}")
        finally:
            answer.close()
        out.write("\n")
        out.flush()
        after_turn()


def _scripted(session: ChatSession, lines: Iterator[str], jsonl: bool, after_turn: Callable[[], None]) -> None:
    """Each input line is one user turn (or a /command); only answers go to stdout."""
    out = sys.stdout
    say = lambda msg: click.echo(msg, err=True)  # noqa: E731

    def more() -> str | None:  # the next line of a multi-line message
        nxt = next(lines, None)
        return None if nxt is None else nxt.rstrip("\r\n")

    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            if not _command(session, line, say):
                return
            continue
        text = read_message(line, more)
        pieces = []
        for piece in session.ask(text):
            pieces.append(piece)
            if not jsonl:
                out.write(escape_newlines(piece))
                out.flush()
        st = session.last_stats
        if jsonl:
            record: dict[str, Any] = {
                "user": text, "assistant": "".join(pieces), "prompt_tokens": st.prompt_tokens,
                "generation_tokens": st.generation_tokens, "finish_reason": st.finish_reason,
                "cache_tokens": session.cache_tokens,
            }
            out.write(json.dumps(record, ensure_ascii=False))
        out.write("\n")
        out.flush()
        after_turn()


@click.command("chat")
@model_options
@click.option("--system", help="System prompt.")
@click.option("--prompt-cache", type=click.Path(dir_okay=False, path_type=Path),
              help="Reuse the KV cache of the first prompt from this file, and save it there.")
@click.option("--jsonl", is_flag=True,
              help="When piped: print each answer as one JSON line with token counts.")
@sampling_options
@pipeline_options
def chat_command(model_path: str, backend: str, dtype: str | None, system: str | None,
                 prompt_cache: Path | None, jsonl: bool, pipeline: bool, pipeline_timeout: float,
                 **opts: Any) -> None:
    """Chat with a model; the KV cache is kept between turns.

    Interactive on a terminal.  With stdin piped, every line is one user turn
    (or a /command) and only the answers are printed, one per line: newlines
    inside an answer are written as \\n (and a backslash as \\\\); --jsonl
    prints JSON instead.  In both, a line ending with \\ continues the message on
    the next line, and \"\"\" ... \"\"\" wraps a multi-line message.
    """
    notify = lambda msg: click.echo(msg, err=True)  # noqa: E731
    if prompt_cache is not None and backend != "mlx":
        raise click.UsageError("--prompt-cache needs the mlx backend")
    loaded = None
    if pipeline:
        if backend != "mlx" or prompt_cache is not None:
            raise MlxLlamaError("--pipeline works on the mlx backend, without --prompt-cache")
        loaded = join_pipeline(model_path, dtype, pipeline_timeout, verbose=False, wait_idle=True)
        if loaded is None:
            return  # a rank > 0: it served its layers until rank 0 finished
    if prompt_cache is not None:
        refuse_foreign_file(prompt_cache)
    model, tokenizer = loaded if loaded is not None else load_backend(backend, model_path, dtype)
    session = ChatSession(
        model, tokenizer, system=system, sampling=sampling_params(opts, model.generation_config),
        max_tokens=opts["max_tokens"], notify=notify, **cache_kwargs(opts),
    )
    after_turn: Callable[[], None] = lambda: None
    if prompt_cache is not None:
        pc = PromptCacheFile(prompt_cache, model_path, model, notify)
        loaded = pc.load(session.max_kv_size, session.keep)
        if loaded is not None:
            session.adopt_cache(*loaded)  # the first turn keeps the prefix it shares
        after_turn = lambda: pc.store(session.cache, session.first_prompt_ids())  # noqa: E731
    stdin = sys.stdin
    if stdin.isatty():
        _interactive(session, after_turn)
    else:
        _scripted(session, iter(stdin), jsonl, after_turn)
