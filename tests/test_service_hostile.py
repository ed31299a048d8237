"""Hostile input and access control against the real teacher service over HTTP (the transformers engine; the
generated requests go to the vLLM engine too).

- schemathesis generates requests from the service's own OpenAPI schema (/openapi.json), valid and
  invalid, on each engine: no 5xx, every response conforms to the schema;
- hand-written bad inputs not covered in test_service.py: each a clear 4xx naming the field;
- slow (slowloris-style) and vanishing clients do not block other clients, and a read deadline
  (--read-timeout-s) closes requests that do not arrive in time with 408; a full queue sheds load with
  503 + Retry-After;
- with a key configured, every route but /healthz (and /metrics when opened) answers 401 without the
  exact key, and the key appears in no log line, metric or response.

After all of it the service must still serve, have counted no internal error, and exit cleanly.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from tests.helpers import teacher

pytestmark = pytest.mark.reliability

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
MAX_TOKENS, MAX_SEQUENCES, MAX_BODY = 4096, 64, 1 << 20
LIMITS = ["--max-request-tokens", str(MAX_TOKENS), "--max-inflight-tokens", str(MAX_TOKENS),
          "--max-sequences", str(MAX_SEQUENCES), "--max-body-bytes", str(MAX_BODY)]  # fmt: skip
OPERATIONS = [
    ("GET", "/healthz"),
    ("GET", "/health"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/v1/info"),
    ("POST", "/v1/score"),
    ("POST", "/v1/continue"),
    ("GET", "/v1/models"),
    ("POST", "/v1/completions"),
]
OK = {"sequences": [[1, 5, 6]]}


@pytest.fixture(scope="module")
def service(toy_quick, tmp_path_factory):
    with teacher(toy_quick / "teacher", "hf", tmp_path_factory.mktemp("logs"), *LIMITS, env=ONE_THREAD) as svc:
        yield svc
        assert httpx.post(f"{svc.url}/v1/score", json=OK).status_code == 200  # still serving after everything
        metrics = httpx.get(f"{svc.url}/metrics").text
    assert 'tropd_errors_total{kind="internal"}' not in metrics
    assert "Traceback" not in svc.log(), svc.log()[-3000:]
    assert svc.process.returncode == 0, svc.log()[-3000:]  # a graceful exit on SIGTERM


# ---- generated from the OpenAPI schema ----------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzzed(toy_quick, tmp_path_factory):
    """The service that schema-generated requests go to: the same limits and a 64-token context, so that the
    continuations the schema allows (up to max_model_len - 1 new tokens per prefix) stay quick on hf."""
    logs = tmp_path_factory.mktemp("fuzzed")
    with teacher(toy_quick / "teacher", "hf", logs, *LIMITS, "--max-model-len", "64", env=ONE_THREAD) as svc:
        yield svc
        assert httpx.post(f"{svc.url}/v1/score", json=OK).status_code == 200
        metrics = httpx.get(f"{svc.url}/metrics").text
    assert 'tropd_errors_total{kind="internal"}' not in metrics
    assert "Traceback" not in svc.log(), svc.log()[-3000:]
    assert svc.process.returncode == 0, svc.log()[-3000:]


@pytest.fixture(scope="module", params=["hf", pytest.param("vllm", marks=pytest.mark.vllm)])
def api_schema(request, toy_vllm_teacher):
    """The schema of the service each engine's generated requests go to: `fuzzed` (hf), or the session's shared
    vLLM teacher (its own limits, which its schema states)."""
    svc = request.getfixturevalue("fuzzed") if request.param == "hf" else toy_vllm_teacher.get()
    return svc.url, schemathesis.openapi.from_url(f"{svc.url}/openapi.json")


def test_schema_states_the_model_limits(fuzzed):
    """/openapi.json carries the toy model's and the service's limits (vocabulary 26, context 64, 64 sequences,
    top-k 20), as `inputs.py` checks them."""
    doc = httpx.get(f"{fuzzed.url}/openapi.json").json()["components"]["schemas"]
    ids = {"type": "integer", "minimum": 0, "maximum": 25}
    score = doc["ScoreRequest"]["properties"]
    assert score["sequences"]["maxItems"] == MAX_SEQUENCES
    assert score["sequences"]["items"] == {"type": "array", "minItems": 2, "maxItems": 63, "items": ids}
    assert score["start"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 62}
    assert score["top_k"]["maximum"] == 20
    assert str(MAX_TOKENS) in doc["ScoreRequest"]["description"]  # the request total, in words
    cont = doc["ContinueRequest"]["properties"]
    assert cont["prefixes"]["maxItems"] == MAX_SEQUENCES
    assert cont["prefixes"]["items"]["maxItems"] == 63 and cont["prefixes"]["items"]["items"] == ids
    assert cont["max_tokens"]["maximum"] == 63 and cont["stop_ids"]["items"] == ids and cont["top_k"]["maximum"] == 20
    prompt = doc["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    assert prompt[0] == {"type": "array", "minItems": 1, "maxItems": 63, "items": ids}
    assert prompt[1]["maxItems"] == MAX_SEQUENCES and prompt[1]["items"]["items"] == ids
    assert doc["CompletionRequest"]["properties"]["logprobs"]["anyOf"][0]["maximum"] == 20
    # a whole float is an integer to JSON Schema (and to generated clients): served, not refused
    answer = httpx.post(f"{fuzzed.url}/v1/score", json={"sequences": [[1.0, 5, 6.0]], "top_k": 2.0})
    assert answer.status_code == 200 and len(answer.json()["results"][0]["logprobs"]) == 2


def test_schema_lists_every_operation(api_schema):
    _, schema = api_schema
    found = sorted((op.method.upper(), op.path) for op in (r.ok() for r in schema.get_all_operations()))
    assert found == sorted(OPERATIONS)


@pytest.mark.parametrize(
    "method,path,mode",
    [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS]
    + [(m, p, GenerationMode.NEGATIVE) for m, p in OPERATIONS if m == "POST"],
    ids=lambda v: v.value if isinstance(v, GenerationMode) else v,
)
def test_generated_requests(api_schema, method, path, mode):
    """No 5xx, and every status, content type, header and body as the schema documents. (Schema-valid bodies
    may still be refused with 422, e.g. ids outside this model's vocabulary, which a static schema cannot
    state, so the check that they are accepted is left out.)"""
    url, schema = api_schema
    operation = schema[path][method]
    excluded = [schemathesis.checks.positive_data_acceptance]
    # continuations on the shared vLLM teacher may ask for up to 511 new tokens for each of 64 prefixes (its own
    # limits): half as many of those keep the test under 20 s on 2 cores
    engine = httpx.get(f"{url}/v1/info").json()["engine"]
    examples = 25 if path == "/v1/continue" and mode == GenerationMode.POSITIVE and engine == "vllm" else 50

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def check(case):
        case.call_and_validate(excluded_checks=excluded, timeout=30)
        sent.append(case)

    sent = []
    check()
    print(f"schemathesis: {len(sent)} {mode.value} requests to {method} {path}")
    assert 'tropd_errors_total{kind="internal"}' not in httpx.get(f"{url}/metrics").text  # none, even caught


# ---- hand-written bad input ---------------------------------------------------------------------------


def _post(service, path: str, content: bytes, content_type: str = "application/json") -> httpx.Response:
    return httpx.post(f"{service.url}{path}", content=content, headers={"content-type": content_type}, timeout=30)


@pytest.mark.parametrize(
    "path,raw,status,field",
    [
        ("/v1/score", b'{"sequences": [[1, 2, 3], [1, 2]], "start": [1, 2]}', 422, "start[1]"),
        ("/v1/score", b'{"sequences": [[1, 2, 3]], "start": -1}', 422, "start"),
        ("/v1/score", b'{"sequences": [[1, 2, 3]], "top_k": 1e400}', 422, "top_k"),
        ("/v1/score", b'{"sequences": [[1, 2, 3]], "top_k": 1000000000000000000000000000000}', 422, "top_k"),
        ("/v1/score", b'{"sequences": [[1, 2, 3]], "top_k": true}', 422, "top_k"),
        ("/v1/score", b'{"sequences": [[1, 2, Infinity]]}', 422, "sequences[0][2]"),
        ("/v1/score", b'{"sequences": [[1, 2, null]]}', 422, "sequences[0][2]"),
        ("/v1/score", b'{"sequences": {"0": [1, 2]}}', 422, "sequences"),
        ("/v1/score", b"[[1, 2, 3]]", 422, None),
        ("/v1/score", b"null", 422, None),
        ("/v1/score", b"", 422, None),
        ("/v1/continue", b'{"prefixes": [[1, 5]], "max_tokens": 4, "temperature": NaN}', 422, "temperature"),
        ("/v1/continue", b'{"prefixes": [[1, 5]], "max_tokens": 4, "temperature": Infinity}', 422, "temperature"),
        ("/v1/continue", b'{"prefixes": [[1, 5]], "max_tokens": 4, "temperature": 1e308}', 422, "temperature"),
        ("/v1/continue", b'{"prefixes": [[1, 5]], "max_tokens": 4, "top_p": NaN}', 422, "top_p"),
        ("/v1/continue", b'{"prefixes": [[1, 5]], "max_tokens": 4, "seed": 18446744073709551616}', 422, "seed"),
        ("/v1/continue", b'{"prefixes": [[1, 5]], "max_tokens": 4, "seed": -1}', 422, "seed"),
        ("/v1/continue", b'{"prefixes": [[1, 5]], "max_tokens": 100000000000000000000}', 422, "max_tokens"),
        ("/v1/continue", b'{"prefixes": [[1, 5]], "max_tokens": "4"}', 422, "max_tokens"),
        ("/v1/continue", b'{"prefixes": [[]], "max_tokens": 4}', 422, "prefixes[0]"),
        ("/v1/continue", b'{"prefixes": [[1, 5]]}', 422, "max_tokens"),
        ("/v1/continue", b'{"prefixes": [[1, 5]], "max_tokens": 4, "stop_ids": [-1]}', 422, "stop_ids[0]"),
        ("/v1/score", b'{"sequences": [[1, 2, 3]], "start": [1, "2"]}', 422, "start"),
        ("/v1/score", b'{"sequences": [[1, 2, 3]], "start": 1.5}', 422, "start"),
        ("/v1/score", b'{"sequences": [[1, 2, 3]], "note": "\xff\xfe"}', 400, "body"),  # not UTF-8
        ("/v1/score", b'{"sequences": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "body"),  # nested deep
    ],
    ids=lambda v: v.decode(errors="replace")[:60] if isinstance(v, bytes) else str(v),
)
def test_bad_input_is_a_clear_4xx(service, path, raw, status, field):
    response = _post(service, path, raw)
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert error["field"] == field and error["message"], error
    assert httpx.post(f"{service.url}/v1/score", json=OK).status_code == 200


def test_request_limits(service):
    url = f"{service.url}/v1/score"
    r = httpx.post(url, json={"sequences": [[1, 5]] * (MAX_SEQUENCES + 1)})
    assert r.status_code == 422 and r.json()["error"]["field"] == "sequences", r.text
    assert "limit" in r.json()["error"]["message"]
    r = httpx.post(url, json={"sequences": [[1] + [5] * 499] * 9})  # 4500 tokens, over the request limit
    assert r.status_code == 422 and r.json()["error"]["field"] == "sequences", r.text
    # a body over the limit, declared (Content-Length) or streamed (chunked, no length): 413 before it is parsed
    big = b'{"sequences": [[' + b"1, " * (MAX_BODY // 3) + b"1]]}"
    r = _post(service, "/v1/score", big)
    assert r.status_code == 413 and r.json()["error"]["field"] == "body"

    def chunks():
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    r = httpx.post(url, content=chunks(), headers={"content-type": "application/json"})
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert r.status_code == 413 and r.json()["error"] == {
        "type": "body_too_large",
        "message": f"request body over the limit of {MAX_BODY} bytes",
        "field": "body",
    }
    small = iter([b'{"sequences": ', b"[[1, 5, 6]]}"])
    assert httpx.post(url, content=small, headers={"content-type": "application/json"}).status_code == 200
    r = _post(service, "/v1/score", b"\x00\x01", "application/x-safetensors")
    assert r.status_code == 415 and r.json()["error"]["field"] == "body"


def test_full_queue_sheds_load_with_503(service):
    """Requests that would pass the in-flight token budget are refused at once with 503 + Retry-After."""
    body = {"sequences": [[1] + [5] * 399] * 9, "top_k": 20}  # 3600 tokens: one such request fits the budget

    async def one(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post("/v1/score", json=body)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=service.url, timeout=60) as client:
            return await asyncio.gather(*(one(client) for _ in range(16)))

    responses = asyncio.run(burst())
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 503}, statuses
    for r in responses:
        if r.status_code == 503:
            assert r.json()["error"]["type"] == "overloaded" and float(r.headers["retry-after"]) >= 1


# ---- slow and vanishing clients ----------------------------------------------------------------------


def _address(service) -> tuple[str, int]:
    host, port = service.url.removeprefix("http://").split(":")
    return host, int(port)


def test_slow_clients_do_not_block_others(service):
    """32 connections that send their headers one line at a time, never finishing, 8 that send a declared
    body byte by byte, and 8 idle ones; meanwhile ordinary requests are answered as fast as ever."""
    address = _address(service)
    slow: list[socket.socket] = []
    for i in range(48):
        s = socket.create_connection(address, timeout=5)
        if i < 32:
            s.sendall(b"POST /v1/score HTTP/1.1\r\nHost: teacher\r\n")
        elif i < 40:
            s.sendall(b"POST /v1/score HTTP/1.1\r\nHost: teacher\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100000\r\n\r\n{\"sequences\": [[1")  # fmt: skip
        slow.append(s)
    stop = threading.Event()

    def trickle():
        n = 0
        while not stop.wait(0.2):
            n += 1
            for i, s in enumerate(slow[:40]):
                s.sendall(f"x-slow-{n}: 1\r\n".encode() if i < 32 else b", 1")

    feeder = threading.Thread(target=trickle, daemon=True)
    feeder.start()
    try:
        latencies = []
        with httpx.Client(base_url=service.url, timeout=10) as client:
            for _ in range(20):
                start = time.perf_counter()
                assert client.post("/v1/score", json={"sequences": [[1, 5, 6, 7] * 20], "top_k": 5}).status_code == 200
                assert httpx.get(f"{service.url}/healthz", timeout=10).status_code == 200  # a new connection
                latencies.append(time.perf_counter() - start)
                time.sleep(0.1)
        print(f"slow clients: 48 connections held; 20 ordinary requests, slowest {1000 * max(latencies):.0f} ms")
        assert max(latencies) < 3, latencies
    finally:
        stop.set()
        feeder.join()
        for s in slow:
            s.close()
    assert httpx.post(f"{service.url}/v1/score", json=OK).status_code == 200


def test_clients_that_vanish_mid_request(service):
    address = _address(service)
    body = httpx.Request("POST", "http://t/v1/score", json={"sequences": [[1] + [5] * 399] * 9, "top_k": 20})
    head = (
        "POST /v1/score HTTP/1.1\r\nHost: teacher\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body.read())}\r\n\r\n"
    )
    for cut in (len(head) // 2, len(head), len(head) + 100, None):  # mid-headers, mid-body, whole request
        s = socket.create_connection(address, timeout=5)
        data = head.encode() + body.read()
        s.sendall(data if cut is None else data[:cut])
        s.close()  # gone before the answer
    time.sleep(1.0)  # the whole request is being scored for nobody
    assert httpx.post(f"{service.url}/v1/score", json=OK).status_code == 200


def _read_until_closed(s: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed (s after the call)."""
    start, data = time.perf_counter(), b""
    s.settimeout(limit_s)
    while chunk := s.recv(65536):
        data += chunk
    return data, time.perf_counter() - start


