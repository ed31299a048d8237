"""Batching of requests from all clients into engine calls, under a token budget, shared fairly.

Handlers `await` the batcher; one worker thread runs the engine. Requests are queued per client
(`fairness.FairQueue`): scoring requests are merged, in fair order, into one engine call of at most
`max_batch_tokens` tokens, waiting up to a short window for more; a continuation request runs alone (all its
prefixes at once). Admission is bounded twice, and never queues without bound: past `max_inflight_tokens` in
all, a request is refused with `Overloaded` (503 + `Retry-After`); past `max_client_inflight_tokens` for its
own client, with `ClientOverQuota` (429 + `Retry-After`). A request is always admitted when nothing of its
kind is in flight, so that one as large as the request limit can pass.

Engine failure: an exception from an engine call fails that batch's requests only, unless the engine is
dead (its `alive()` says so, or the exception is vLLM's `EngineDeadError`), or the worker loop itself
fails. A watchdog thread also asks `alive()` every WATCHDOG_S, since an engine whose process was killed
may never return from the call it was in. Then every running, queued and later request fails with
`EngineFailed` (503) and `on_fatal(reason)` is called once, so that the service reports itself unhealthy
and exits.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

from services.teacher.engines.types import SamplingSpec, ScoreItem
from services.teacher.fairness import FairQueue

ANONYMOUS = "anonymous"
WATCHDOG_S = 0.5  # how often the watchdog asks the engine whether it is alive
FATAL_ERRORS = {"EngineDeadError"}  # by name: vLLM need not be importable


class Overloaded(Exception):
    def __init__(self, retry_after: float):
        super().__init__(f"the teacher is at capacity; retry after {retry_after:.0f}s")
        self.retry_after = retry_after


class ClientOverQuota(Exception):
    def __init__(self, client: str, limit: int, retry_after: float = 1.0):
        super().__init__(
            f"client {client!r} has {limit} tokens in flight at most (--max-client-inflight-tokens); "
            f"retry after {retry_after:.0f}s"
        )
        self.retry_after = retry_after


class ShuttingDown(Exception):
    pass


class EngineFailed(Exception):
    """The engine is dead: this request was not (and no later one will be) served by this process."""


@dataclass
class _Job:
    kind: str  # "score" | "generate"
    payload: object
    tokens: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    spec: SamplingSpec | None = None
    client: str = ANONYMOUS
    tag: float = 0.0
    enqueued: float = field(default_factory=time.monotonic)


def engine_alive(engine) -> bool:
    """An engine without an `alive()` method (the transformers one runs in this process) is alive."""
    alive = getattr(engine, "alive", None)
    return True if alive is None else bool(alive())


class Batcher:
    def __init__(
        self,
        engine,
        *,
        max_batch_tokens: int = 32768,
        window_ms: float = 2.0,
        max_inflight_tokens: int = 1 << 20,
        max_client_inflight_tokens: int | None = None,
        policy: str = "fair",
        weights: dict[str, float] | None = None,
        metrics=None,
        on_fatal=None,
    ):
        self.engine = engine
        self.max_batch_tokens = max_batch_tokens
        self.window = window_ms / 1000
        self.max_inflight_tokens = max_inflight_tokens
        self.max_client_inflight_tokens = max_client_inflight_tokens or max_inflight_tokens
        self.metrics = metrics
        self.on_fatal = on_fatal
        self.failure: str | None = None
        self._queue = FairQueue(policy, weights)
        self._cv = threading.Condition()
        self._inflight = 0
        self._client_inflight: dict[str, int] = {}
        self._closing = False
        self._running: list[_Job] = []
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="teacher-engine", daemon=True)
        self._thread.start()
        if hasattr(engine, "alive"):
            threading.Thread(target=self._watch, name="teacher-engine-watchdog", daemon=True).start()

    @property
    def inflight_tokens(self) -> int:
        return self._inflight

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    async def score(self, items: list[ScoreItem], client: str = ANONYMOUS):
        return await self._submit("score", items, sum(len(it.ids) for it in items), client)

    async def generate(self, prefixes: list[list[int]], spec: SamplingSpec, client: str = ANONYMOUS):
        tokens = sum(len(p) + spec.max_tokens for p in prefixes)
        return await self._submit("generate", prefixes, tokens, client, spec)

    async def _submit(self, kind: str, payload, tokens: int, client: str, spec: SamplingSpec | None = None):
        loop = asyncio.get_running_loop()
        job = _Job(kind, payload, tokens, loop, loop.create_future(), spec, client)
        with self._cv:
            if self.failure is not None:
                raise EngineFailed(self.failure)
            if self._closing:
                raise ShuttingDown("the teacher is shutting down")
            if self._inflight and self._inflight + tokens > self.max_inflight_tokens:
                raise Overloaded(retry_after=1.0)
            mine = self._client_inflight.get(client, 0)
            if mine and mine + tokens > self.max_client_inflight_tokens:
                raise ClientOverQuota(client, self.max_client_inflight_tokens)
            self._inflight += tokens
            self._client_inflight[client] = mine + tokens
            self._queue.push(job)
            self._set_depth(client)
            self._cv.notify()
        try:
            return await job.future
        finally:
            with self._cv:
                self._inflight -= tokens
                left = self._client_inflight[client] - tokens
                if left:
                    self._client_inflight[client] = left
                else:
                    del self._client_inflight[client]  # bounded: only clients with work in flight

    def close(self, timeout: float = 30.0) -> None:
        """Finish queued work, then stop the worker thread."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self._stopped.set()
        self._thread.join(timeout if self.failure is None else 1.0)  # a dead engine may never return

    # ---- worker thread --------------------------------------------------------------------------------

    def _set_depth(self, client: str) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._queue))
            self.metrics.for_client(self.metrics.client_queue_depth, client).set(self._queue.depth(client))

    def _take(self) -> list[_Job] | None:
        """The next batch (None: closing and nothing left, or the engine failed)."""
        with self._cv:
            while not len(self._queue):
                if self._closing or self.failure is not None:
                    return None
                self._cv.wait()
            first = self._queue.pop_next()
            jobs = [first]
            if first.kind == "score":
                budget = self.max_batch_tokens - first.tokens
                deadline = time.monotonic() + self.window
                while budget > 0:
                    job = self._queue.pop_next(lambda j, room=budget: j.kind == "score" and j.tokens <= room)
                    if job is not None:
                        jobs.append(job)
                        budget -= job.tokens
                        continue
                    remaining = deadline - time.monotonic()
                    if len(self._queue) or remaining <= 0:
                        break
                    self._cv.wait(remaining)
            for job in jobs:
                self._set_depth(job.client)
            self._running = jobs
            return jobs

    def _run(self) -> None:
        try:
            while (jobs := self._take()) is not None:
                self._observe(jobs)
                try:
                    if jobs[0].kind == "score":
                        self._run_scores(jobs)
                    else:
                        job = jobs[0]
                        self._resolve(job, result=self.engine.generate(job.payload, job.spec))
                except Exception as exc:
                    if type(exc).__name__ in FATAL_ERRORS or not engine_alive(self.engine):
                        self._fail(f"the engine failed: {type(exc).__name__}: {exc}", jobs)
                        return
                    for job in jobs:  # a failure of these requests, not of the engine: keep serving
                        self._resolve(job, error=exc)
                self._running = []
        except BaseException as exc:  # the loop itself broke: nothing would ever answer the queue again
            self._fail(f"the engine loop failed: {type(exc).__name__}: {exc}", [])

    def _watch(self) -> None:
        while not self._stopped.wait(WATCHDOG_S) and self.failure is None:
            if not engine_alive(self.engine):
                self._fail("the engine stopped: it reports itself dead", [])

    def _fail(self, reason: str, jobs: list[_Job]) -> None:
        """Once: fail every running and queued request, refuse later ones, tell `on_fatal`."""
        with self._cv:
            if self.failure is not None:
                return
            self.failure = reason
            jobs = jobs + self._running + self._queue.drain()
            self._cv.notify_all()
        for job in jobs:
            self._resolve(job, error=EngineFailed(reason))
        if self.on_fatal is not None:
            self.on_fatal(reason)

    def _observe(self, jobs: list[_Job]) -> None:
        if self.metrics is None:
            return
        now = time.monotonic()
        for job in jobs:
            self.metrics.for_client(self.metrics.client_tokens, job.client).inc(job.tokens)
            self.metrics.for_client(self.metrics.client_wait, job.client).observe(now - job.enqueued)

    def _run_scores(self, jobs: list[_Job]) -> None:
        items = [it for job in jobs for it in job.payload]
        results = []
        for chunk in _chunks(items, self.max_batch_tokens):
            if self.metrics is not None:
                self.metrics.batch_sequences.observe(len(chunk))
                self.metrics.batch_tokens.observe(sum(len(it.ids) for it in chunk))
            results += self.engine.score(chunk)
        at = 0
        for job in jobs:
            self._resolve(job, result=results[at : at + len(job.payload)])
            at += len(job.payload)

    @staticmethod
    def _resolve(job: _Job, result=None, error: Exception | None = None) -> None:
        def settle():
            if job.future.done():
                return
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)

        job.loop.call_soon_threadsafe(settle)


def _chunks(items: list[ScoreItem], budget: int):
    chunk, tokens = [], 0
    for it in items:
        if chunk and tokens + len(it.ids) > budget:
            yield chunk
            chunk, tokens = [], 0
        chunk.append(it)
        tokens += len(it.ids)
    if chunk:
        yield chunk
