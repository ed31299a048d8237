"""Start the real teacher service as a subprocess on 127.0.0.1 and a free port."""

from __future__ import annotations

import contextlib
from pathlib import Path

from services.teacher.launch import Launched, free_port, half_the_cores, launch

__all__ = ["Launched", "free_port", "start_teacher", "teacher"]


def start_teacher(model: Path, engine: str, log_dir: Path, *args: str, env: dict | None = None) -> Launched:
    if engine == "hf" and "--threads" not in args:
        # half the cores (unless the test says otherwise), the other half left to the test's own clients or trainer:
        # with every core, the service's OpenMP threads spin against any other load and a forward pass on 2 shared
        # cores takes 10-40 times as long (OMP_NUM_THREADS does not apply: `serve` sets its torch threads itself)
        args = (*args, "--threads", str(half_the_cores()))
    port = free_port()
    key = (env or {}).get("TROPD_TEST_KEY")
    headers = {"authorization": f"Bearer {key}"} if key else None
    log_path = log_dir / f"teacher-{engine}-{port}.log"
    return launch(model, engine, log_path, *args, port=port, env=env, ready_headers=headers, timeout=240)


@contextlib.contextmanager
def teacher(model: Path, engine: str, log_dir: Path, *args: str, env: dict | None = None):
    service = start_teacher(model, engine, log_dir, *args, env=env)
    try:
        yield service
    finally:
        service.stop()
