"""Batching of requests from all clients into engine calls, under a token budget, shared fairly.

Handlers `await` the batcher; one worker thread runs the engine. Work is queued per client
(`fairness.FairQueue`) at the granularity of a sequence: a scoring request is split into its sequences, each
queued and tagged on its own, and engine calls are filled with sequences in fair order, so that one client's
large request never holds another's small one for a whole batch; a request is answered when its last sequence
has been scored. The batch token budget adapts (`batch_budget`): `max_batch_tokens` while one client competes;
while several do (work queued, or a request sent or answered within the last two batches), the size of the
smallest request among them (at least `min_shared_batch_tokens`), so that a batch in progress, which every newly
arrived sequence waits for, stays as short as the smallest client's request, and the clients' sequences take
turns in it by fair tag; while some of them are between an answer and their next request, the clients queued take
only their weights' part of that budget, so that they do not fill the absent ones' turns whole. A sequence longer
than the budget is scored a chunk at a time where the engine can (`score_chunk`: transformers, with the keys and
values of the chunks before kept between them), each chunk a batch of its own, and goes back to its place in its
client's queue between chunks, so that other clients' sequences pass between them; one sequence at a time, so that
the keys and values held between engine calls are one sequence's; alone, a sequence up to `max_batch_tokens` is
scored whole. The engine call waits up to a short window for more work. A continuation
request is split by prefix in the same way where the engine's drafts do not depend on their batch
(`batch_invariant_drafts`: vLLM seeds a generator per sequence), its prefixes sharing engine calls with other
requests' of the same sampling settings; on an engine whose drafts do (transformers: one generator per call) it
runs alone, all its prefixes at once, so that a seed keeps giving the same drafts.
Admission is bounded twice, and never queues without bound: past `max_inflight_tokens` in all, a request is
refused with `Overloaded` (503 + `Retry-After`); past `max_client_inflight_tokens` for its own client, with
`ClientOverQuota` (429 + `Retry-After`). A request is always admitted when nothing of its kind is in flight, so
that one as large as the request limit can pass.

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

from services.teacher.engines.types import SamplingSpec, ScoreItem, join_scored
from services.teacher.fairness import FairQueue

ANONYMOUS = "anonymous"
ACTIVE_S = 0.05  # a client that sent or was answered this recently (or within two batches) still competes
MIN_CHUNK_TOKENS = 256  # a long sequence scored a chunk at a time: its chunks are at least this long
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
    """One request. A scoring request is queued as its `_Part`s; a continuation request is queued whole."""

    kind: str  # "score" | "generate"
    payload: object
    tokens: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    spec: SamplingSpec | None = None
    client: str = ANONYMOUS
    tag: float = 0.0
    enqueued: float = field(default_factory=time.monotonic)
    results: list = field(default_factory=list)  # scoring: a result per sequence, filled as its part is scored
    parts_left: int = 0
    observed: bool = False  # its queue wait is in the metrics
    settled: bool = False  # answered (or failed): a sequence of it scored in chunks stops there


@dataclass
class _Part:
    """One sequence of a scoring request, or one prefix of a split continuation request: what the fair queue orders
    and an engine batch holds."""

    job: _Job
    index: int
    tokens: int
    client: str
    tag: float = 0.0
    kind: str = "score"
    # a sequence scored a chunk at a time: positions scored so far (their keys and values in `cache`, their scores
    # in `pieces`), and while a chunk runs, where it ends; `tokens` is then what is left to score
    done: int = 0
    end: int = 0
    cache: object = None
    pieces: list = field(default_factory=list)

    @property
    def running_tokens(self) -> int:
        return self.end - self.done if self.end else self.tokens

    def joins(self, first: _Part, room: int) -> bool:
        """Whether this part may join a batch that `first` began, with `room` tokens left in it (a sequence begun in
        chunks never does: its next chunk is a batch of its own)."""
        if self.done or self.tokens > room or self.kind != first.kind:
            return False
        return self.kind == "score" or self.job.spec == first.job.spec  # one engine call: one sampling spec


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
        min_shared_batch_tokens: int = 2048,
        window_ms: float = 2.0,
        max_inflight_tokens: int = 1 << 20,
        max_client_inflight_tokens: int | None = None,
        policy: str = "fair",
        weights: dict[str, float] | None = None,
        metrics=None,
        on_fatal=None,
    ):
        self.engine = engine
        self.split_drafts = bool(getattr(engine, "batch_invariant_drafts", False))
        self.chunks_scores = callable(getattr(engine, "score_chunk", None))
        self._chunking: _Part | None = None  # the one sequence scored in chunks at a time (its cache held between)
        self.max_batch_tokens = max_batch_tokens
        self.min_shared_batch_tokens = min(min_shared_batch_tokens, max_batch_tokens)
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
        self._requests: dict[str, tuple[int, float]] = {}  # per client: its last request's tokens, last seen
        self._last_batch_s = 0.0
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
            self._seen(client, tokens)
            if kind == "score" or self.split_drafts:
                job.results, job.parts_left = [None] * len(payload), len(payload)
                for i, item in enumerate(payload):
                    size = len(item.ids) if kind == "score" else len(item) + spec.max_tokens
                    self._queue.push(_Part(job, i, size, client, kind=kind))
            else:
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

    def _seen(self, client: str, tokens: int) -> None:
        """Under the lock: `client` sent or was answered a request of `tokens` now (bounded: recent ones only)."""
        now = time.monotonic()
        self._requests[client] = (tokens, now)
        if len(self._requests) > 1024:
            keep = max(ACTIVE_S, 2 * self._last_batch_s)
            self._requests = {c: v for c, v in self._requests.items() if now - v[1] <= keep}

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

    def batch_budget(self, first) -> int:
        """Tokens the next scoring batch may hold, `first` (a part just taken) included: `max_batch_tokens` while
        one client competes; else the smallest competing request (a client with work queued, or seen within the
        last two batches: answered at the end of the last one, its next request is on its way), within
        [`min_shared_batch_tokens`, `max_batch_tokens`], of which the clients with work queued take their weights'
        part: while the others are between an answer and their next request, a batch of the queued clients alone
        is that much shorter, so that those returning wait at most that long for it, and the queued clients do not
        take the absent ones' turns whole. A batch holds `first` whatever its size."""
        now = time.monotonic()
        recent = max(ACTIVE_S, 2 * self._last_batch_s)
        queued = self._queue.queued_tokens()
        active = {c: size for c, (size, seen) in self._requests.items() if now - seen <= recent}
        active.update({c: self._requests.get(c, (t, now))[0] for c, t in queued.items()})
        active.setdefault(first.client, first.tokens)
        if len(active) == 1:
            return self.max_batch_tokens
        shared = min(self.max_batch_tokens, max(self.min_shared_batch_tokens, min(active.values())))
        weight = self._queue.weight
        present = sum(weight(c) for c in active if c in queued or c == first.client)
        return max(1, int(shared * present / sum(map(weight, active))))

    def _take(self) -> list | None:
        """The next batch: scoring parts, continuation parts of one sampling spec, or one whole continuation job
        (None: closing and nothing left, or the engine failed)."""
        with self._cv:
            while not len(self._queue):
                if self._closing or self.failure is not None:
                    return None
                self._cv.wait()
            first = self._queue.pop_next()
            taken = [first]
            if isinstance(first, _Part):
                budget = self.batch_budget(first)
                if self._in_chunks(first, budget):  # a batch of its own: the sequence's next chunk
                    length = len(first.job.payload[first.index].ids)
                    first.end = min(first.done + max(budget, MIN_CHUNK_TOKENS), length)
                    self._chunking = first
                    self._queue.hold()  # to be put back: the busy period goes on while its chunk runs
                else:
                    taken += self._fill(first, budget - first.tokens)
            for client in {t.client for t in taken}:
                self._set_depth(client)
            self._running = taken
            return taken

    def _fill(self, first: _Part, budget: int) -> list[_Part]:
        """Under the lock: parts that join the batch `first` began, in fair order, up to `budget` more tokens, waiting
        up to the batching window for more while the queue is empty."""
        taken = []
        deadline = time.monotonic() + self.window
        while budget > 0:
            part = self._queue.pop_next(lambda j, room=budget: isinstance(j, _Part) and j.joins(first, room))
            if part is not None:
                taken.append(part)
                budget -= part.tokens
                continue
            remaining = deadline - time.monotonic()
            if len(self._queue) or remaining <= 0:
                break
            self._cv.wait(remaining)
        return taken

    def _in_chunks(self, part: _Part, budget: int) -> bool:
        """Whether `part` is scored a chunk at a time, on an engine that can (`score_chunk`): the sequence begun so,
        or, while none is, one longer than the batch budget (while clients compete: the shared budget; else
        `max_batch_tokens`), so that other clients' sequences pass between its chunks. One sequence at a time, so
        that the keys and values held between chunks are one sequence's; another long one meanwhile is scored
        whole, as a sequence is on an engine that cannot chunk."""
        if part.kind != "score" or not self.chunks_scores:
            return False
        if part.done > 0:
            return True
        return self._chunking is None and part.tokens > max(budget, MIN_CHUNK_TOKENS)

    def _run(self) -> None:
        try:
            while (taken := self._take()) is not None:
                self._observe(taken)
                started = time.monotonic()
                try:
                    if taken[0].kind == "score":
                        self._run_scores(taken)
                    elif isinstance(taken[0], _Part):
                        self._run_drafts(taken)
                    else:
                        job = taken[0]
                        self._resolve(job, result=self.engine.generate(job.payload, job.spec))
                except Exception as exc:
                    if type(exc).__name__ in FATAL_ERRORS or not engine_alive(self.engine):
                        self._fail(f"the engine failed: {type(exc).__name__}: {exc}", taken)
                        return
                    for job in _jobs(taken):  # a failure of these requests, not of the engine: keep serving
                        self._resolve(job, error=exc)
                self._running = []
                self._last_batch_s = time.monotonic() - started
        except BaseException as exc:  # the loop itself broke: nothing would ever answer the queue again
            self._fail(f"the engine loop failed: {type(exc).__name__}: {exc}", [])

    def _watch(self) -> None:
        while not self._stopped.wait(WATCHDOG_S) and self.failure is None:
            if not engine_alive(self.engine):
                self._fail("the engine stopped: it reports itself dead", [])

    def _fail(self, reason: str, taken: list) -> None:
        """Once: fail every running and queued request, refuse later ones, tell `on_fatal`."""
        with self._cv:
            if self.failure is not None:
                return
            self.failure = reason
            jobs = _jobs(taken + self._running + self._queue.drain())
            self._cv.notify_all()
        for job in jobs:
            self._resolve(job, error=EngineFailed(reason))
        if self.on_fatal is not None:
            self.on_fatal(reason)

    def _observe(self, taken: list) -> None:
        """Engine tokens per client; a request's queue wait, once (when its first part reaches the engine)."""
        if self.metrics is None:
            return
        now = time.monotonic()
        for t in taken:
            tokens = t.running_tokens if isinstance(t, _Part) else t.tokens
            self.metrics.for_client(self.metrics.client_tokens, t.client).inc(tokens)
        for job in _jobs(taken):
            if not job.observed:
                job.observed = True
                self.metrics.for_client(self.metrics.client_wait, job.client).observe(now - job.enqueued)

    def _run_scores(self, parts: list[_Part]) -> None:
        if parts[0].end:
            return self._run_chunk(parts[0])
        items = [p.job.payload[p.index] for p in parts]
        results = []
        for chunk in _chunks(items, self.max_batch_tokens):
            if self.metrics is not None:
                self.metrics.batch_sequences.observe(len(chunk))
                self.metrics.batch_tokens.observe(sum(len(it.ids) for it in chunk))
            results += self.engine.score(chunk)
        self._settle(parts, results)

    def _run_chunk(self, part: _Part) -> None:
        """The next chunk of a sequence scored in chunks; then it goes back to the head of its client's queue, or,
        if that was its last, its scores are joined and settled."""
        item = part.job.payload[part.index]
        begin, end = part.done, part.end
        if self.metrics is not None:
            self.metrics.batch_sequences.observe(1)
            self.metrics.batch_tokens.observe(end - begin)
        try:
            part.cache, piece = self.engine.score_chunk(item, begin, end, part.cache)
        except BaseException:
            self._end_chunks(part)
            raise
        part.pieces.append(piece)
        part.done, part.end = end, 0
        # put back unless it was the last chunk, the engine failed, or its request was answered meanwhile (another
        # of its sequences failed): then its keys and values go
        more = end < len(item.ids) and self.failure is None and not part.job.settled
        self._end_chunks(part, requeue=(end - begin) if more else None)
        if end == len(item.ids):
            self._settle([part], [join_scored(part.pieces, item.top_k, item.ranks)])

    def _end_chunks(self, part: _Part, requeue: int | None = None) -> None:
        """A chunk of `part` ran (or failed): back into its client's queue with `requeue` tokens served, or done."""
        with self._cv:
            if requeue is not None:
                self._queue.requeue(part, served=requeue)
                self._set_depth(part.client)
                self._cv.notify()
            else:
                part.cache = None
                self._chunking = None
            self._queue.release()

    def _run_drafts(self, parts: list[_Part]) -> None:
        self._settle(parts, self.engine.generate([p.job.payload[p.index] for p in parts], parts[0].job.spec))

    def _settle(self, parts: list[_Part], results: list) -> None:
        """Each part's result into its request; a request whose last part this was is answered."""
        for part, result in zip(parts, results, strict=True):
            job = part.job
            job.results[part.index] = result
            job.parts_left -= 1
            if job.parts_left == 0:
                with self._cv:  # answered now: still competing for the next batch, before its next request arrives
                    self._seen(job.client, job.tokens)
                self._resolve(job, result=job.results)

    @staticmethod
    def _resolve(job: _Job, result=None, error: Exception | None = None) -> None:
        job.settled = True

        def settle():
            if job.future.done():
                return
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)

        job.loop.call_soon_threadsafe(settle)


def _jobs(taken: list) -> list[_Job]:
    """The distinct requests of scoring parts and continuation jobs, in order."""
    jobs = {}
    for t in taken:
        job = t.job if isinstance(t, _Part) else t
        jobs[id(job)] = job
    return list(jobs.values())


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
