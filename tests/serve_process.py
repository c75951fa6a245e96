"""`mlx-llama serve` as a subprocess on a free loopback port, for tests/test_serve*.py."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model: Path, log: Path, *args: str, startup_s: float = 120) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._log_file = open(log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlx_llama", "serve", "-m", str(model), "--port", str(self.port),
             "--log-level", "info", *args],
            stdout=self._log_file, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server did not come up in {startup_s} s:\n{self.output()}")

    def output(self) -> str:
        if not self._log_file.closed:
            self._log_file.flush()
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (a clean drain and stop), then the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()
        return self.proc.returncode

    def stop_cleanly(self) -> None:
        """SIGTERM must drain and stop the engine; uvicorn then exits by the signal, as it should."""
        status = self.stop()
        assert status in (0, -signal.SIGTERM), self.output()
        assert "engine stopped" in self.output(), self.output()


def generated_tokens(server: ServerProcess) -> float:
    """The server's count of generated tokens (/metrics): a refused request must not move it."""
    text = httpx.get(f"{server.url}/metrics").text
    return float(re.search(r"^mlx_llama_generated_tokens_total (\S+)$", text, re.M).group(1))


# Fixtures of the response_format and tools tests (a module imports them to use them): a server of
# the tiny chat model with 4 slots, named "tiny", and the official `openai` client on it.

@pytest.fixture(scope="module", name="server")
def tiny_server(tiny_chat_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tiny_chat_model, tmp_path_factory.mktemp("serve") / "server.log", "--parallel", "4",
                         "--model-name", "tiny")
    yield proc
    proc.stop()


@pytest.fixture(scope="module", name="client")
def tiny_client(server: ServerProcess) -> Any:
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
