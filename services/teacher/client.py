"""Async client of the teacher service: what trainers use. Imports no web framework.

    async with TeacherClient("http://teacher:8000", api_key=...) as teacher:
        info = await teacher.info()
        scores = await teacher.score(sequences, start=prompt_lengths, top_k=8)

Results are numpy arrays (`ScoreResult`, `ContinueResult`; `.to_torch()` converts). The binary wire
format is used unless `binary=False`. Connection errors, timeouts, 429 and 503 are retried with
exponential back-off and jitter, honouring `Retry-After`; other errors raise `TeacherError` at once.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence

import httpx

from services.teacher.protocol import (
    BINARY_MEDIA_TYPE,
    JSON_MEDIA_TYPE,
    ContinueResult,
    ScoreResult,
    decode_results,
    results_from_json,
)

RETRY_STATUS = {429, 502, 503, 504}


class TeacherError(Exception):
    """The teacher refused a request (4xx/5xx) or could not be reached after all retries."""

    def __init__(self, message: str, status: int | None = None, kind: str | None = None, field: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.field = status, kind, field


class TeacherClient:
    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        timeout: float = 120.0,
        retries: int = 8,
        backoff: float = 0.25,
        max_backoff: float = 10.0,
        max_connections: int = 16,
        binary: bool = True,
        client_id: str | None = None,
    ):
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        if client_id:
            headers["x-tropd-client"] = client_id
        self.url = url.rstrip("/")
        self.retries, self.backoff, self.max_backoff, self.binary = retries, backoff, max_backoff, binary
        self.http = httpx.AsyncClient(
            base_url=self.url,
            headers=headers,
            timeout=timeout,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )
        self.retried = 0  # requests retried since this client was made (for metrics)
        self.last_latency = 0.0

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def info(self) -> dict:
        return (await self._request("GET", "/v1/info")).json()

    async def score(
        self, sequences: Sequence[Sequence[int]], start: int | Sequence[int] = 1, top_k: int = 0
    ) -> list[ScoreResult]:
        """Teacher log-probs of `sequences[i][start_i:]` and the top-k at those positions."""
        body = {
            "sequences": [list(map(int, s)) for s in sequences],
            "start": start if isinstance(start, int) else [int(s) for s in start],
            "top_k": top_k,
        }
        return await self._results("/v1/score", body)

    async def continue_(
        self,
        prefixes: Sequence[Sequence[int]],
        max_tokens: int,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_ids: Sequence[int] = (),
        top_k: int = 0,
    ) -> list[ContinueResult]:
        """Teacher continuations of `prefixes` with the log-prob and top-k of each generated token."""
        body = {
            "prefixes": [list(map(int, p)) for p in prefixes],
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
            "stop_ids": list(stop_ids),
            "top_k": top_k,
        }
        return await self._results("/v1/continue", body)

    async def _results(self, path: str, body: dict):
        accept = BINARY_MEDIA_TYPE if self.binary else JSON_MEDIA_TYPE
        response = await self._request("POST", path, json=body, headers={"accept": accept})
        if response.headers.get("content-type", "").startswith(BINARY_MEDIA_TYPE):
            return decode_results(response.content)[0]
        return results_from_json(response.json()["results"])

    async def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        last = "no attempt"
        for attempt in range(self.retries + 1):
            wait = min(self.max_backoff, self.backoff * 2**attempt) * (0.5 + random.random())
            start = time.perf_counter()
            try:
                response = await self.http.request(method, path, **kwargs)
            except httpx.TransportError as exc:  # connection refused or reset, timeouts
                last = f"{type(exc).__name__}: {exc}"
            else:
                self.last_latency = time.perf_counter() - start
                if response.status_code < 400:
                    return response
                if response.status_code not in RETRY_STATUS:
                    raise _error(response)
                last = f"HTTP {response.status_code}"
                retry_after = _retry_after(response)
                if retry_after is not None:
                    wait = min(self.max_backoff, retry_after) + random.random() * self.backoff
            if attempt == self.retries:
                break
            self.retried += 1
            await asyncio.sleep(wait)
        raise TeacherError(f"teacher at {self.url} unavailable after {self.retries + 1} attempts ({last})")


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _error(response: httpx.Response) -> TeacherError:
    try:
        detail = response.json()["error"]
        return TeacherError(
            f"teacher refused the request (HTTP {response.status_code}, {detail.get('type')}): {detail.get('message')}"
            + (f" [field {detail['field']}]" if detail.get("field") else ""),
            response.status_code,
            detail.get("type"),
            detail.get("field"),
        )
    except (ValueError, KeyError, TypeError):
        return TeacherError(
            f"teacher answered HTTP {response.status_code}: {response.text[:200]}", response.status_code
        )
