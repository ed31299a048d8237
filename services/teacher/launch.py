"""Start the teacher service as a subprocess and wait until it is ready; stop it gracefully.

Used by `tropd demo`, the benchmarks and the tests: they talk to a real service over HTTP, never to the
server's modules in-process.
"""

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

from tropd.machine import torch_threads


def half_the_cores() -> int:
    """Torch threads for each of a teacher and a trainer sharing one machine: half the cores each, at least one,
    so that neither slows the other by taking every core."""
    return torch_threads(share=2, cap=1 << 16)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Launched:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (finish in-flight requests, exit 0), then SIGKILL after `timeout` seconds."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def wait_ready(url: str, process: subprocess.Popen, log_path: Path, timeout: float = 300, headers=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the teacher exited with status {process.returncode}:\n{_tail(log_path)}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2, headers=headers).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    process.kill()
    process.wait()
    raise RuntimeError(f"the teacher was not ready after {timeout:.0f}s:\n{_tail(log_path)}")


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else ""


def launch(
    model: str | Path,
    engine: str,
    log_path: Path,
    *args: str,
    host: str = "127.0.0.1",
    port: int | None = None,
    env: dict | None = None,
    ready_headers: dict | None = None,
    timeout: float = 300,
) -> Launched:
    port = port or free_port(host)
    command = [sys.executable, "-m", "tropd", "teacher", "serve", "--model", str(model), "--engine", engine]
    command += ["--host", host, "--port", str(port), *args]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        command, stdout=log_path.open("w"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
    )
    url = f"http://{host}:{port}"
    try:
        wait_ready(url, process, log_path, timeout, ready_headers)
    except BaseException:
        if process.poll() is None:
            process.kill()
            process.wait()
        raise
    return Launched(url, process, log_path)


@contextlib.contextmanager
def serving(model: str | Path, engine: str, log_path: Path, *args: str, **kwargs):
    service = launch(model, engine, log_path, *args, **kwargs)
    try:
        yield service
    finally:
        service.stop()
