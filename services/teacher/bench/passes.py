"""How `tropd bench teacher` times a path: C concurrent requests through the engine in-process (one engine call
each round, as the service's batcher merges them), or through an HTTP client. Shared by the bench and its
subprocess phases (services/teacher/bench/alone.py)."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import httpx


def flatten(results_by_request: list[list]) -> list:
    return [r for request in results_by_request for r in request]


# ---- passes: each scores every request once and returns (seconds, results in sequence order) ----------


class EnginePasses:
    """(a): C concurrent requests become one `engine.score` call, run on one worker thread as the service's
    batcher does. (On the thread that built it, vLLM's CPU backend pins the OpenMP threads to cores, which
    is far slower when another process is busy on one of them: 40x measured on 2 cores.)"""

    def __init__(self, engine, requests: list, top_k: int):
        self.engine, self.requests, self.top_k = engine, requests, top_k
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="teacher-engine")

    def for_clients(self, clients: int):
        groups = [flatten(self.requests[i : i + clients]) for i in range(0, len(self.requests), clients)]
        return lambda: self.worker.submit(self._pass, groups).result()

    def _pass(self, groups: list) -> tuple[float, list]:
        from services.teacher.engines.types import ScoreItem

        start = time.perf_counter()
        results = [self.engine.score([ScoreItem(seq, 1, self.top_k) for seq in group]) for group in groups]
        return time.perf_counter() - start, flatten(results)

    def close(self) -> None:
        self.worker.shutdown()
        self.engine.close()


class HttpPasses:
    """(b), (c), (d): C clients, requests dealt round-robin, each client sending its own one after another,
    all clients at once. Counts the response-body bytes received."""

    def __init__(self, runner: asyncio.Runner, make_client, requests: list, clients: int, top_k: int):
        self.runner, self.requests, self.top_k = runner, requests, top_k
        self.pool = [make_client() for _ in range(clients)]
        self.received, self.passes = 0, 0
        for client in self.pool:
            client.http.event_hooks["response"].append(self._count)

    async def _count(self, response: httpx.Response) -> None:
        await response.aread()
        self.received += len(response.content)

    def __call__(self) -> tuple[float, list]:
        self.passes += 1
        return self.runner.run(self._pass())

    async def _pass(self) -> tuple[float, list]:
        results: list = [None] * len(self.requests)

        async def client(j: int) -> None:
            for r in range(j, len(self.requests), len(self.pool)):
                results[r] = await self.pool[j].score(self.requests[r], 1, self.top_k)

        start = time.perf_counter()
        await asyncio.gather(*(client(j) for j in range(len(self.pool))))
        return time.perf_counter() - start, flatten(results)

    def close(self) -> None:
        for client in self.pool:
            self.runner.run(client.aclose())
