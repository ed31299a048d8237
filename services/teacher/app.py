"""The teacher service's HTTP application: routes, validation, auth, limits, metrics, errors.

`create_app(engine, settings)` wraps a loaded engine; `tropd teacher serve` runs it under uvicorn. When the
engine fails for good (see `batching`), `/healthz` and `/readyz` answer 503 at once, every request waiting
or arriving is answered 503 (`engine_failed`), and after `failed_exit_delay_s` the app calls
`app.state.exit_on_failure` (the CLI stops the server and exits non-zero), so that a supervisor replaces it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field, replace

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.teacher import completions, schemas
from services.teacher.batching import ANONYMOUS, Batcher, ClientOverQuota, EngineFailed, Overloaded, ShuttingDown
from services.teacher.inputs import BadInput, continue_items, score_items
from services.teacher.metrics import Metrics
from services.teacher.protocol import (
    BINARY_MEDIA_TYPE,
    PROTOCOL_VERSION,
    encode_results,
    results_to_json,
)

log = logging.getLogger("tropd.teacher")
OPEN_PATHS = {"/healthz", "/health"}  # /health: vLLM's stock server's, which its clients (TRL's) poll
ROUTES = {
    "/healthz",
    "/health",
    "/readyz",
    "/metrics",
    "/v1/info",
    "/v1/score",
    "/v1/continue",
    "/v1/models",
    "/v1/completions",
}
ENGINE_ROUTES = {"/v1/score", "/v1/continue", "/v1/completions"}


@dataclass
class Settings:
    max_top_k: int = 20
    max_sequences: int = 1024
    max_request_tokens: int = 262144
    max_body_bytes: int = 8 << 20
    max_batch_tokens: int = 32768
    min_shared_batch_tokens: int = 2048
    batch_window_ms: float = 2.0
    max_inflight_tokens: int = 1 << 20
    max_client_inflight_tokens: int | None = None  # None: the same as max_inflight_tokens
    scheduling: str = "fair"  # or "fcfs"
    client_weights: dict[str, float] = field(default_factory=dict)
    failed_exit_delay_s: float = 5.0  # between the engine's failure and the exit: probes see the 503s
    api_key: str | None = None
    metrics_open: bool = False
    simulate_latency_ms: float = 0.0
    fail_rate: float = 0.0

    def limits(self) -> dict[str, int]:
        keys = ("max_top_k", "max_sequences", "max_request_tokens", "max_body_bytes", "max_inflight_tokens")
        per_client = self.max_client_inflight_tokens or self.max_inflight_tokens
        return {k: getattr(self, k) for k in keys} | {"max_client_inflight_tokens": per_client}


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
    state = {"ready": True, "loop": None}

    def engine_failed(reason: str) -> None:
        """On the engine thread, once: report unhealthy now, and exit after the delay."""
        metrics.engine_up.set(0)
        log.error(json.dumps({"event": "engine_failed", "error": reason}))
        loop, exit_hook = state["loop"], app.state.exit_on_failure
        if loop is not None and exit_hook is not None:
            loop.call_soon_threadsafe(loop.call_later, settings.failed_exit_delay_s, exit_hook)

    batcher = Batcher(
        engine,
        max_batch_tokens=settings.max_batch_tokens,
        min_shared_batch_tokens=settings.min_shared_batch_tokens,
        window_ms=settings.batch_window_ms,
        max_inflight_tokens=settings.max_inflight_tokens,
        max_client_inflight_tokens=settings.max_client_inflight_tokens,
        policy=settings.scheduling,
        weights=settings.client_weights,
        metrics=metrics,
        on_fatal=engine_failed,
    )
    info = engine.info
    # a top-k over the vocabulary does not exist: the vocabulary size is the real limit then
    settings = replace(settings, max_top_k=min(settings.max_top_k, info.vocab_size))

    async def lifespan(app):
        state["loop"] = asyncio.get_running_loop()
        yield
        state["ready"] = False
        await asyncio.to_thread(batcher.close)
        try:
            engine.close()
        except Exception:  # a dead engine may fail to close: the process exits anyway
            log.exception("closing the engine failed")

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
    generated_openapi, stated = app.openapi, {}

    def openapi_with_limits() -> dict:
        """The generated document with this model's limits stated in it (built once, then cached)."""
        if not stated:
            stated["doc"] = schemas.state_limits(generated_openapi(), info, settings)
        return stated["doc"]

    app.openapi = openapi_with_limits
    app.state.exit_on_failure = None  # set by the server: stop serving, exit non-zero
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
        if route in ENGINE_ROUTES:
            metrics.for_client(metrics.client_requests, client_id(request, settings)).inc()
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

    @app.exception_handler(ClientOverQuota)
    async def on_over_quota(request: Request, exc: ClientOverQuota):
        metrics.errors.labels("client_over_quota").inc()
        return error_response(429, "client_over_quota", str(exc), headers={"Retry-After": f"{exc.retry_after:.0f}"})

    @app.exception_handler(EngineFailed)
    async def on_engine_failed(request: Request, exc: EngineFailed):
        metrics.errors.labels("engine_failed").inc()
        message = f"the teacher's engine failed and this process is exiting ({exc}); retry on its replacement"
        return error_response(503, "engine_failed", message, headers={"Retry-After": "5"})

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

    def failed() -> JSONResponse | None:
        if batcher.failure is None:
            return None
        metrics.errors.labels("engine_failed").inc()
        return error_response(503, "engine_failed", f"the engine failed: {batcher.failure}")

    unhealthy = {503: {"model": schemas.ErrorBody}}

    @app.get("/healthz", summary="alive (503 once the engine has failed)", responses=unhealthy)
    async def healthz():
        return failed() or {"status": "ok"}

    @app.get("/health", summary="as vLLM's stock server: 200 while serving, 503 once the engine has failed",
             response_class=Response, responses=unhealthy)  # fmt: skip
    async def health():
        return failed() or Response(status_code=200)

    @app.get("/readyz", summary="model loaded and serving", responses=unhealthy)
    async def readyz():
        if (answer := failed()) is not None:
            return answer
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
        items = score_items(body, info, settings)
        results = await batcher.score(items, client_id(request, settings))
        tokens = sum(len(r.logprobs) for r in results)
        metrics.tokens_scored.inc(tokens)
        return _respond(request, results, {"tokens": tokens, "sequences": len(results), "generated_tokens": 0})

    @app.post("/v1/continue", response_model=schemas.ContinueResponse, responses=binary_doc)
    async def continue_(body: schemas.ContinueRequest, request: Request):
        await _chaos()
        prefixes, spec = continue_items(body, info, settings)
        results = await batcher.generate(prefixes, spec, client_id(request, settings))
        generated = sum(len(r.token_ids) for r in results)
        metrics.tokens_generated.inc(generated)
        usage = {"tokens": sum(map(len, prefixes)), "sequences": len(results), "generated_tokens": generated}
        return _respond(request, results, usage)

    @app.get("/v1/models", response_model=schemas.ModelList, summary="the served model (OpenAI-compatible)")
    async def models():
        return completions.model_list(info)

    @app.post(
        "/v1/completions",
        response_model=schemas.CompletionResponse,
        summary="teacher scoring in vLLM's OpenAI completions shape (a subset: token-id prompts, max_tokens 0 or 1)",
    )
    async def complete(body: schemas.CompletionRequest, request: Request):
        await _chaos()
        answer = await completions.complete(body, batcher, info, settings, client_id(request, settings))
        metrics.tokens_scored.inc(answer["usage"]["prompt_tokens"])
        return Response(json.dumps(answer, allow_nan=False), media_type="application/json")

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


def client_id(request: Request, settings: Settings) -> str:
    """Whose queue a request joins: its `X-TrOPD-Client` header (bounded and sanitised: it becomes a metrics
    label), else, with auth on, `key-` and a digest of the key it presented, else `anonymous`."""
    raw = request.headers.get("x-tropd-client")
    if raw is not None:
        return "".join(c if c.isalnum() or c in "-_.:" else "_" for c in raw[:64]) or ANONYMOUS
    if settings.api_key is not None:
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        return "key-" + hashlib.sha256(token.encode()).hexdigest()[:12]
    return ANONYMOUS


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
