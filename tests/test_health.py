"""Honest health: once the engine is dead, /healthz and /readyz answer 503, every waiting and later request
is answered 503 (`engine_failed`), and the process exits non-zero so that its supervisor replaces it.

The batcher's rules are checked with small engines that die on cue; the service is checked by killing its
real vLLM engine-core process (SIGKILL) while it serves."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import httpx
import pytest

from services.teacher.batching import Batcher, EngineFailed
from services.teacher.cli import EXIT_ENGINE_FAILED
from services.teacher.engines.types import ScoreItem
from tests.helpers import teacher


class EngineDeadError(RuntimeError):
    """Named as vLLM's: the batcher recognises it by name."""


class DyingEngine:
    """Serves `healthy_calls` engine calls, then dies: raises `error` (and says it is dead, if `alive` is
    given), the first failing call waiting for `release` so that the test can queue requests behind it."""

    def __init__(self, healthy_calls: int, error: Exception, report_dead: bool = False):
        self.calls, self.healthy_calls, self.error, self.report_dead = 0, healthy_calls, error, report_dead
        self.dead = False
        self.started, self.release = threading.Event(), threading.Event()

    def score(self, items):
        self.calls += 1
        if self.calls <= self.healthy_calls:
            return [None] * len(items)
        self.started.set()
        self.release.wait(10)
        self.dead = self.report_dead
        raise self.error

    def alive(self) -> bool:
        return not self.dead


def run_until_death(engine) -> tuple[list, list[str], Exception | None]:
    """One request served, then four in the queue when the engine dies; then one more request."""
    fatal: list[str] = []

    async def go():
        batcher = Batcher(engine, max_batch_tokens=4, window_ms=0, on_fatal=fatal.append)
        item = [ScoreItem([1, 2, 3], 1, 0)]
        assert await batcher.score(item) == [None]
        dying = asyncio.ensure_future(batcher.score(item, "a"))
        await asyncio.to_thread(engine.started.wait, 10)
        queued = [asyncio.ensure_future(batcher.score(item, c)) for c in "abcd"]
        await asyncio.sleep(0.05)
        engine.release.set()
        answers = await asyncio.gather(dying, *queued, return_exceptions=True)
        later = None
        try:
            await batcher.score(item)
        except Exception as exc:
            later = exc
        batcher.close(timeout=5)
        return answers, later

    answers, later = asyncio.run(go())
    return answers, fatal, later


def test_a_dead_engine_fails_every_waiting_and_later_request_once():
    answers, fatal, later = run_until_death(DyingEngine(1, EngineDeadError("core gone")))
    assert len(answers) == 5 and all(isinstance(a, EngineFailed) for a in answers), answers
    assert fatal == ["the engine failed: EngineDeadError: core gone"]  # reported once
    assert isinstance(later, EngineFailed) and "core gone" in str(later)


def test_an_engine_that_reports_itself_dead_after_an_error_is_dead():
    answers, fatal, later = run_until_death(DyingEngine(1, RuntimeError("lost the device"), report_dead=True))
    assert all(isinstance(a, EngineFailed) for a in answers) and len(fatal) == 1
    assert isinstance(later, EngineFailed)


def test_an_error_of_one_batch_from_a_live_engine_fails_that_batch_only():
    engine = DyingEngine(1, ValueError("bad batch"))
    answers, fatal, later = run_until_death(engine)
    assert all(isinstance(a, ValueError) for a in answers)  # each batch failed on its own
    assert fatal == [] and isinstance(later, ValueError)  # and the engine is still called


def test_an_engine_found_dead_by_the_watchdog_is_reported_without_a_request():
    engine = DyingEngine(0, RuntimeError("unused"))
    fatal: list[str] = []
    batcher = Batcher(engine, on_fatal=fatal.append)
    engine.dead = True
    deadline = time.monotonic() + 5
    while not fatal and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fatal == ["the engine stopped: it reports itself dead"]
    assert batcher.failure == fatal[0]
    batcher.close(timeout=5)


def _children(pid: int) -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process(pid).children(recursive=True)]


@pytest.mark.vllm
@pytest.mark.timeout(300)
def test_killing_the_engine_process_makes_the_service_unhealthy_and_exit(toy_quick, tmp_path):
    """vLLM's engine core in its own process (VLLM_ENABLE_V1_MULTIPROCESSING=1), killed with SIGKILL while
    clients keep sending: /readyz and /healthz answer 503 within a second, requests get 503 engine_failed
    (none hangs, none gets a 500), and the service exits with status 3 soon after."""
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "OMP_NUM_THREADS": "1"}
    body = {"sequences": [[1] + [5] * 60] * 4, "top_k": 2}
    with teacher(toy_quick / "teacher", "vllm", tmp_path, env=env) as svc:
        assert httpx.post(f"{svc.url}/v1/score", json=body, timeout=60).status_code == 200
        engine_processes = _children(svc.process.pid)
        assert engine_processes, "vLLM started no engine-core process"
        statuses: list[int] = []
        stop = threading.Event()

        def keep_sending():
            with httpx.Client(base_url=svc.url, timeout=30) as client:
                while not stop.is_set():
                    try:
                        answer = client.post("/v1/score", json=body)
                    except httpx.TransportError:
                        break  # the service has gone
                    statuses.append(answer.status_code)
                    if answer.status_code == 503:
                        assert answer.json()["error"]["type"] == "engine_failed"

        senders = [threading.Thread(target=keep_sending) for _ in range(3)]
        for sender in senders:
            sender.start()
        time.sleep(1.0)
        killed = time.monotonic()
        for pid in engine_processes:
            os.kill(pid, signal.SIGKILL)
        probes = {}
        while time.monotonic() - killed < 10 and len(probes) < 3:
            for path in ("/readyz", "/healthz", "/health"):
                if path not in probes and httpx.get(f"{svc.url}{path}", timeout=5).status_code == 503:
                    probes[path] = time.monotonic() - killed
            time.sleep(0.05)
        assert set(probes) == {"/readyz", "/healthz", "/health"}, probes
        assert svc.process.wait(30) == EXIT_ENGINE_FAILED, svc.log()[-3000:]
        exited = time.monotonic() - killed
        stop.set()
        for sender in senders:
            sender.join(30)
    print(f"engine killed: probes 503 after {max(probes.values()):.2f} s, exit {exited:.1f} s; statuses {statuses}")
    assert max(probes.values()) < 2
    assert set(statuses) <= {200, 503} and 503 in statuses
    assert '"event": "engine_failed"' in svc.log()
