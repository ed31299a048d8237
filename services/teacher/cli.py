"""Subcommands of the teacher wing: `tropd teacher serve`, `tropd bench teacher`."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys

from tropd.argtypes import non_negative_int, positive_float, positive_int
from tropd.errors import UserError
from tropd.machine import torch_threads

EXIT_ENGINE_FAILED = 3  # the engine died: a supervisor (Compose `restart`, Kubernetes) should replace the process


def add_teacher(sub) -> None:
    teacher = sub.add_parser("teacher", help="the teacher scoring service")
    teacher_sub = teacher.add_subparsers(dest="teacher", metavar="ACTION", parser_class=type(teacher), required=True)
    serve = teacher_sub.add_parser(
        "serve",
        help="serve a teacher model over HTTP (score, continue, info, metrics)",
        description="Serve per-token log-probs, top-k and continuations of a teacher model over HTTP (API v1). "
        "Requests from all clients are batched together under a token budget.",
    )
    serve.add_argument("--model", required=True, help="teacher model directory (Hugging Face layout)")
    serve.add_argument(
        "--engine",
        choices=("vllm", "hf", "auto"),
        default="auto",
        help="vllm, hf (transformers) or auto (default: vllm when it is installed and starts here, else hf, "
        "with a warning saying why)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=8000, help="port (default: 8000; 0 picks a free one)")
    serve.add_argument("--max-top-k", type=non_negative_int, default=20, help="largest top-k served (default: 20)")
    serve.add_argument(
        "--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
        help="auto (default): bfloat16 on a CUDA device that supports it, float32 on CPU",
    )  # fmt: skip
    serve.add_argument(
        "--api-key-env",
        metavar="NAME",
        help="require `Authorization: Bearer <key>`, the key read from this environment variable",
    )
    serve.add_argument("--metrics-open", action="store_true", help="serve /metrics without the API key")
    serve.add_argument("--max-sequences", type=positive_int, default=1024, help="sequences per request (1024)")
    serve.add_argument("--max-request-tokens", type=positive_int, default=262144, help="tokens per request (262144)")
    serve.add_argument("--max-body-bytes", type=positive_int, default=8 << 20, help="request body size (8 MiB)")
    serve.add_argument("--max-batch-tokens", type=positive_int, default=32768, help="tokens per engine call (32768)")
    serve.add_argument(
        "--min-shared-batch-tokens",
        type=positive_int,
        default=2048,
        help="while several clients compete, an engine call holds as many tokens as the smallest of their requests, "
        "but at least this many (2048); while some of them are between requests, the clients queued take their "
        "weights' part of it",
    )
    serve.add_argument(
        "--batch-window-ms", type=float, default=2.0, help="wait this long for more requests to batch (2)"
    )
    serve.add_argument(
        "--max-inflight-tokens",
        type=positive_int,
        default=1 << 20,
        help="tokens admitted at once; beyond it requests get 503 + Retry-After (1048576)",
    )
    serve.add_argument(
        "--max-client-inflight-tokens",
        type=positive_int,
        help="tokens one client (X-TrOPD-Client, else its API key) may have in flight; beyond it its requests get "
        "429 + Retry-After (default: --max-inflight-tokens; raised to at least --max-request-tokens)",
    )
    serve.add_argument(
        "--scheduling",
        choices=("fair", "fcfs"),
        default="fair",
        help="fair: batches filled from per-client queues by weighted fair queuing (default); fcfs: one queue, "
        "first come first served",
    )
    serve.add_argument(
        "--client-weight",
        action="append",
        type=_client_weight,
        default=[],
        metavar="CLIENT=W",
        help="share of the engine for a client id under fair scheduling, relative to 1 for the others "
        "(repeatable; e.g. --client-weight eval=0.25)",
    )
    serve.add_argument("--max-model-len", type=positive_int, help="context length (default: the model's)")
    serve.add_argument(
        "--gpu-memory-utilization",
        type=float,
        help="vllm: memory share for weights and KV cache (default 0.9 on GPU; on CPU: share of RAM for the KV cache, "
        "default 0.15)",
    )
    serve.add_argument("--tensor-parallel-size", type=positive_int, default=1, help="vllm: GPUs per replica (1)")
    serve.add_argument(
        "--simulate-latency-ms", type=float, default=0.0, help="testing: add this latency to every score/continue (0)"
    )
    serve.add_argument(
        "--fail-rate", type=float, default=0.0, help="testing: answer this share of requests with 503 (0-1; 0)"
    )
    serve.add_argument(
        "--read-timeout-s",
        type=positive_float,
        default=30.0,
        help="a client must send a whole request (line, headers, body) within this time, else 408 and the "
        "connection is closed (default: 30)",
    )
    serve.add_argument(
        "--keep-alive-s",
        type=positive_float,
        default=30.0,
        help="idle keep-alive connections are closed after this time (default: 30)",
    )
    serve.add_argument(
        "--threads",
        type=positive_int,
        help="torch threads (default: the cores this process may use, by its affinity and its cgroup CPU limit); "
        "vLLM's CPU backend may bind its own (VLLM_CPU_OMP_THREADS_BIND)",
    )
    serve.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), default="info", help="log detail (info)"
    )
    serve.set_defaults(run=run_serve)


def add_bench(sub) -> None:
    bench = sub.add_parser(
        "teacher",
        help="scoring throughput: the service against its engine and vLLM's stock OpenAI server",
        description="Scored tokens/s on the same random token sequences (fixed seed) of (a) the vLLM engine "
        "in-process (what the service runs, without HTTP), (b) `tropd teacher serve --engine vllm` with "
        "the binary body, (c) the same with JSON, (d) vLLM's stock OpenAI server (/v1/completions with "
        "prompt log-probs), for each number of concurrent clients; plus bytes per scored token, the "
        "ratios b/a and b/d, and whether all paths agree (top-k ids and log-probs within 1e-4). The "
        "sequences are cut into requests, dealt round-robin to the clients, which all start at once and "
        "send their requests one after another; (a) merges C concurrent requests into one engine call. "
        "Servers run one at a time; with each server up, the engine (loaded first, idle meanwhile) and that "
        "server's paths are timed in turn, round by round, after two warm-up passes; medians are reported, "
        "and each ratio uses the engine passes of the same rounds. Then, on the service: one greedy client "
        "among N (`min_fair_share`, `aggregate_over_single`), and (e) its /v1/completions beside (d); last, b/a "
        "again with each path alone (the engine in a subprocess that exits, then the service; A-B alternated).",
    )
    bench.add_argument(
        "--model", default="artifacts/toy/teacher", help="teacher model directory (default: artifacts/toy/teacher)"
    )
    bench.add_argument("--sequences", type=positive_int, help="sequences per pass (default: 64; --quick: 16)")
    bench.add_argument("--length", type=positive_int, help="tokens per sequence (default: 256; --quick: 64)")
    bench.add_argument("--top-k", type=non_negative_int, default=5, help="top-k per scored position (default: 5)")
    bench.add_argument("--repeats", type=positive_int, help="timed passes per measurement (default: 5; --quick: 2)")
    bench.add_argument("--clients", type=_client_counts, help="numbers of concurrent clients, comma-separated (1,4)")
    bench.add_argument("--request-sequences", type=positive_int, help="sequences per request (default: 16; --quick: 4)")
    bench.add_argument("--skip-stock", action="store_true", help="skip (d), vLLM's stock OpenAI server")
    bench.add_argument(
        "--service-url",
        type=_stock_url,
        help="measure (b), (c), (e) and the contention rounds against `tropd teacher serve --engine vllm` already "
        "running at this URL (the same model, default batching, --max-top-k 20 or more) instead of starting one",
    )
    bench.add_argument(
        "--stock-url",
        type=_stock_url,
        help="measure (d) against a stock vLLM OpenAI server already running at this URL (serving the same model, "
        "--max-logprobs 20 or more) instead of starting one",
    )
    bench.add_argument(
        "--contention-seconds", type=positive_float, help="length of each contention round (default: 20; --quick: 3)"
    )
    bench.add_argument(
        "--alternations",
        type=non_negative_int,
        help="A-B pairs of the separated b/a (default: 2; --quick: 1; 0 leaves that measurement out)",
    )
    bench.add_argument(
        "--stock-tokenizer",
        action="store_true",
        help="run (d) with its tokenizer (vLLM's default: it checks ids and detokenises the log-probs) instead "
        "of --skip-tokenizer-init, its fastest setting for ids",
    )
    bench.add_argument("--quick", action="store_true", help="small sizes and 2 repeats: a smoke test (16 x 64)")
    bench.add_argument("--json", action="store_true", help="print one JSON object with every measurement")
    bench.add_argument(
        "--fair-share",
        action="store_true",
        help="instead: the engine-token share of each of --clients polite clients and one greedy client, under "
        "FCFS and under fair scheduling, side by side (default --clients 1,2,4)",
    )
    bench.add_argument(
        "--engine", choices=("vllm", "hf", "auto"), default="auto", help="--fair-share: the service's engine (auto)"
    )
    bench.set_defaults(run=run_bench_teacher)


def _stock_url(text: str) -> str:
    import argparse

    url = text.strip().rstrip("/")
    if not url.startswith(("http://", "https://")) or len(url.split("://", 1)[1]) == 0:
        raise argparse.ArgumentTypeError(f"expected an http:// or https:// URL, got {text!r}")
    return url


def _client_counts(text: str) -> tuple[int, ...]:
    import argparse

    try:
        counts = tuple(positive_int(part.strip()) for part in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    return tuple(dict.fromkeys(counts))


def run_bench_teacher(args) -> int:
    from services.teacher.bench import throughput as bench

    if args.fair_share:
        return run_bench_fair_share(args)
    quick = args.quick
    config = bench.BenchConfig(
        model=args.model,
        sequences=args.sequences or (16 if quick else 64),
        length=args.length or (64 if quick else 256),
        top_k=args.top_k,
        repeats=args.repeats or (2 if quick else 5),
        clients=args.clients or (1, 4),
        request_sequences=args.request_sequences or (4 if quick else 16),
        skip_stock=args.skip_stock,
        stock_tokenizer=args.stock_tokenizer,
        stock_url=args.stock_url,
        service_url=args.service_url,
        contention_seconds=args.contention_seconds or (3.0 if quick else 20.0),
        alternations=(1 if quick else 2) if args.alternations is None else args.alternations,
    )
    bench.model_limits(config.model)  # a missing model is a one-line error before anything starts
    with bench.sigterm_as_interrupt():
        with bench.stdout_to_stderr():
            report = bench.run_bench(config, progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(report, indent=2) if args.json else bench.format_table(report))
    return 0


def run_bench_fair_share(args) -> int:
    from services.teacher.bench import fair as bench_fair
    from services.teacher.bench import throughput as bench

    vocab_size, context = bench.model_limits(args.model)
    config = bench_fair.FairShareConfig(
        model=args.model,
        engine=args.engine,
        clients=args.clients or (1, 2, 4),
        length=min(args.length or 64, context - 1),
        request_sequences=args.request_sequences or 4,
        polite_requests=4 if args.quick else 8,
        mixed_length=min(args.length or 256, context - 1),
        mixed_sequences=args.request_sequences or 8,
    )
    with bench.sigterm_as_interrupt():
        report = bench_fair.run_fair_share(config, vocab_size, progress=lambda line: print(line, file=sys.stderr))
    print(json.dumps(report, indent=2) if args.json else bench_fair.format_fair_share(report))
    return 0


def _at_least(value: int | None, floor: int) -> int | None:
    """A per-client quota below the request limit would refuse some valid requests forever."""
    return None if value is None else max(value, floor)


def _client_weight(text: str) -> tuple[str, float]:
    import argparse

    name, sep, value = text.partition("=")
    try:
        weight = float(value)
    except ValueError:
        weight = -1.0
    if not sep or not name or not (math.isfinite(weight) and weight > 0):
        raise argparse.ArgumentTypeError(f"expected CLIENT=W with W a positive number, got {text!r}")
    return name, weight


def _port(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535, got {value}")
    return value


def settings_from_args(args):
    from services.teacher.app import Settings

    if not 0 <= args.fail_rate <= 1:
        raise UserError(f"--fail-rate must be between 0 and 1, got {args.fail_rate}")
    for name in ("simulate_latency_ms", "batch_window_ms"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            raise UserError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    if args.gpu_memory_utilization is not None and not 0 < args.gpu_memory_utilization <= 1:
        raise UserError(f"--gpu-memory-utilization must be in (0, 1], got {args.gpu_memory_utilization}")
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise UserError(f"--api-key-env {args.api_key_env}: that environment variable is not set or empty")
    return Settings(
        max_top_k=args.max_top_k,
        max_sequences=args.max_sequences,
        max_request_tokens=args.max_request_tokens,
        max_body_bytes=args.max_body_bytes,
        max_batch_tokens=args.max_batch_tokens,
        min_shared_batch_tokens=args.min_shared_batch_tokens,
        batch_window_ms=args.batch_window_ms,
        max_inflight_tokens=max(args.max_inflight_tokens, args.max_request_tokens),
        api_key=api_key,
        metrics_open=args.metrics_open,
        simulate_latency_ms=args.simulate_latency_ms,
        fail_rate=args.fail_rate,
        max_client_inflight_tokens=_at_least(args.max_client_inflight_tokens, args.max_request_tokens),
        scheduling=args.scheduling,
        client_weights=dict(args.client_weight),
    )


def run_serve(args) -> int:
    from tropd.modeldir import check_model_dir

    check_model_dir(args.model, "model")
    settings = settings_from_args(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(message)s", stream=sys.stderr)
    log = logging.getLogger("tropd.teacher")

    import uvicorn

    from services.teacher.app import create_app
    from services.teacher.deadline import DeadlineH11Protocol
    from services.teacher.engines.load import load_engine

    options = {"max_model_len": args.max_model_len, "tensor_parallel_size": args.tensor_parallel_size}
    if args.gpu_memory_utilization is not None:
        options["gpu_memory_utilization"] = args.gpu_memory_utilization
    import torch

    torch.set_num_threads(torch_threads(args.threads, cap=1 << 16))
    engine_name = args.engine
    log.info(json.dumps({"event": "loading", "model": args.model, "engine": engine_name}))
    if engine_name == "vllm":
        from tropd.machine import vllm_available

        if not vllm_available():
            raise UserError("--engine vllm: vLLM is not installed here (use --engine hf, or install vllm)")
    engine = load_engine(
        engine_name,
        args.model,
        dtype=args.dtype,
        max_top_k=args.max_top_k,
        warn=lambda line: log.warning(json.dumps({"event": "engine_fallback", "warning": line})),
        **options,
    )
    if args.max_model_len is not None and engine.name == "hf":
        engine.info.max_model_len = min(engine.info.max_model_len, args.max_model_len)
    app = create_app(engine, settings)
    errors = app.state.metrics.errors
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        http=DeadlineH11Protocol.with_read_timeout(
            args.read_timeout_s, on_timeout=lambda: errors.labels(kind="request_timeout").inc()
        ),
        timeout_keep_alive=args.keep_alive_s,
        timeout_graceful_shutdown=30,
    )
    server = uvicorn.Server(config)
    log.info(
        json.dumps(
            {
                "event": "starting",  # uvicorn's own line says where it listens (the port, with --port 0)
                "engine": engine.name,
                "host": args.host,
                "port": args.port,
                "auth": settings.api_key is not None,
            }
        )
    )
    # uvicorn finishes in-flight requests on SIGTERM, then re-raises the signal with the handler that was
    # in place before it started: make that a no-op so that a graceful shutdown exits 0
    signal.signal(signal.SIGTERM, lambda *_: None)
    app.state.exit_on_failure = lambda: setattr(server, "should_exit", True)
    server.run()
    if app.state.batcher.failure is not None:
        log.error(json.dumps({"event": "exit", "status": EXIT_ENGINE_FAILED, "reason": "the engine failed"}))
        return EXIT_ENGINE_FAILED
    return 0
