"""Start the real teacher service as a subprocess on 127.0.0.1 and a free port."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Service:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def wait_ready(url: str, process: subprocess.Popen, log_path: Path, timeout: float = 240, headers=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"teacher exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2, headers=headers).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    process.kill()
    raise RuntimeError(f"teacher not ready after {timeout}s:\n{log_path.read_text()[-3000:]}")


def start_teacher(model: Path, engine: str, log_dir: Path, *args: str, env: dict | None = None) -> Service:
    port = free_port()
    log_path = log_dir / f"teacher-{engine}-{port}.log"
    command = [sys.executable, "-m", "tropd", "teacher", "serve", "--model", str(model), "--engine", engine]
    command += ["--host", "127.0.0.1", "--port", str(port), *args]
    full_env = {**os.environ, **(env or {})}
    process = subprocess.Popen(command, stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=full_env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    key = (env or {}).get("TROPD_TEST_KEY")
    wait_ready(url, process, log_path, headers={"authorization": f"Bearer {key}"} if key else None)
    return Service(url, process, log_path)


@contextlib.contextmanager
def teacher(model: Path, engine: str, log_dir: Path, *args: str, env: dict | None = None):
    service = start_teacher(model, engine, log_dir, *args, env=env)
    try:
        yield service
    finally:
        service.stop()
