"""Async client of the teacher service: what trainers use. Imports no web framework.

    async with TeacherClient("http://teacher:8000", api_key=...) as teacher:
        info = await teacher.info()
        scores = await teacher.score(sequences, start=prompt_lengths, top_k=8)

Results are numpy arrays (`ScoreResult`, `ContinueResult`; `.to_torch()` converts). The binary wire
format is used unless `binary=False`. Connection errors, timeouts, 429 and 503 are retried with
exponential back-off and jitter, honouring `Retry-After`; other errors raise `TeacherError` at once.
With `api_key_file` the key is read from that file (a mounted Secret) and read again on a 401, so that a
rotated key needs no restart: the request is retried at once with the new key, and, once a key has been
accepted, further 401s are retried with back-off while the teacher's replicas change over to the new key.

Replicas: given a list of URLs, each request goes to the replica in service with the fewest tokens
outstanding. A replica that refuses connections or answers 502-504 is taken out of service and the request is
retried at once on another; a replica out of service is probed with `/readyz` (after 1 s, doubling to 30 s)
and, once ready, its `/v1/info` must match the identity the others were checked against (`expect`) before it
serves again. One URL behaves as a single teacher: retried with back-off, never probed.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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
DOWN_STATUS = {502, 503, 504}  # the replica (or the proxy in front of it) cannot serve: try another
PROBE_FIRST_S, PROBE_MAX_S = 1.0, 30.0
# what must be equal on every replica for the scores not to depend on which one answered
IDENTITY_KEYS = ("model", "engine", "dtype", "vocab_size", "tokenizer_sha256", "chat_template_sha256", "protocol")


@dataclass(eq=False)
class Replica:
    url: str
    http: httpx.AsyncClient
    outstanding: int = 0  # tokens of this client's requests in flight there
    requests: int = 0  # requests sent there (for metrics and tests)
    down_until: float = 0.0  # monotonic time of the next probe; 0 while in service
    failures: int = 0  # consecutive failed probes: the probe interval doubles with each
    refused: str | None = None  # it serves another model or tokenizer: never used again

    @property
    def in_service(self) -> bool:
        return self.down_until == 0.0 and self.refused is None


class TeacherError(Exception):
    """The teacher refused a request (4xx/5xx) or could not be reached after all retries."""

    def __init__(self, message: str, status: int | None = None, kind: str | None = None, field: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.field = status, kind, field


class TeacherClient:
    def __init__(
        self,
        url: str | Sequence[str],
        *,
        api_key: str | None = None,
        api_key_file: str | None = None,
        timeout: float = 120.0,
        retries: int = 8,
        backoff: float = 0.25,
        max_backoff: float = 10.0,
        max_connections: int = 16,
        binary: bool = True,
        client_id: str | None = None,
    ):
        if api_key and api_key_file:
            raise ValueError("give api_key or api_key_file, not both")
        self.api_key_file, self._key_accepted = api_key_file, False
        api_key = read_key_file(api_key_file) if api_key_file else api_key
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        headers["x-tropd-client"] = client_id or f"{socket.gethostname()}-{os.getpid()}"  # its fair-share queue
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ValueError("no teacher URL")
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self.replicas = [
            Replica(u.rstrip("/"), httpx.AsyncClient(base_url=u.rstrip("/"), headers=dict(headers), timeout=timeout,
                                                     limits=limits))
            for u in urls
        ]  # fmt: skip
        self.url = ", ".join(r.url for r in self.replicas)
        self.http = self.replicas[0].http
        self.retries, self.backoff, self.max_backoff, self.binary = retries, backoff, max_backoff, binary
        self.identity: dict | None = None  # IDENTITY_KEYS of the checked teacher: a probed replica must match
        self.retried = 0  # requests retried since this client was made (for metrics)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()

    async def aclose(self) -> None:
        for replica in self.replicas:
            await replica.http.aclose()

    async def info(self) -> dict:
        return (await self._request("GET", "/v1/info")).json()

    async def infos(self) -> list[dict | TeacherError]:
        """Each replica's `/v1/info` (one attempt each), or the error that replica gave; replicas that gave an
        error are taken out of service (probed back later)."""

        async def one(replica: Replica) -> dict | TeacherError:
            try:
                response = await replica.http.get("/v1/info")
            except httpx.TransportError as exc:
                error = TeacherError(f"teacher at {replica.url} unreachable ({type(exc).__name__}: {exc})")
            else:
                if response.status_code < 400:
                    return response.json()
                error = _error(response)
            if len(self.replicas) > 1:
                self._take_out(replica)
            return error

        return list(await asyncio.gather(*(one(r) for r in self.replicas)))

    def expect(self, info: dict) -> None:
        """Replicas probed back into service must report this teacher's IDENTITY_KEYS."""
        self.identity = {key: info.get(key) for key in IDENTITY_KEYS}

    async def score(
        self,
        sequences: Sequence[Sequence[int]],
        start: int | Sequence[int] = 1,
        top_k: int = 0,
        temperature: float = 1.0,
    ) -> list[ScoreResult]:
        """Teacher log-probs of `sequences[i][start_i:]` and the top-k at those positions, at `temperature`."""
        body = {
            "sequences": [list(map(int, s)) for s in sequences],
            "start": start if isinstance(start, int) else [int(s) for s in start],
            "top_k": top_k,
        }
        if temperature != 1.0:  # sent only when asked: a service of an earlier version refuses unknown fields
            body["temperature"] = float(temperature)
        return await self._results("/v1/score", body, sum(len(s) for s in body["sequences"]))

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
        return await self._results("/v1/continue", body, sum(len(p) + max_tokens for p in body["prefixes"]))

    async def _results(self, path: str, body: dict, tokens: int = 0):
        accept = BINARY_MEDIA_TYPE if self.binary else JSON_MEDIA_TYPE
        response = await self._request("POST", path, tokens=tokens, json=body, headers={"accept": accept})
        if response.headers.get("content-type", "").startswith(BINARY_MEDIA_TYPE):
            return decode_results(response.content)[0]
        return results_from_json(response.json()["results"])

    async def _request(self, method: str, path: str, tokens: int = 0, **kwargs) -> httpx.Response:
        last = "no attempt"
        for attempt in range(self.retries + 1):
            wait = min(self.max_backoff, self.backoff * 2**attempt) * (0.5 + random.random())
            replica = await self._pick()
            replica.outstanding += tokens
            replica.requests += 1
            down = False
            try:
                response = await replica.http.request(method, path, **kwargs)
                if response.status_code == 401 and self._reload_key():
                    response = await replica.http.request(method, path, **kwargs)  # at once, with the rotated key
            except httpx.TransportError as exc:  # connection refused or reset, timeouts
                last, down = f"{replica.url}: {type(exc).__name__}: {exc}", True
            else:
                if response.status_code < 400:
                    self._key_accepted = True
                    return response
                # a 401 after a key worked: replicas that still hold the other key, or a file not yet updated
                rotating = response.status_code == 401 and self.api_key_file and self._key_accepted
                if response.status_code not in RETRY_STATUS and not rotating:
                    raise _error(response)
                last, down = f"{replica.url}: HTTP {response.status_code}", response.status_code in DOWN_STATUS
                retry_after = _retry_after(response)
                if retry_after is not None:
                    wait = min(self.max_backoff, retry_after) + random.random() * self.backoff
            finally:
                replica.outstanding -= tokens
            if attempt == self.retries:
                break
            self.retried += 1
            if down and len(self.replicas) > 1:
                self._take_out(replica)
                if any(r.in_service for r in self.replicas):
                    continue  # another replica takes the request at once
            await asyncio.sleep(wait)
        raise TeacherError(f"teacher at {self.url} unavailable after {self.retries + 1} attempts ({last})")

    async def _pick(self) -> Replica:
        """The replica in service with the fewest tokens outstanding (ties: the one used least), after probing
        the replicas whose probe is due; when none is in service, the one to be probed next."""
        if len(self.replicas) == 1:
            return self.replicas[0]
        now = time.monotonic()
        due = [r for r in self.replicas if r.refused is None and 0.0 < r.down_until <= now]
        if due:
            await asyncio.gather(*(self._probe(r) for r in due))
        serving = [r for r in self.replicas if r.in_service]
        if serving:
            return min(serving, key=lambda r: (r.outstanding, r.requests))
        waiting = [r for r in self.replicas if r.refused is None]
        if not waiting:
            reasons = "; ".join(f"{r.url}: {r.refused}" for r in self.replicas)
            raise TeacherError(f"no teacher replica serves the checked model ({reasons})")
        return min(waiting, key=lambda r: r.down_until)

    def _take_out(self, replica: Replica) -> None:
        if replica.in_service:
            replica.failures = 0
            replica.down_until = time.monotonic() + PROBE_FIRST_S

    async def _probe(self, replica: Replica) -> None:
        """Back into service when `/readyz` answers 200 and its identity matches; else probe again later."""
        ready = False
        try:
            ready = (await replica.http.get("/readyz", timeout=5.0)).status_code == 200
            if ready and self.identity is not None:
                info = (await replica.http.get("/v1/info", timeout=5.0)).json()
                differs = [k for k in IDENTITY_KEYS if info.get(k) != self.identity.get(k)]
                if differs:
                    replica.refused = f"its {', '.join(differs)} differ from the other replicas'"
                    return
        except (httpx.HTTPError, ValueError):
            ready = False
        if ready:
            replica.down_until, replica.failures = 0.0, 0
        else:
            replica.failures += 1
            replica.down_until = time.monotonic() + min(PROBE_MAX_S, PROBE_FIRST_S * 2**replica.failures)

    def _reload_key(self) -> bool:
        """Read the key file again; True when it holds another key than the one sent (now in the headers)."""
        if not self.api_key_file:
            return False
        try:
            key = read_key_file(self.api_key_file)
        except TeacherError:
            return False  # mid-rotation (a Secret volume swaps its files by a symlink): keep the key we have
        header = f"Bearer {key}"
        changed = self.http.headers.get("authorization") != header
        for replica in self.replicas:
            replica.http.headers["authorization"] = header
        return changed


def read_key_file(path: str) -> str:
    """The API key in `path`: its text without surrounding whitespace (a Secret file, `echo KEY > file`)."""
    try:
        key = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise TeacherError(f"cannot read the API key file {path}: {exc}") from None
    if not key:
        raise TeacherError(f"the API key file {path} is empty")
    return key


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
