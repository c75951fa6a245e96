"""`mlx-llama serve` as a subprocess on a free loopback port, for tests/test_serve*.py."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


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
