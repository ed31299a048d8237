"""Start the real teacher service as a subprocess on 127.0.0.1 and a free port; run `tropd` in this process."""

from __future__ import annotations

import contextlib
import io
import subprocess
import traceback
from pathlib import Path

from services.teacher.launch import Launched, free_port, half_the_cores, launch

__all__ = ["Launched", "free_port", "start_teacher", "teacher", "tropd_here"]


def tropd_here(*args: str) -> subprocess.CompletedProcess:
    """`tropd ARGS` run in this process (`tropd.cli.main`, which `python -m tropd` calls), with its exit status,
    stdout and stderr as the command gives them: for tests of how a command refuses bad input, without the second
    or so of imports that a new interpreter takes. An exception that escapes `main` is printed as a traceback
    with status 1, as the interpreter would. Tests of a process's own behaviour (signals, exit at shutdown, what
    it leaves running) start the real command instead."""
    from tropd.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's errors and --help
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        except Exception:
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess(["tropd", *args], code, out.getvalue(), err.getvalue())


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