def test_read_deadline_closes_slow_requests_with_408(toy_quick, tmp_path):
    """With --read-timeout-s 1: a client that sends nothing, one that trickles its headers, one that
    stalls in its body, each gets 408 (request_timeout) and a closed connection after about 1 s, counted in
    /metrics; a request that takes 0.4 s to arrive is served; unfinished headers past 16 KiB get 400; a kept-alive
    connection idle for longer than the deadline is not cut; the service keeps serving."""
    with teacher(toy_quick / "teacher", "hf", tmp_path, "--read-timeout-s", "1", env=ONE_THREAD) as svc:
        address = _address(svc)
        silent = socket.create_connection(address, timeout=5)
        headers = socket.create_connection(address, timeout=5)
        headers.sendall(b"POST /v1/score HTTP/1.1\r\nHost: teacher\r\n")
        stalled = socket.create_connection(address, timeout=5)
        stalled.sendall(b"POST /v1/score HTTP/1.1\r\nHost: teacher\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 1000\r\n\r\n{\"sequences\": [[1")  # fmt: skip
        for _ in range(3):  # keep trickling header lines: the deadline is for the whole request
            time.sleep(0.2)
            headers.sendall(b"x-slow: 1\r\n")
        for s in (silent, headers, stalled):
            data, waited = _read_until_closed(s, 10)
            s.close()
            assert data.startswith(b"HTTP/1.1 408 "), data
            assert b'"type": "request_timeout"' in data, data
            assert waited < 5
        body = b'{"sequences": [[1, 5, 6]]}'
        slow_but_in_time = socket.create_connection(address, timeout=5)
        slow_but_in_time.sendall(b"POST /v1/score HTTP/1.1\r\nHost: teacher\r\nContent-Type: application/json\r\n")
        time.sleep(0.2)
        slow_but_in_time.sendall(b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:5])
        time.sleep(0.2)
        slow_but_in_time.sendall(body[5:])
        data, _ = _read_until_closed(slow_but_in_time, 10)
        slow_but_in_time.close()
        assert data.startswith(b"HTTP/1.1 200 "), data
        too_big = socket.create_connection(address, timeout=5)  # unfinished headers past h11's 16 KiB
        too_big.sendall(b"GET /healthz HTTP/1.1\r\nHost: teacher\r\nx-big: " + b"a" * 20000)
        data, _ = _read_until_closed(too_big, 10)
        too_big.close()
        assert data.startswith(b"HTTP/1.1 400 "), data
        with httpx.Client(base_url=svc.url, timeout=10) as client:  # a kept-alive connection idle past 1 s
            assert client.post("/v1/score", json=OK).status_code == 200
            time.sleep(1.5)
            assert client.post("/v1/score", json=OK).status_code == 200
            metrics = client.get("/metrics").text
        assert 'tropd_errors_total{kind="request_timeout"} 3.0' in metrics, metrics
    assert "Traceback" not in svc.log(), svc.log()[-3000:]
    assert svc.process.returncode == 0


