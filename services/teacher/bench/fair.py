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

The mixed-size case (`mixed`): for each policy a service with its default batching; one large client whose
requests are `mixed_ratio` times a small one's, and `mixed_small_clients` small clients, each with one request in
flight, the large one until the small ones have sent `polite_requests` each; before that each kind alone. Reported:
the small clients' p50 latency against alone (`latency_over_alone`), the least small client's engine tokens/s
over its max-min fair allocation, min(what it takes alone, an equal share of the aggregate) (`min_fair_share`),
and the aggregate tokens/s over the faster client alone (`aggregate_over_alone`). And from the service's own CPU
seconds (`process_cpu_seconds_total`) per request alone, the least a small request can take under max-min fairness
on these cores, over its time alone (`latency_floor_over_alone`): a round in which each client gets one small
request's worth of tokens needs that CPU whatever the order, so an engine that is already CPU-bound alone cannot
serve a small request faster than that beside three others.
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
from tropd.machine import usable_cores

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
    mixed_length: int = 256
    mixed_sequences: int = 8  # a small client's request in the mixed-size case
    mixed_ratio: int = 8  # the large client's request, in sequences, over a small one's
    mixed_small_clients: int = 3


def engine_tokens(metrics_text: str) -> dict[str, float]:
    """Engine tokens per client from the service's Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "tropd_client_engine_tokens_total":
                out[sample.labels["client"]] = sample.value
    return out


def service_cpu(metrics_text: str) -> float | None:
    """The service process's CPU seconds so far (`process_cpu_seconds_total`; None where the OS does not say)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "process_cpu_seconds_total":
                return sample.value
    return None


async def _cpu_per_request(http: httpx.AsyncClient, body: dict, name: str, requests: int):
    """Run `requests` requests one after another: (their latencies, their speed in tokens/s, the service's CPU
    seconds per request or None)."""
    before, start = service_cpu((await http.get("/metrics")).text), time.perf_counter()
    latencies = await _one_client(http, body, name, requests)
    speed = sum(map(len, body["sequences"])) * requests / (time.perf_counter() - start)
    after = service_cpu((await http.get("/metrics")).text)
    return latencies, speed, None if before is None or after is None else (after - before) / requests


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


async def _one_client(http: httpx.AsyncClient, body: dict, name: str, requests: int | None, stop=None) -> list[float]:
    """Requests one after another (`requests` of them, or until `stop` is set): their latencies."""
    latencies = []
    while (len(latencies) < requests) if requests is not None else not stop.is_set():
        start = time.perf_counter()
        (await http.post("/v1/score", json=body, headers={"x-tropd-client": name})).raise_for_status()
        latencies.append(time.perf_counter() - start)
    return latencies


