"""`mlx-llama serve` with an API key and CORS, on a model without a tokenizer (token-id prompts),
then SIGTERM in the middle of a stream: the stream finishes and the server stops cleanly."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from click.testing import CliRunner

from mlx_llama.cli.main import main
from serve_process import ServerProcess

openai = pytest.importorskip("openai")

KEY = "s3cret-key"
FRONT_END = "http://front-end.localhost:3000"


@pytest.fixture(scope="module")
def server(make_checkpoint: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    work = tmp_path_factory.mktemp("serve-auth")
    (work / "key").write_text(KEY + "\n")
    proc = ServerProcess(make_checkpoint(), work / "server.log", "--api-key-file", str(work / "key"),
                         "--cors-origins", FRONT_END, "--parallel", "2")
    yield proc
    proc.stop_cleanly()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_health_needs_no_key(server: ServerProcess) -> None:
    assert httpx.get(f"{server.url}/health").status_code == 200


@pytest.mark.parametrize("headers", [{}, auth("wrong"), auth(KEY + "x"), {"Authorization": f"Basic {KEY}"}])
@pytest.mark.parametrize("method,path", [("GET", "/v1/models"), ("GET", "/metrics"),
                                         ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")])
def test_without_the_key_every_endpoint_is_401(server: ServerProcess, method: str, path: str,
                                               headers: dict[str, str]) -> None:
    r = httpx.request(method, f"{server.url}{path}", headers=headers, json={"prompt": [1, 2]})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["type"] == "authentication_error"


def test_token_id_completion_with_the_key(server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    model = client.models.list().data[0].id
    r = client.completions.create(model=model, prompt=[1, 17, 42, 99], max_tokens=5, temperature=0)
    assert r.choices[0].text == "" and r.usage.prompt_tokens == 4
    raw = httpx.post(f"{server.url}/v1/completions", headers=auth(KEY),
                     json={"prompt": [1, 17, 42, 99], "max_tokens": 5, "temperature": 0}).json()
    token_ids = raw["choices"][0]["token_ids"]
    assert len(token_ids) == r.usage.completion_tokens and all(0 <= t < 256 for t in token_ids)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_chat_without_tokenizer_is_400(server: ServerProcess) -> None:
    r = httpx.post(f"{server.url}/v1/chat/completions", headers=auth(KEY),
                   json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_tokenizer"


def test_cors_preflight(server: ServerProcess) -> None:
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    ok = httpx.options(f"{server.url}/v1/completions", headers={"Origin": FRONT_END, **preflight})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == FRONT_END
    other = httpx.options(f"{server.url}/v1/completions", headers={"Origin": "http://evil.localhost", **preflight})
    assert "access-control-allow-origin" not in other.headers


def test_sigterm_drains_the_open_stream_then_stops(server: ServerProcess) -> None:
    """Last in this module: it stops the server."""
    body = {"prompt": [1, 2, 3], "max_tokens": 40, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", headers=auth(KEY), json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: {")
        server.proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert sum(line.count('"token_ids":[') for line in rest) == 39  # every token after the first
    server.proc.wait(30)
    assert "engine stopped" in server.output()


@pytest.mark.parametrize("args,message", [
    (["--api-key", "a", "--api-key-file", "k"], "not both"),
    (["--api-key", " "], "empty"),
    (["--api-key-file", "/nonexistent/key"], "cannot read the API key file"),
    (["--kv-budget", "lots"], "is not a byte size"),
    (["--gap-target-ms", "-1"], "not in the range"),
])
def test_bad_serve_flags_are_one_line_errors(args: list[str], message: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["serve", "-m", str(tmp_path), *args])
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output
