"""`mlx-llama serve` end to end: one server subprocess (tiny random model, Llama-3 tokenizer) driven
by the official `openai` client and raw HTTP.  The process must survive every test: the last one
checks it is still healthy and that SIGTERM stops it cleanly."""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from mlx_llama.generation.loop import generate_tokens
from mlx_llama.generation.sampler import Sampler, SamplingParams
from mlx_llama.loader import load_model
from mlx_llama.tokenizer import Tokenizer
from serve_process import ServerProcess

openai = pytest.importorskip("openai")

MODEL = "tiny-chat"


@pytest.fixture(scope="module")
def quantized_chat_model(tiny_chat_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4-bit weights: their default kernel is batch-invariant (README "Batched generation"); float BLAS is not."""
    from mlx_llama.convert import convert

    out = tmp_path_factory.mktemp("serve-q4") / "model"
    convert(str(tiny_chat_model), str(out), bits=4, group_size=32, log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def server(quantized_chat_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("serve") / "server.log"
    proc = ServerProcess(quantized_chat_model, log, "--model-name", MODEL, "--parallel", "8",
                         "--kv-budget", "256M", "--prompt-cache-bytes", "64M", "--max-tokens", "5",
                         "--gap-target-ms", "250")
    yield proc
    proc.stop_cleanly()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Any:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_model: Path) -> Tokenizer:
    return Tokenizer.from_dir(tiny_chat_model)


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def chat(client: Any, text: str, **kw: Any) -> Any:
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL, messages=user(text), **kw)


def stream_chat(client: Any, text: str, **kw: Any) -> tuple[str, list[Any]]:
    chunks = list(client.chat.completions.create(model=MODEL, messages=user(text), temperature=0,
                                                 stream=True, **kw))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def test_models_and_health(server: ServerProcess, client: Any) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_chat_completion_usage(client: Any, tokenizer: Tokenizer) -> None:
    r = chat(client, "Hello there", max_tokens=6)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert r.usage.prompt_tokens == len(tokenizer.encode_chat(user("Hello there")))
    assert r.usage.completion_tokens == 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6
    assert r.usage.prompt_tokens_details.cached_tokens == 0


def test_chat_without_max_tokens_gets_the_server_default(client: Any) -> None:
    r = client.chat.completions.create(model=MODEL, messages=user("Hello"), temperature=0)
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"


def test_chat_stream_matches_non_stream(client: Any) -> None:
    whole = chat(client, "Tell me a story", max_tokens=8).choices[0].message.content
    text, chunks = stream_chat(client, "Tell me a story", max_tokens=8, stream_options={"include_usage": True})
    assert text == whole
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks[-2:-1]] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert all(c.usage is None for c in chunks[:-1])


def test_raw_sse_framing(server: ServerProcess) -> None:
    body = {"model": MODEL, "messages": user("hi"), "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"


def test_completions_stream_and_not(client: Any, tokenizer: Tokenizer) -> None:
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=7, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(tokenizer.encode("Once upon a time", add_bos=True))
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=7,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_string_across_tokens_is_not_emitted(client: Any) -> None:
    full = chat(client, "Count for me", max_tokens=12).choices[0].message.content
    stop = full[3:9]  # likely spans a token boundary; never emitted either way
    r = chat(client, "Count for me", max_tokens=12, stop=[stop])
    assert r.choices[0].message.content == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    text, chunks = stream_chat(client, "Count for me", max_tokens=12, stop=stop)
    assert text == full[: full.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_chat_logprobs(client: Any) -> None:
    r = chat(client, "Hi", max_tokens=4, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and tops[0] <= 0
        assert entry.logprob == pytest.approx(tops[0])  # greedy picks the most likely token
        assert entry.token == entry.top_logprobs[0].token
    assert "".join(e.token for e in content) == r.choices[0].message.content


def test_completion_logprobs(client: Any) -> None:
    r = client.completions.create(model=MODEL, prompt="The sky", max_tokens=3, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert all(len(t) <= 2 for t in lp.top_logprobs) and lp.text_offset[0] == 0


def test_seeded_sampling_is_reproducible(client: Any) -> None:
    ours = {"top_k": 50, "min_p": 0.01, "repetition_penalty": 1.1}  # not in OpenAI's signature
    runs = [chat(client, "Pick", max_tokens=6, temperature=1.0, top_p=0.9, seed=7,
                 extra_body=ours).choices[0].message.content for _ in range(2)]
    assert runs[0] == runs[1]


def test_penalties_match_the_single_sequence_loop(client: Any, quantized_chat_model: Path,
                                                 tokenizer: Tokenizer) -> None:
    prompt = tokenizer.encode("Once upon a time", add_bos=True)
    penalties = {"presence_penalty": 0.6, "frequency_penalty": 1.2}
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, **penalties)
    ids = list(generate_tokens(load_model(quantized_chat_model, "float32"), prompt, max_tokens=12,
                               sampler=Sampler(SamplingParams(**penalties)), stop_ids=tokenizer.stop_ids))
    answer = [t for t in ids if t not in tokenizer.stop_ids]
    assert r.choices[0].text == tokenizer.decode(answer)
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert plain.choices[0].text != r.choices[0].text


def by_index(chunks: list[Any], field: str) -> dict[int, str]:
    """A streamed answer's text per choice index (chat: the deltas' content; completions: text)."""
    texts: dict[int, str] = {}
    for c in chunks:
        for choice in c.choices:
            piece = choice.delta.content if field == "content" else choice.text
            texts[choice.index] = texts.get(choice.index, "") + (piece or "")
    return texts


def test_n_chat_choices_stream_and_not(client: Any, tokenizer: Tokenizer) -> None:
    kw = dict(max_tokens=4, temperature=1.0, seed=11)
    r = chat(client, "Give me options", n=3, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in r.choices)
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) == 3  # each choice samples with its own seed
    assert r.usage.prompt_tokens == len(tokenizer.encode_chat(user("Give me options")))  # counted once
    assert r.usage.completion_tokens == 3 * 4
    assert [c.message.content for c in chat(client, "Give me options", n=3, **kw).choices] == texts  # reproducible
    assert chat(client, "Give me options", **kw).choices[0].message.content == texts[0]  # choice 0 is n=1's
    chunks = list(client.chat.completions.create(model=MODEL, messages=user("Give me options"), n=3, stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    assert by_index(chunks, "content") == dict(enumerate(texts))
    finishes = [(ch.index, ch.finish_reason) for c in chunks for ch in c.choices if ch.finish_reason]
    assert sorted(finishes) == [(0, "length"), (1, "length"), (2, "length")]
    roles = [ch.index for c in chunks for ch in c.choices if ch.delta.role == "assistant"]
    assert roles == [0, 1, 2]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_n_text_completions_stream_and_not(client: Any) -> None:
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0.8, seed=3, n=3)
    r = client.completions.create(**kw)
    texts = {c.index: c.text for c in r.choices}
    assert sorted(texts) == [0, 1, 2] and len(set(texts.values())) == 3
    assert r.usage.completion_tokens == 15
    assert by_index(list(client.completions.create(stream=True, **kw)), "text") == texts


def test_n_choices_share_one_prefill(server: ServerProcess, client: Any) -> None:
    """The prompt is read once (by a one-token primer); each choice reads only its last partial chunk."""
    prompt = list(range(1000, 1070))  # 70 ids no other test sends
    aligned = (len(prompt) - 1) // 32 * 32  # what the prefix cache reuses (whole 32-token chunks)

    def prefilled() -> float:
        return _metric(server, "mlx_llama_prompt_tokens_total") - _metric(server, "mlx_llama_prompt_cached_tokens_total")

    before = prefilled()
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, n=3)
    assert prefilled() - before == len(prompt) + 3 * (len(prompt) - aligned)  # not 3 × 70
    assert r.usage.prompt_tokens == len(prompt) and r.usage.prompt_tokens_details.cached_tokens == 0
    assert len({c.text for c in r.choices}) == 1  # greedy: every choice is the same answer
    again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, n=3)
    assert again.usage.prompt_tokens_details.cached_tokens == aligned


def test_eight_concurrent_streams_equal_solo_runs(client: Any) -> None:
    prompts = [f"Request number {i}: " + "word " * (3 * i) for i in range(8)]
    solo = [stream_chat(client, p, max_tokens=10)[0] for p in prompts]
    together: list[str | None] = [None] * 8

    def run(i: int) -> None:
        together[i] = stream_chat(client, prompts[i], max_tokens=10)[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert together == solo


def test_shared_prefix_reports_cached_tokens(client: Any) -> None:
    system = {"role": "system", "content": "You are a careful assistant. " * 12}
    first = client.chat.completions.create(model=MODEL, messages=[system, *user("first question")],
                                           max_tokens=2, temperature=0)
    second = client.chat.completions.create(model=MODEL, messages=[system, *user("second one")],
                                            max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 32 <= cached < second.usage.prompt_tokens


def _metric(server: ServerProcess, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_disconnect_mid_stream_frees_the_slot(server: ServerProcess, client: Any) -> None:
    body = {"model": MODEL, "messages": user("go on forever"), "max_tokens": 1500, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
    # The connection is closed: the engine drops the request at its next step.
    for _ in range(100):
        if _metric(server, "mlx_llama_batch_size") == 0:
            break
        threading.Event().wait(0.1)
    assert _metric(server, "mlx_llama_batch_size") == 0
    assert chat(client, "still there?", max_tokens=2).choices[0].finish_reason == "length"


BAD_REQUESTS = [
    ("/v1/chat/completions", b'{"messages": [', 400, None),
    ("/v1/chat/completions", b'[1, 2]', 400, None),
    ("/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, None),
    ("/v1/chat/completions", {"messages": user("x"), "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": user("x"), "temperature": 5}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": user("x"), "top_p": 0}, 400, "top_p"),
    ("/v1/chat/completions", {"messages": user("x"), "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": user("x"), "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": user("x"), "top_logprobs": 3}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": user("x"), "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": user("x"), "n": 17}, 400, "n"),
    ("/v1/chat/completions", {"messages": user("x"), "n": 0}, 400, "n"),
    ("/v1/chat/completions", {"messages": user("x"), "n": 2, "seed": -1}, 400, "seed"),
    ("/v1/chat/completions", {"messages": user("x"), "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("/v1/chat/completions", {"messages": user("x"), "frequency_penalty": -3}, 400, "frequency_penalty"),
    ("/v1/chat/completions", {"messages": user("x"), "logit_bias": {"5": 1.0}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"messages": user("x"), "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("/v1/chat/completions", {"messages": user("x"), "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array", "uniqueItems": True}}}}, 400, "response_format"),
    ("/v1/chat/completions", {"messages": user("x"), "tools": [{"type": "function"}]}, 400, "tools.0.function"),
    ("/v1/chat/completions", {"messages": user("x"), "model": "gpt-4"}, 404, "model"),
    ("/v1/chat/completions", {"messages": user("word " * 2100)}, 400, "messages"),
    ("/v1/completions", {"prompt": [1, 2, 10**9]}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "logprobs": 9}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "echo": True}, 400, "echo"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
]


@pytest.mark.parametrize("path,body,status,param", BAD_REQUESTS)
def test_bad_request_gets_an_error_object(server: ServerProcess, path: str, body: Any, status: int,
                                          param: str | None) -> None:
    content = body if isinstance(body, bytes) else None
    r = httpx.post(f"{server.url}{path}", content=content, json=None if content else body,
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param or error["param"].startswith(param), error


def test_structured_output_refusal_says_why(server: ServerProcess) -> None:
    body = {"messages": user("x"), "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}
    error = httpx.post(f"{server.url}/v1/chat/completions", json=body).json()["error"]
    assert "json_schema needs a schema" in error["message"]


def test_prompt_too_long_says_so(server: ServerProcess) -> None:
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": [5] * 2048})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize("method,path,status", [("GET", "/nowhere", 404), ("GET", "/v1/chat/completions", 405)])
def test_unknown_routes_get_an_error_object(server: ServerProcess, method: str, path: str, status: int) -> None:
    r = httpx.request(method, f"{server.url}{path}")
    assert r.status_code == status and r.json()["error"]["message"]


def test_openai_client_raises_on_bad_input(client: Any) -> None:
    with pytest.raises(openai.BadRequestError):
        chat(client, "x", max_tokens=2, n=17)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=user("x"))


def test_metrics_count_requests_and_tokens(server: ServerProcess) -> None:
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("mlx_llama_http_requests_total", "mlx_llama_generated_tokens_total", "mlx_llama_queue_depth",
                 "mlx_llama_batch_size", "mlx_llama_kv_cache_bytes", "mlx_llama_prefix_cache_hits_total"):
        assert name in text
    assert _metric(server, "mlx_llama_prefix_cache_hits_total") >= 1


def test_server_survived_everything(server: ServerProcess, client: Any) -> None:
    assert server.proc.poll() is None
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert chat(client, "last one", max_tokens=2).choices[0].message.content
