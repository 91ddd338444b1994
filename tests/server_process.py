"""A real kvserve server process on 127.0.0.1 for end-to-end tests, stopped by its PID."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_healthy(proc: subprocess.Popen, url: str, timeout: float, name: str, log) -> bool:
    """Poll `url` until it answers 200 (True) or `timeout` passes (False); raise if the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False


class ServerProcess:
    """`python -m service serve` with the given flags; waits for /health to be 200.

    Usage: with ServerProcess("--max-queue", "4") as server: httpx.get(server.url + "/health")
    """

    def __init__(self, *flags: str, env: dict[str, str] | None = None, startup_timeout: float = 180.0,
                 command: list[str] | None = None, cwd: Path = REPO):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = command or [sys.executable, "-m", "service", "serve", "--port", str(self.port), *flags]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.startup_timeout, self.cwd = startup_timeout, cwd
        self.proc: subprocess.Popen | None = None
        self.log_file = tempfile.NamedTemporaryFile("w+", prefix="kvserve-", suffix=".log", delete=False)

    def start(self) -> ServerProcess:
        self.proc = subprocess.Popen(self.command, cwd=self.cwd, env=self.env, stdout=self.log_file,
                                     stderr=subprocess.STDOUT)
        if not wait_until_healthy(self.proc, self.url + "/health", self.startup_timeout, "server", self.log):
            self.stop()
            raise RuntimeError(f"server not healthy after {self.startup_timeout} s:\n{self.log()}")
        return self

    def log(self) -> str:
        self.log_file.flush()
        return Path(self.log_file.name).read_text()

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
