"""The teacher service's HTTP application: routes, validation, auth, limits, metrics, errors.

`create_app(engine, settings)` wraps a loaded engine; `tropd teacher serve` runs it under uvicorn.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, replace

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.teacher import schemas
from services.teacher.batching import Batcher, Overloaded, ShuttingDown
from services.teacher.engines import SamplingSpec, ScoreItem
from services.teacher.metrics import Metrics
from services.teacher.protocol import (
    BINARY_MEDIA_TYPE,
    PROTOCOL_VERSION,
    encode_results,
    results_to_json,
)

log = logging.getLogger("tropd.teacher")
OPEN_PATHS = {"/healthz"}
ROUTES = {"/healthz", "/readyz", "/metrics", "/v1/info", "/v1/score", "/v1/continue"}


@dataclass
class Settings:
    max_top_k: int = 20
    max_sequences: int = 1024
    max_request_tokens: int = 262144
    max_body_bytes: int = 8 << 20
    max_batch_tokens: int = 32768
    batch_window_ms: float = 2.0
    max_inflight_tokens: int = 1 << 20
    api_key: str | None = None
    metrics_open: bool = False
    simulate_latency_ms: float = 0.0
    fail_rate: float = 0.0

    def limits(self) -> dict[str, int]:
        keys = ("max_top_k", "max_sequences", "max_request_tokens", "max_body_bytes", "max_inflight_tokens")
        return {k: getattr(self, k) for k in keys}


class BadInput(Exception):
    def __init__(self, field: str | None, message: str, status: int = 422, kind: str = "invalid_request"):
        super().__init__(message)
        self.field, self.message, self.status, self.kind = field, message, status, kind


def error_body(kind: str, message: str, field: str | None = None) -> dict:
    """The JSON body of every error answer: `{"error": {"type", "message", "field"}}`."""
    return {"error": {"type": kind, "message": message, "field": field}}


def error_response(status: int, kind: str, message: str, field: str | None = None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(kind, message, field), status_code=status, headers=headers)


def _field(loc) -> str | None:
    """`sequences[0][2]` from pydantic's location. Request bodies are flat, so after the field name only list
    indices are kept: a name there is the member of a union that pydantic tried (`temperature.float`)."""
    parts = [p for p in loc if p != "body"]
    if not parts:
        return None
    return str(parts[0]) + "".join(f"[{p}]" for p in parts[1:] if isinstance(p, int))


class BodyLimit:
    """Pure ASGI middleware: a body over `limit` bytes gets 413 before the app reads it.

    A declared Content-Length is checked at once (the HTTP parser delivers no more than it declares); a body
    without one (chunked) is read here, up to the limit, and handed on to the app.
    """

    def __init__(self, app, limit: int, on_reject):
        self.app, self.limit, self.on_reject = app, limit, on_reject

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit():
            if int(declared) > self.limit:
                return await self._reject(scope, receive, send)
            return await self.app(scope, receive, send)
        messages, seen = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            seen += len(message.get("body", b""))
            if seen > self.limit:
                return await self._reject(scope, receive, send)
            if not message.get("more_body"):
                break
        buffered = iter(messages)

        async def replay():
            return next(buffered, None) or await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope, receive, send):
        self.on_reject()
        resp = error_response(413, "body_too_large", f"request body over the limit of {self.limit} bytes", "body")
        await resp(scope, receive, send)


def create_app(engine, settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    batcher = Batcher(
        engine,
        max_batch_tokens=settings.max_batch_tokens,
        window_ms=settings.batch_window_ms,
        max_inflight_tokens=settings.max_inflight_tokens,
        metrics=metrics,
    )
    info = engine.info
    # a top-k over the vocabulary does not exist: the vocabulary size is the real limit then
    settings = replace(settings, max_top_k=min(settings.max_top_k, info.vocab_size))
    state = {"ready": True}

    async def lifespan(app):
        yield
        state["ready"] = False
        await asyncio.to_thread(batcher.close)
        engine.close()

    app = FastAPI(
        title="TrOPD teacher",
        version=str(PROTOCOL_VERSION),
        description="Per-token log-probs, top-k and continuations of a teacher model.",
        lifespan=lifespan,
        responses={
            "4XX": {"model": schemas.ErrorBody, "description": "bad input"},
            "5XX": {"model": schemas.ErrorBody, "description": "unavailable"},
        },
    )
    app.state.metrics, app.state.batcher, app.state.settings = metrics, batcher, settings
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, on_reject=lambda: _count(413, "body_too_large"))

    def _count(status: int, kind: str) -> None:
        metrics.errors.labels(kind).inc()

    @app.middleware("http")
    async def access(request: Request, call_next):
        start = time.perf_counter()
        path = request.url.path
        if (
            settings.api_key is not None
            and path not in OPEN_PATHS
            and not (path == "/metrics" and settings.metrics_open)
        ):
            given = request.headers.get("authorization", "")
            expected = f"Bearer {settings.api_key}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                metrics.errors.labels("unauthorized").inc()
                response = error_response(
                    401, "unauthorized", "missing or wrong API key", headers={"WWW-Authenticate": "Bearer"}
                )
                _log_request(request, response.status_code, start)
                return response
        response = await call_next(request)
        route = path if path in ROUTES else "other"
        if route in ("/v1/score", "/v1/continue"):
            metrics.client_requests.labels(_client_id(request)).inc()
        metrics.requests.labels(route, str(response.status_code)).inc()
        metrics.latency.labels(route).observe(time.perf_counter() - start)
        metrics.inflight_tokens.set(batcher.inflight_tokens)
        _log_request(request, response.status_code, start)
        return response

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError):
        ctype = request.headers.get("content-type", "")
        if request.method == "POST" and "json" not in ctype:
            metrics.errors.labels("unsupported_media_type").inc()
            message = f"send the request body as JSON with Content-Type: application/json (got {ctype or 'none'!r})"
            return error_response(415, "unsupported_media_type", message, "body")
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": "value_error"}
        if first.get("type") == "json_invalid":
            metrics.errors.labels("malformed_body").inc()
            return error_response(400, "malformed_body", f"request body is not valid JSON: {first['msg']}", "body")
        metrics.errors.labels("invalid_request").inc()
        return error_response(422, "invalid_request", first["msg"], _field(first["loc"]))

    @app.exception_handler(BadInput)
    async def on_bad_input(request: Request, exc: BadInput):
        metrics.errors.labels(exc.kind).inc()
        return error_response(exc.status, exc.kind, exc.message, exc.field)

    @app.exception_handler(Overloaded)
    async def on_overloaded(request: Request, exc: Overloaded):
        metrics.errors.labels("overloaded").inc()
        return error_response(503, "overloaded", str(exc), headers={"Retry-After": f"{exc.retry_after:.0f}"})

    @app.exception_handler(ShuttingDown)
    async def on_shutdown(request: Request, exc: ShuttingDown):
        metrics.errors.labels("shutting_down").inc()
        return error_response(503, "shutting_down", str(exc), headers={"Retry-After": "5"})

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        kind = {400: "malformed_body", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        metrics.errors.labels(kind).inc()
        field = "body" if exc.status_code == 400 else None  # FastAPI's 400: a body it could not decode
        return error_response(exc.status_code, kind, str(exc.detail), field, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        metrics.errors.labels("internal").inc()
        return error_response(500, "internal", "internal error: the request failed; the service keeps serving")

    @app.get("/healthz", summary="alive")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="model loaded and serving", responses={503: {"model": schemas.ErrorBody}})
    async def readyz():
        if not state["ready"]:
            return error_response(503, "not_ready", "shutting down")
        return {"status": "ready"}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/info", response_model=schemas.Info)
    async def get_info():
        return {
            **asdict(info),
            "max_top_k": settings.max_top_k,
            "protocol": PROTOCOL_VERSION,
            "limits": settings.limits(),
        }

    binary_doc = {200: {"content": {BINARY_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}}}}

    @app.post("/v1/score", response_model=schemas.ScoreResponse, responses=binary_doc)
    async def score(body: schemas.ScoreRequest, request: Request):
        await _chaos()
        items = _score_items(body, info, settings)
        results = await batcher.score(items)
        tokens = sum(len(r.logprobs) for r in results)
        metrics.tokens_scored.inc(tokens)
        return _respond(request, results, {"tokens": tokens, "sequences": len(results), "generated_tokens": 0})

    @app.post("/v1/continue", response_model=schemas.ContinueResponse, responses=binary_doc)
    async def continue_(body: schemas.ContinueRequest, request: Request):
        await _chaos()
        prefixes, spec = _continue_items(body, info, settings)
        results = await batcher.generate(prefixes, spec)
        generated = sum(len(r.token_ids) for r in results)
        metrics.tokens_generated.inc(generated)
        usage = {"tokens": sum(map(len, prefixes)), "sequences": len(results), "generated_tokens": generated}
        return _respond(request, results, usage)

    async def _chaos():
        """Test options: an injected latency, and a share of requests failed with 503."""
        if settings.simulate_latency_ms > 0:
            await asyncio.sleep(settings.simulate_latency_ms / 1000)
        if settings.fail_rate > 0 and random.random() < settings.fail_rate:
            raise Overloaded(retry_after=0.0)

    return app


def _respond(request: Request, results, usage: dict) -> Response:
    if BINARY_MEDIA_TYPE in request.headers.get("accept", ""):
        return Response(encode_results(results, usage), media_type=BINARY_MEDIA_TYPE)
    body = json.dumps({"results": results_to_json(results), "usage": usage}, allow_nan=False)
    return Response(body, media_type="application/json")


def _check_ids(field: str, seqs: list[list[int]], vocab: int, max_len: int, settings: Settings) -> int:
    if len(seqs) > settings.max_sequences:
        raise BadInput(field, f"{len(seqs)} sequences, more than the limit of {settings.max_sequences}")
    total = 0
    for i, seq in enumerate(seqs):
        if not seq:
            raise BadInput(f"{field}[{i}]", "empty sequence")
        if len(seq) > max_len:
            raise BadInput(f"{field}[{i}]", f"{len(seq)} tokens, more than the limit of {max_len}")
        lo, hi = min(seq), max(seq)
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise BadInput(f"{field}[{i}][{seq.index(bad)}]", f"token id {bad} outside the vocabulary [0, {vocab})")
        total += len(seq)
    if total > settings.max_request_tokens:
        raise BadInput(field, f"{total} tokens in the request, more than the limit of {settings.max_request_tokens}")
    return total


def _check_top_k(top_k: int, settings: Settings) -> None:
    if top_k > settings.max_top_k:
        raise BadInput("top_k", f"top_k {top_k} is over this teacher's limit of {settings.max_top_k}")


def _score_items(body: schemas.ScoreRequest, info, settings: Settings) -> list[ScoreItem]:
    _check_top_k(body.top_k, settings)
    # a scored sequence needs one position of headroom in engines that also sample a token
    _check_ids("sequences", body.sequences, info.vocab_size, info.max_model_len - 1, settings)
    starts = body.start if isinstance(body.start, list) else [body.start] * len(body.sequences)
    if len(starts) != len(body.sequences):
        raise BadInput("start", f"{len(starts)} start positions for {len(body.sequences)} sequences")
    for i, (s, seq) in enumerate(zip(starts, body.sequences, strict=True)):
        if not 1 <= s < len(seq):
            where = "start" if isinstance(body.start, int) else f"start[{i}]"
            raise BadInput(where, f"start {s} must be >= 1 and < the sequence's length {len(seq)} (sequence {i})")
    return [ScoreItem(seq, s, body.top_k) for seq, s in zip(body.sequences, starts, strict=True)]


def _continue_items(body: schemas.ContinueRequest, info, settings: Settings):
    _check_top_k(body.top_k, settings)
    _check_ids("prefixes", body.prefixes, info.vocab_size, info.max_model_len, settings)
    for i, p in enumerate(body.prefixes):
        if len(p) + body.max_tokens > info.max_model_len:
            raise BadInput(
                "max_tokens",
                f"prefix {i} ({len(p)} tokens) plus max_tokens {body.max_tokens} exceeds max_model_len "
                f"{info.max_model_len}",
            )
    for j, t in enumerate(body.stop_ids):
        if not 0 <= t < info.vocab_size:
            raise BadInput(f"stop_ids[{j}]", f"token id {t} outside the vocabulary [0, {info.vocab_size})")
    spec = SamplingSpec(
        max_tokens=body.max_tokens,
        temperature=float(body.temperature),
        top_p=float(body.top_p),
        seed=body.seed,
        stop_ids=tuple(body.stop_ids),
        top_k=body.top_k,
    )
    return body.prefixes, spec


def _client_id(request: Request) -> str:
    """The caller's self-chosen id (bounded and sanitised, it becomes a metrics label)."""
    raw = request.headers.get("x-tropd-client", "anonymous")[:64]
    return "".join(c if c.isalnum() or c in "-_.:" else "_" for c in raw) or "anonymous"


def _log_request(request: Request, status: int, start: float) -> None:
    """One structured (JSON) line per request; headers, and so any key, are never logged."""
    record = {
        "event": "request",
        "method": request.method,
        "path": request.url.path,
        "status": status,
        "ms": round(1000 * (time.perf_counter() - start), 2),
        "client": request.client.host if request.client else None,
    }
    log.info(json.dumps(record))
