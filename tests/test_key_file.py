"""The trainer's API key from a file (a mounted Kubernetes Secret), against the real teacher service: a key
rotated while the client runs needs no restart, in either order (the file first, or the teacher first)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from services.teacher.client import TeacherClient, TeacherError
from services.teacher.launch import free_port, launch
from trainer.config import load_config
from trainer.teacher_link import TeacherLink
from tropd.errors import UserError

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
SEQUENCES = [[1, 5, 6, 7, 8], [1, 9, 10, 11]]


def serve(model: Path, port: int, key: str, log: Path):
    """The teacher with auth on, as a deployment runs it (--api-key-env)."""
    return launch(model, "hf", log, "--api-key-env", "TROPD_TEST_KEY", "--threads", "1", port=port,
                  env={**ONE_THREAD, "TROPD_TEST_KEY": key}, ready_headers={"authorization": f"Bearer {key}"},
                  timeout=240)  # fmt: skip


def test_rotated_key_file_needs_no_restart(toy_quick, tmp_path):
    key_file, port = tmp_path / "api-key", free_port()
    key_file.write_text("key-a\n")
    service = serve(toy_quick / "teacher", port, "key-a", tmp_path / "teacher-a.log")
    client = TeacherClient(service.url, api_key_file=str(key_file), retries=20, backoff=0.1, max_backoff=0.5)
    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(client.info())["vocab_size"] > 0

        # 1. the Secret first, then the teacher restarted with the new key: the first 401 re-reads the file
        key_file.write_text("key-b\n")
        assert loop.run_until_complete(client.info())  # the teacher still has key-a, the client kept it
        service.stop()
        service = serve(toy_quick / "teacher", port, "key-b", tmp_path / "teacher-b.log")
        retried = client.retried
        scores = loop.run_until_complete(client.score(SEQUENCES, start=1, top_k=4))
        assert [len(s.logprobs) for s in scores] == [4, 3] and client.retried == retried  # retried at once

        # 2. the teacher first (its replicas change over before the Secret reaches this pod): 401s are retried
        # with back-off, reading the file each time, until it holds the new key
        service.stop()
        service = serve(toy_quick / "teacher", port, "key-c", tmp_path / "teacher-c.log")
        threading.Timer(1.5, key_file.write_text, args=("key-c\n",)).start()
        start = time.monotonic()
        scores = loop.run_until_complete(client.score(SEQUENCES, start=1, top_k=4))
        assert [len(s.logprobs) for s in scores] == [4, 3]
        assert client.retried > retried and time.monotonic() - start >= 1.4

        # a key that never worked is refused at once (a wrong key at start-up is a clear error, not a wait)
        key_file.write_text("wrong\n")
        fresh = TeacherClient(service.url, api_key_file=str(key_file), retries=20, backoff=0.1)
        start = time.monotonic()
        with pytest.raises(TeacherError) as caught:
            loop.run_until_complete(fresh.info())
        assert caught.value.status == 401 and time.monotonic() - start < 5 and fresh.retried == 0
        loop.run_until_complete(fresh.aclose())
    finally:
        loop.run_until_complete(client.aclose())
        loop.close()
        service.stop()


def test_key_file_settings_are_checked_at_start(tmp_path):
    with pytest.raises(UserError, match="api_key_env and api_key_file are both set"):
        load_config(None, ["teacher.api_key_env=TROPD_API_KEY", f"teacher.api_key_file={tmp_path / 'key'}"])
    config = load_config(None, [f"teacher.api_key_file={tmp_path / 'missing'}"])
    with pytest.raises(UserError, match="^teacher.api_key_file: cannot read the API key file .*missing"):
        TeacherLink(config.teacher)
    (tmp_path / "empty").write_text("\n")
    config = load_config(None, [f"teacher.api_key_file={tmp_path / 'empty'}"])
    with pytest.raises(UserError, match="^teacher.api_key_file: the API key file .*empty is empty$"):
        TeacherLink(config.teacher)
    with pytest.raises(ValueError, match="not both"):
        TeacherClient("http://127.0.0.1:1", api_key="a", api_key_file=str(tmp_path / "empty"))
