"""`tropd bench teacher --fair-share`: the engine-token share each client gets when one greedy client floods
the teacher, under first-come-first-served and under fair scheduling, side by side.

For each policy one service is started (`tropd teacher serve --scheduling POLICY`), and for each number N of
`--clients`: N polite clients each send `polite_requests` requests one after another (waiting for each
answer), while one greedy client keeps `greedy_inflight` requests in flight until the polite clients are
done. All requests are alike (`request_sequences` random sequences of `length` tokens); an engine batch holds
two of them (`--max-batch-tokens`), so that the greedy client always has a backlog. Reported per client: its
share of the engine tokens while the polite clients ran (the service's own `tropd_client_engine_tokens_total`,
read before and after), and for the polite clients the median latency of a request. With fair scheduling
each polite request joins the next batch, so a polite client's share is what it asks for; with FCFS it waits
behind the greedy client's backlog.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from services.teacher.launch import serving

POLICIES = ("fcfs", "fair")


@dataclass
class FairShareConfig:
    model: str
    engine: str = "auto"
    clients: tuple[int, ...] = (1, 2, 4)
    length: int = 64
    request_sequences: int = 4
    polite_requests: int = 8
    greedy_inflight: int = 8
    startup_timeout: float = 300.0


def engine_tokens(metrics_text: str) -> dict[str, float]:
    """Engine tokens per client from the service's Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "tropd_client_engine_tokens_total":
                out[sample.labels["client"]] = sample.value
    return out


async def one_round(url: str, config: FairShareConfig, polite: int, body: dict, tag: str) -> dict:
    """N polite clients and one greedy one at once; the greedy client stops when the polite ones are done."""
    latencies: list[float] = []
    done = asyncio.Event()

    async def polite_client(http: httpx.AsyncClient, name: str) -> None:
        for _ in range(config.polite_requests):
            start = time.perf_counter()
            answer = await http.post("/v1/score", json=body, headers={"x-tropd-client": name})
            answer.raise_for_status()
            latencies.append(time.perf_counter() - start)

    async def greedy_worker(http: httpx.AsyncClient) -> None:
        while not done.is_set():
            (await http.post("/v1/score", json=body, headers={"x-tropd-client": f"{tag}-greedy"})).raise_for_status()

    limits = httpx.Limits(max_connections=polite + config.greedy_inflight + 2)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        greedy = [asyncio.create_task(greedy_worker(http)) for _ in range(config.greedy_inflight)]
        await asyncio.sleep(0.5)  # the greedy backlog is there first
        before = engine_tokens((await http.get("/metrics")).text)
        start = time.perf_counter()
        await asyncio.gather(*(polite_client(http, f"{tag}-polite-{i}") for i in range(polite)))
        elapsed = time.perf_counter() - start
        after = engine_tokens((await http.get("/metrics")).text)
        done.set()
        await asyncio.gather(*greedy)
    # tokens are counted when sent to the engine: the difference is what each got while all competed
    tokens = {c: t - before.get(c, 0.0) for c, t in after.items() if c.startswith(tag)}
    total = sum(tokens.values())
    greedy_share = tokens.get(f"{tag}-greedy", 0.0) / total
    polite_shares = [tokens.get(f"{tag}-polite-{i}", 0.0) / total for i in range(polite)]
    return {
        "polite_clients": polite,
        "greedy_share": greedy_share,
        "polite_share_each": statistics.mean(polite_shares),
        "polite_shares": polite_shares,
        "fair_share_each": 1 / (polite + 1),
        "polite_latency_p50_s": statistics.median(latencies),
        "polite_seconds": elapsed,
    }


def run_fair_share(config: FairShareConfig, vocab_size: int, progress=print) -> dict:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab_size, size=(config.request_sequences, config.length)).tolist()
    body = {"sequences": ids, "top_k": 5}
    batch_tokens = 2 * config.request_sequences * config.length  # two requests per engine call
    rows = []
    with tempfile.TemporaryDirectory(prefix="tropd-bench-fair-") as logs:
        for policy in POLICIES:
            progress(f"bench: starting `tropd teacher serve --scheduling {policy}`")
            args = ("--scheduling", policy, "--max-batch-tokens", str(batch_tokens), "--log-level", "warning")
            log = Path(logs) / f"service-{policy}.log"
            env = {**os.environ, "HF_HUB_OFFLINE": "1"}
            with serving(config.model, config.engine, log, *args, env=env, timeout=config.startup_timeout) as svc:
                for n in config.clients:
                    row = {"policy": policy, **asyncio.run(one_round(svc.url, config, n, body, f"n{n}"))}
                    rows.append(row)
                    progress(
                        f"bench: {policy}, {n} polite + 1 greedy: greedy {row['greedy_share']:.0%}, "
                        f"each polite {row['polite_share_each']:.0%}"
                    )
    return {
        "model": config.model,
        "engine": config.engine,
        "length": config.length,
        "request_sequences": config.request_sequences,
        "polite_requests": config.polite_requests,
        "greedy_inflight": config.greedy_inflight,
        "max_batch_tokens": batch_tokens,
        "rounds": rows,
    }


def format_fair_share(report: dict) -> str:
    by = {(r["policy"], r["polite_clients"]): r for r in report["rounds"]}
    lines = [
        f"tropd bench teacher --fair-share: {report['model']} ({report['engine']}), requests of "
        f"{report['request_sequences']} x {report['length']} tokens, a batch holds two; each polite client sends "
        f"{report['polite_requests']} one after another, the greedy one keeps {report['greedy_inflight']} in flight",
        "",
        f"{'polite clients':>14} {'fair share':>10} | {'FCFS: greedy':>12} {'each polite':>11} {'p50 s':>7} | "
        f"{'fair: greedy':>12} {'each polite':>11} {'p50 s':>7}",
    ]
    for n in sorted({r["polite_clients"] for r in report["rounds"]}):
        fcfs, fair = by.get(("fcfs", n)), by.get(("fair", n))
        cells = [
            f"{r['greedy_share']:>12.1%} {r['polite_share_each']:>11.1%} {r['polite_latency_p50_s']:>7.3f}"
            for r in (fcfs, fair)
        ]
        lines.append(f"{n:>14} {1 / (n + 1):>10.1%} | {cells[0]} | {cells[1]}")
    lines.append("(shares of the engine tokens, from the service's tropd_client_engine_tokens_total)")
    return "\n".join(lines)
