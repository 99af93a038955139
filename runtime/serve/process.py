"""``ServerProcess``: ``javisrt serve`` as a child process on a free loopback port, for tests and
``bench/serve_load.py``. Start-up and shutdown are bounded; the log goes to a file for post-mortems.

    with ServerProcess(["--tiny", "--sizes", "32x32"], log_path=tmp / "serve.log") as server:
        OpenAI(base_url=server.base_url, api_key="...")
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import httpx

from javisrt.engine.errors import JavisError

POLL_S = 0.2


class ServerStartError(JavisError, RuntimeError):
    """The server exited or did not become ready in time."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS considers free right now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServerProcess:
    def __init__(
        self,
        args: Sequence[str],
        *,
        log_path: str | os.PathLike[str],
        api_key: str | None = None,
        host: str = "127.0.0.1",
        startup_timeout_s: float = 300.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.args = list(args)
        self.log_path = Path(log_path)
        self.api_key = api_key
        self.host = host
        self.startup_timeout_s = startup_timeout_s
        self.env = env
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def start(self) -> ServerProcess:
        self.port = free_port(self.host)
        cmd = [sys.executable, "-m", "javisrt.runtime.cli", "serve", "--host", self.host, "--port", str(self.port),
               *self.args]  # fmt: skip
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        env = {**os.environ, **(self.env or {})}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout_s
        with httpx.Client(timeout=5.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise ServerStartError(f"javisrt serve exited with {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    if client.get(f"{self.url}/ready", headers=self.headers()).status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                time.sleep(POLL_S)
        self.stop(timeout_s=10.0)
        raise ServerStartError(f"javisrt serve was not ready within {self.startup_timeout_s:.0f} s:\n{self.log_tail()}")

    def rss_bytes(self) -> int:
        """Resident set size of the server process (Linux /proc)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise ServerStartError("VmRSS missing from /proc status")

    def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (graceful shutdown) and wait; SIGKILL if it does not exit in time. The exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10.0)
                raise ServerStartError(f"javisrt serve ignored SIGTERM for {timeout_s:.0f} s; killed") from None
        return int(self.proc.returncode)

    def stop(self, timeout_s: float = 60.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.terminate(timeout_s)
            except ServerStartError:
                pass

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