# ---- access control ----------------------------------------------------------------------------------

KEY = "k3y-Only-For-This-Test-5e9a1c"


def test_every_route_needs_the_key_and_the_key_is_never_logged(toy_quick, tmp_path):
    env = {"TROPD_TEST_KEY": KEY, **ONE_THREAD}
    args = ["--api-key-env", "TROPD_TEST_KEY", "--metrics-open", "--log-level", "debug"]
    good = {"authorization": f"Bearer {KEY}"}
    wrong = [
        {},
        {"authorization": ""},
        {"authorization": "Bearer"},
        {"authorization": KEY},
        {"authorization": f"bearer {KEY}"},
        {"authorization": f"Bearer  {KEY}"},
        {"authorization": f"Bearer {KEY[:-1]}"},
        {"authorization": f"Bearer {KEY}x"},
        {"authorization": f"Basic {KEY}"},
        {"x-api-key": KEY},
        {"authorization": "Bearer " + "A" * 8000},
    ]
    with teacher(toy_quick / "teacher", "hf", tmp_path, *args, env=env) as svc:
        documented = httpx.get(f"{svc.url}/openapi.json", headers=good).json()["paths"]
        paths = [*documented, "/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect", "/nothing/here"]
        open_paths = {"/healthz": 200, "/health": 200, "/metrics": 200}
        tried = 0
        with httpx.Client(base_url=svc.url, timeout=10) as client:
            for path in paths:
                for method in ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"):
                    for headers in wrong:
                        r = client.request(method, path, headers=headers, json=OK, params={"api_key": KEY})
                        tried += 1
                        if path in open_paths:
                            assert r.status_code != 401, (method, path, headers)
                            continue
                        assert r.status_code == 401, (method, path, headers, r.status_code)
                        assert r.headers["www-authenticate"] == "Bearer"
                        if method != "HEAD":
                            assert r.json()["error"]["type"] == "unauthorized"
                            assert KEY not in r.text
            bodies = {"/v1/score": OK, "/v1/continue": {"prefixes": [[1, 5]], "max_tokens": 2},
                      "/v1/completions": {"prompt": [1, 5], "max_tokens": 1}}  # fmt: skip
            for path in documented:
                method = next(iter(documented[path])).upper()
                r = client.request(method, path, headers=good, json=bodies.get(path))
                assert r.status_code == 200, (path, r.text[:300])
                assert KEY not in r.text
            assert client.get("/openapi.json", headers=good).status_code == 200
            metrics = client.get("/metrics").text
        cmdline = Path(f"/proc/{svc.process.pid}/cmdline").read_bytes() if Path("/proc").is_dir() else b""
    print(f"access: {tried} requests without the right key")
    assert tried == len(paths) * 7 * len(wrong)
    assert KEY not in metrics
    assert KEY.encode() not in cmdline  # the key travels in the environment, not in the command line
    log = svc.log()
    assert '"status": 401' in log and '"auth": true' in log  # the log did record those requests
    assert KEY not in log and KEY[:12] not in log
