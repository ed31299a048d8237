"""Batching of requests from all clients into engine calls, under a token budget.

Handlers `await` the batcher; one worker thread runs the engine. Scoring requests that arrive within a
short window are merged into one engine call of at most `max_batch_tokens` tokens; continuation requests
run one request (all its prefixes) at a time. Admission is bounded: when the tokens in flight would pass
`max_inflight_tokens`, the request is refused at once with `Overloaded` (the service answers 503 with
`Retry-After`), never queued without bound.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from services.teacher.engines import SamplingSpec, ScoreItem


class Overloaded(Exception):
    def __init__(self, retry_after: float):
        super().__init__(f"the teacher is at capacity; retry after {retry_after:.0f}s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    pass


@dataclass
class _Job:
    kind: str  # "score" | "generate"
    payload: object
    tokens: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    spec: SamplingSpec | None = None
    enqueued: float = field(default_factory=time.monotonic)


class Batcher:
    def __init__(
        self,
        engine,
        *,
        max_batch_tokens: int = 32768,
        window_ms: float = 2.0,
        max_inflight_tokens: int = 1 << 20,
        metrics=None,
    ):
        self.engine = engine
        self.max_batch_tokens = max_batch_tokens
        self.window = window_ms / 1000
        self.max_inflight_tokens = max_inflight_tokens
        self.metrics = metrics
        self._queue: deque[_Job] = deque()
        self._cv = threading.Condition()
        self._inflight = 0
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="teacher-engine", daemon=True)
        self._thread.start()

    @property
    def inflight_tokens(self) -> int:
        return self._inflight

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    async def score(self, items: list[ScoreItem]):
        return await self._submit("score", items, sum(len(it.ids) for it in items))

    async def generate(self, prefixes: list[list[int]], spec: SamplingSpec):
        tokens = sum(len(p) + spec.max_tokens for p in prefixes)
        return await self._submit("generate", prefixes, tokens, spec)

    async def _submit(self, kind: str, payload, tokens: int, spec: SamplingSpec | None = None):
        loop = asyncio.get_running_loop()
        job = _Job(kind, payload, tokens, loop, loop.create_future(), spec)
        with self._cv:
            if self._closing:
                raise ShuttingDown("the teacher is shutting down")
            if self._inflight and self._inflight + tokens > self.max_inflight_tokens:
                raise Overloaded(retry_after=1.0)
            self._inflight += tokens
            self._queue.append(job)
            self._set_depth()
            self._cv.notify()
        try:
            return await job.future
        finally:
            with self._cv:
                self._inflight -= tokens

    def close(self, timeout: float = 30.0) -> None:
        """Finish queued work, then stop the worker thread."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self._thread.join(timeout)

    # ---- worker thread --------------------------------------------------------------------------------

    def _set_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._queue))

    def _take(self) -> list[_Job] | None:
        with self._cv:
            while not self._queue:
                if self._closing:
                    return None
                self._cv.wait()
            first = self._queue.popleft()
            jobs = [first]
            if first.kind == "score":
                budget = self.max_batch_tokens - first.tokens
                deadline = time.monotonic() + self.window
                while budget > 0:
                    if self._queue and self._queue[0].kind == "score" and self._queue[0].tokens <= budget:
                        job = self._queue.popleft()
                        jobs.append(job)
                        budget -= job.tokens
                        continue
                    remaining = deadline - time.monotonic()
                    if self._queue or remaining <= 0:
                        break
                    self._cv.wait(remaining)
            self._set_depth()
            return jobs

    def _run(self) -> None:
        while (jobs := self._take()) is not None:
            try:
                if jobs[0].kind == "score":
                    self._run_scores(jobs)
                else:
                    job = jobs[0]
                    self._resolve(job, result=self.engine.generate(job.payload, job.spec))
            except Exception as exc:  # an engine failure fails these requests, not the service
                for job in jobs:
                    self._resolve(job, error=exc)

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