async def mixed_round(url: str, config: FairShareConfig, small: dict, large: dict, tag: str) -> dict:
    """Each kind of client alone, then the large one beside the small ones (see the module docstring)."""
    n, requests = config.mixed_small_clients, config.polite_requests
    small_tokens, large_tokens = sum(map(len, small["sequences"])), sum(map(len, large["sequences"]))
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=n + 3)) as http:
        await _one_client(http, large, f"{tag}-warmup", 1)  # the engine's first calls at these shapes are slower:
        await _one_client(http, small, f"{tag}-warmup", 4)  # not in the times alone
        # the denominators of every ratio: twice the requests of a small client's run beside the others, steadier
        alone_small, alone_large = 2 * requests, 2 * max(2, requests // config.mixed_ratio)
        small_alone, small_alone_speed, small_cpu = await _cpu_per_request(
            http, small, f"{tag}-small-alone", alone_small
        )
        _, large_alone_speed, large_cpu = await _cpu_per_request(http, large, f"{tag}-large-alone", alone_large)
        stop = asyncio.Event()
        large_task = asyncio.create_task(_one_client(http, large, f"{tag}-large", None, stop))
        await asyncio.sleep(0.2)  # the large client's first request is in the engine
        before = engine_tokens((await http.get("/metrics")).text)
        start = time.perf_counter()
        latencies = await asyncio.gather(*(_one_client(http, small, f"{tag}-small-{i}", requests) for i in range(n)))
        elapsed = time.perf_counter() - start
        after = engine_tokens((await http.get("/metrics")).text)
        stop.set()
        await large_task
    got = {c: (t - before.get(c, 0.0)) / elapsed for c, t in after.items() if c.startswith(tag)}
    aggregate = got.get(f"{tag}-large", 0.0) + sum(got.get(f"{tag}-small-{i}", 0.0) for i in range(n))
    fair = min(small_alone_speed, aggregate / (n + 1))  # max-min: all it asks for, up to an equal share
    small_speeds = [got.get(f"{tag}-small-{i}", 0.0) for i in range(n)]
    p50, p50_alone = statistics.median([x for lat in latencies for x in lat]), statistics.median(small_alone)
    # the least a small request can take beside the others under max-min fairness, whatever the order: a round in
    # which each client gets one small request's worth of tokens costs the service that much CPU, on these cores
    floor = None
    if small_cpu is not None and large_cpu is not None:
        round_cpu = n * small_cpu + large_cpu * small_tokens / large_tokens
        floor = round_cpu / usable_cores() / statistics.mean(small_alone)
    return {
        "small_clients": n,
        "small_request_tokens": small_tokens,
        "large_request_tokens": large_tokens,
        "small_latency_p50_s": p50,
        "small_alone_latency_p50_s": p50_alone,
        "latency_over_alone": p50 / p50_alone,
        "small_tokens_per_s": small_speeds,
        "small_alone_tokens_per_s": small_alone_speed,
        "large_tokens_per_s": got.get(f"{tag}-large", 0.0),
        "large_alone_tokens_per_s": large_alone_speed,
        "min_fair_share": min(s / fair for s in small_speeds),
        "aggregate_tokens_per_s": aggregate,
        "aggregate_over_alone": aggregate / max(small_alone_speed, large_alone_speed),
        "service_cpu_per_small_request_s": small_cpu,
        "service_cpu_per_large_request_s": large_cpu,
        "latency_floor_over_alone": floor,
    }


def run_fair_share(config: FairShareConfig, vocab_size: int, progress=print) -> dict:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab_size, size=(config.request_sequences, config.length)).tolist()
    body = {"sequences": ids, "top_k": 5}
    batch_tokens = 2 * config.request_sequences * config.length  # two requests per engine call
    ids = rng.integers(0, vocab_size, size=(config.mixed_sequences * config.mixed_ratio, config.mixed_length)).tolist()
    small, large = {"sequences": ids[: config.mixed_sequences], "top_k": 5}, {"sequences": ids, "top_k": 5}
    rows, mixed = [], []
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
            progress(f"bench: mixed sizes, `tropd teacher serve --scheduling {policy}` with its default batching")
            args = ("--scheduling", policy, "--log-level", "warning")
            log = Path(logs) / f"service-{policy}-mixed.log"
            with serving(config.model, config.engine, log, *args, env=env, timeout=config.startup_timeout) as svc:
                row = {"policy": policy, **asyncio.run(mixed_round(svc.url, config, small, large, f"m-{policy}"))}
            mixed.append(row)
            progress(
                f"bench: {policy}, mixed sizes: small p50 {row['latency_over_alone']:.2f} x alone, min fair share "
                f"{row['min_fair_share']:.2f}, aggregate {row['aggregate_over_alone']:.2f} x alone"
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
        "mixed": mixed,
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
    for row in report.get("mixed", []):
        lines.append(
            f"mixed sizes, {row['policy']}: one client of {row['large_request_tokens']}-token requests beside "
            f"{row['small_clients']} of {row['small_request_tokens']}, one in flight each: small p50 "
            f"{row['small_latency_p50_s']:.3f} s = {row['latency_over_alone']:.2f} x alone (target <= 3), min fair "
            f"share {row['min_fair_share']:.2f} (target >= 0.8), aggregate {row['aggregate_over_alone']:.2f} x the "
            "faster client alone (target >= 0.9)"
        )
        if row.get("latency_floor_over_alone") is not None:
            lines.append(
                f"  the service's CPU per small request alone {row['service_cpu_per_small_request_s'] * 1000:.0f} ms, "
                f"on {usable_cores()} cores: a fair round of turns takes at least "
                f"{row['latency_floor_over_alone']:.2f} x a small request alone"
            )
    return "\n".join(lines)


# ---- contention inside `tropd bench teacher`: one greedy client among N, and the aggregate throughput ----

GREEDY_SIZE = 4  # a greedy request is this many steady requests' sequences


def steady_depth(max_batch_tokens: int, clients: int, request_tokens: int) -> int:
    """Requests a steady client keeps in flight: its share of one engine batch, ceil(B / (N x tokens)), twice
    (one batch running, the next queued while the answers of the last travel back) plus one, so that what it
    asks for is at least its fair share 1/N."""
    return 2 * -(-max_batch_tokens // (clients * request_tokens)) + 1


async def contention_round(url: str, clients: int, steady: dict, greedy: dict, depth: int, seconds: float) -> dict:
    """`clients` clients at once for `seconds`: one steady client alone when `clients` is 1, else one greedy
    client (requests `GREEDY_SIZE` x bigger, 2 x depth in flight, no pause) and clients - 1 steady ones (depth
    in flight each). Shares and the aggregate come from the service's engine-token counter over a window
    that opens and closes when an engine batch is sent (so it holds whole batches) and lasts at least
    `seconds` and 3 batches:

        share_c = tokens_c / sum tokens        fair_c = share_c x N        aggregate = sum tokens / seconds
    """
    tag, stop = f"c{clients}", asyncio.Event()
    names = [f"{tag}-steady-{i}" for i in range(max(clients - 1, 1))]

    async def worker(http: httpx.AsyncClient, name: str, body: dict) -> None:
        while not stop.is_set():
            (await http.post("/v1/score", json=body, headers={"x-tropd-client": name})).raise_for_status()

    jobs = [(name, steady) for name in names for _ in range(depth)]
    if clients > 1:
        jobs += [(f"{tag}-greedy", greedy)] * (2 * depth)
    limits = httpx.Limits(max_connections=len(jobs) + 2)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        tasks = [asyncio.create_task(worker(http, name, body)) for name, body in jobs]
        await asyncio.sleep(min(1.0, seconds / 4))  # every queue is backlogged before the window opens
        before, start = await _batch_sent(http, tag, await _counts(http, tag))
        after, batches = before, 0
        while True:
            after, end = await _batch_sent(http, tag, after)
            batches += 1
            if end - start >= seconds and batches >= 3:
                break
        elapsed = end - start
        stop.set()
        await asyncio.gather(*tasks)
    tokens = {c: t - before.get(c, 0.0) for c, t in after.items()}
    total = sum(tokens.values())
    shares = [tokens.get(name, 0.0) / total for name in names]
    return {
        "clients": clients,
        "steady_depth": depth,
        "aggregate_tokens_per_s": total / elapsed,
        "greedy_share": tokens.get(f"{tag}-greedy", 0.0) / total if clients > 1 else None,
        "steady_shares": shares,
        "steady_fair_share": [s * clients for s in shares] if clients > 1 else None,
    }


async def _counts(http: httpx.AsyncClient, tag: str) -> dict[str, float]:
    return {c: t for c, t in engine_tokens((await http.get("/metrics")).text).items() if c.startswith(f"{tag}-")}


async def _batch_sent(http: httpx.AsyncClient, tag: str, last: dict) -> tuple[dict[str, float], float]:
    """The counts, and the time, once they differ from `last`: an engine batch has just been sent."""
    while (now := await _counts(http, tag)) == last:
        await asyncio.sleep(0.05)
    return now, time.perf_counter()


def run_contention(url: str, requests: list, clients: tuple[int, ...], top_k: int, max_batch_tokens: int,
                   seconds: float, progress=print) -> dict:  # fmt: skip
    """A round for each number of clients (1 is always measured: the reference), against a running service:
    `min_fair_share` (the least steady client's share over 1/N, over every N > 1) and
    `aggregate_over_single` (aggregate tokens/s with the most clients over one client alone)."""
    steady = {"sequences": requests[0], "top_k": top_k}
    greedy = {"sequences": [seq for r in requests[:GREEDY_SIZE] for seq in r], "top_k": top_k}
    request_tokens = sum(map(len, steady["sequences"]))
    rows = []
    for n in sorted({1, *clients}):
        depth = steady_depth(max_batch_tokens, n, request_tokens)
        row = asyncio.run(contention_round(url, n, steady, greedy, depth, seconds))
        rows.append(row)
        fair = ", ".join(f"{f:.2f}" for f in row["steady_fair_share"] or [])
        progress(f"bench: contention, {n} client(s): {row['aggregate_tokens_per_s']:,.0f} tok/s; steady x N: {fair}")
    fairs = [f for r in rows if r["clients"] > 1 for f in r["steady_fair_share"]]
    return {
        "rounds": rows,
        "seconds": seconds,
        "min_fair_share": min(fairs) if fairs else None,
        "aggregate_over_single": rows[-1]["aggregate_tokens_per_s"] / rows[0]["aggregate_tokens_per_s"],
    }
