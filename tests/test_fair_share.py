"""Fair sharing of the teacher between clients: the fair queue alone, the batcher with a gated engine (which
batch each request lands in, no timing), and the real service's per-client quota (429 + Retry-After) and
per-client metrics over HTTP."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import httpx
import numpy as np
import pytest

from services.teacher import batching
from services.teacher.batching import Batcher, ClientOverQuota
from services.teacher.client import TeacherClient
from services.teacher.engines.types import SamplingSpec, ScoreItem
from services.teacher.fairness import FairQueue
from services.teacher.protocol import ContinueResult, ScoreResult
from tests.helpers import teacher, tropd_here


@dataclass
class Job:
    client: str
    tokens: int
    tag: float = 0.0


def served_order(queue: FairQueue) -> list[str]:
    order = []
    while (job := queue.pop_next()) is not None:
        order.append(job.client)
    return order


def test_a_late_client_is_served_next_however_deep_the_backlog():
    queue = FairQueue("fair")
    for _ in range(50):
        queue.push(Job("greedy", 100))
    assert queue.pop_next().client == "greedy"  # the greedy client is being served...
    queue.push(Job("polite", 100))  # ...when another asks
    assert queue.pop_next().client == "polite"
    fcfs = FairQueue("fcfs")
    for _ in range(50):
        fcfs.push(Job("greedy", 100))
    fcfs.pop_next()
    fcfs.push(Job("polite", 100))
    assert served_order(fcfs).index("polite") == 49  # first come, first served: behind the whole backlog


def test_backlogged_clients_share_tokens_by_weight():
    queue = FairQueue("fair", weights={"a": 2.0})
    for _ in range(300):
        queue.push(Job("a", 10))
        queue.push(Job("b", 10))
        queue.push(Job("c", 30))  # larger requests: the share is of tokens, not of requests
    tokens = {"a": 0, "b": 0, "c": 0}
    for _ in range(200):
        job = queue.pop_next()
        tokens[job.client] += job.tokens
    total = sum(tokens.values())
    shares = {c: t / total for c, t in tokens.items()}
    assert shares["a"] == pytest.approx(0.5, abs=0.02)  # weight 2 of 4
    assert shares["b"] == pytest.approx(0.25, abs=0.02)
    assert shares["c"] == pytest.approx(0.25, abs=0.02)


def test_a_clients_requests_keep_their_order_and_idle_clients_are_forgotten():
    queue = FairQueue("fair")
    jobs = [Job("a", n) for n in (5, 1, 9)]
    for job in jobs:
        queue.push(job)
    assert [queue.pop_next() for _ in range(3)] == jobs
    queue.push(Job("b", 1))
    queue.pop_next()  # V passes a's finish tag
    assert len(queue) == 0 and "a" not in queue._clients  # no state left for an idle client
    with pytest.raises(ValueError, match="fair or fcfs"):
        FairQueue("lifo")


def test_a_job_put_back_after_part_of_it_keeps_its_place_and_its_clients_share():
    """`requeue` (a long sequence between two of its chunks): the job goes on before its client's next one, its tag
    moved on by what was served; while it is held, a client queueing into the empty queue does not begin a new busy
    period, so the held job's client is charged for all of it once, and a newcomer is served before its rest."""
    queue = FairQueue("fair")
    long, after = Job("long", 100), Job("long", 10)
    queue.push(long)
    queue.push(after)
    assert queue.pop_next() is long
    queue.hold()
    queue.requeue(long, served=25)
    queue.release()
    assert (long.tokens, long.tag) == (75, 25.0) and queue.pop_next() is long and queue.pop_next() is after
    held = FairQueue("fair")
    held.push(long := Job("long", 100))
    held.pop_next()
    held.hold()  # the queue is empty while its first chunk runs...
    held.push(small := Job("small", 10))  # ...when another client asks
    held.push(mine := Job("long", 10))  # ...and the same client asks again
    held.requeue(long, served=25)
    held.release()
    assert mine.tag == 100  # after all of the long job, not beside its rest
    assert [held.pop_next() for _ in range(3)] == [small, long, mine]


class GatedEngine:
    """Records every batch; the first engine call waits until `release` is set, so the test can fill the
    queue while the engine is busy."""

    def __init__(self):
        self.batches: list[list[int]] = []
        self.started, self.release = threading.Event(), threading.Event()

    def score(self, items: list[ScoreItem]) -> list[ScoreResult]:
        self.started.set()
        self.release.wait(10)
        self.batches.append([it.ids[0] for it in items])  # the first id names the request
        # the log-probs carry the first id, so that a test sees which result reached which request
        return [ScoreResult(np.full(len(it.ids) - it.start, it.ids[0], np.float32), np.zeros((0, 0)), np.zeros((0, 0)))
                for it in items]  # fmt: skip


def batches_when_greedy_floods(policy: str) -> tuple[list[list[int]], int]:
    """Greedy requests 0..19 queued while request 0 runs, then polite request 100: the batches the engine saw
    and the index of the batch that served the polite request. Two requests fit in a batch."""
    engine = GatedEngine()

    async def go():
        batcher = Batcher(engine, max_batch_tokens=8, window_ms=0, policy=policy)
        request = lambda first, client: batcher.score([ScoreItem([first, 1, 1, 1], 1, 0)], client)  # noqa: E731
        first = asyncio.ensure_future(request(0, "greedy"))
        await asyncio.to_thread(engine.started.wait, 10)
        rest = [asyncio.ensure_future(request(i, "greedy")) for i in range(1, 20)]
        await asyncio.sleep(0.05)  # all of the greedy client's requests are queued before the polite one
        polite = asyncio.ensure_future(request(100, "polite"))
        await asyncio.sleep(0.05)
        engine.release.set()
        await asyncio.gather(first, polite, *rest)
        batcher.close()

    asyncio.run(go())
    return engine.batches, next(i for i, b in enumerate(engine.batches) if 100 in b)


def test_a_greedy_client_cannot_delay_another_clients_request_past_one_batch():
    batches, polite_batch = batches_when_greedy_floods("fair")
    assert batches[0] == [0]  # the batch running when the polite request arrived
    assert polite_batch == 1, batches  # the very next batch
    assert sorted(i for b in batches for i in b) == [*range(20), 100]  # everyone served, once
    batches, polite_batch = batches_when_greedy_floods("fcfs")
    assert polite_batch == 10, batches  # behind the 19 queued greedy requests, two per batch


def scored_while_gated(engine, first, *others, max_batch_tokens: int = 16) -> list:
    """Score `first` (sequences, client) on a batcher over a gated `engine`; while its first engine call waits, queue
    `others`; then let the engine go. The results in order (an exception where a request failed)."""

    async def go():
        batcher = Batcher(engine, max_batch_tokens=max_batch_tokens, min_shared_batch_tokens=8, window_ms=0)
        runs = [asyncio.ensure_future(batcher.score(*first))]
        await asyncio.to_thread(engine.started.wait, 10)
        runs += [asyncio.ensure_future(batcher.score(*request)) for request in others]
        await asyncio.sleep(0.05)
        engine.release.set()
        results = await asyncio.gather(*runs, return_exceptions=True)
        batcher.close()
        return results

    return asyncio.run(go())


def test_a_large_request_is_split_by_sequence_and_a_small_one_passes_it(monkeypatch):
    """Sequence granularity: a client's 16-sequence request queued alone fills whole batches; another client's
    2-sequence request, arriving while the first batch runs, is served in the next two batches, which hold its
    8 tokens' worth each (the smaller request's size) and take the two clients' sequences in turn, long before
    the large request's last sequence; every request gets its own sequences' results, in order. While the small
    client, just answered, has not sent its next request, the large one's batches hold only its half of the
    shared 8 tokens, so that the small one's next request would wait for at most that."""
    monkeypatch.setattr(batching, "ACTIVE_S", 30.0)  # the small client stays a competitor for the whole test
    engine = GatedEngine()
    big = ([ScoreItem([i, 1, 1, 1], 1, 0) for i in range(16)], "big")
    big, small = scored_while_gated(engine, big, ([ScoreItem([100 + i, 1, 1, 1], 1, 0) for i in range(2)], "sm"))
    batches = engine.batches
    assert batches[0] == [0, 1, 2, 3]  # alone: a whole batch of 16 tokens
    where = {i: b for b, batch in enumerate(batches) for i in batch}
    assert (where[100], where[101]) == (1, 2) and where[15] > 2, batches
    assert [sorted(b) for b in batches[1:3]] == [[4, 100], [5, 101]], batches  # 8 tokens a batch, in turn
    assert batches[3:] == [[i] for i in range(6, 16)], batches  # the small client away: its half of 8 tokens
    assert sorted(where) == [*range(16), 100, 101]  # every sequence scored once
    assert [r.logprobs.tolist() for r in big] == [[i] * 3 for i in range(16)]
    assert [r.logprobs.tolist() for r in small] == [[100 + i] * 3 for i in range(2)]


class GatedChunker(GatedEngine):
    """A GatedEngine that also scores chunks (`score_chunk`); a chunk is recorded as ("chunk", begin, end). Its cache
    counts the positions run; a score is the scored token's own id."""

    def score(self, items: list[ScoreItem]) -> list[ScoreResult]:
        if any(it.ids[0] == 666 for it in items):
            self.batches.append([666])
            raise ValueError("a sequence this engine refuses")
        return super().score(items)

    def score_chunk(self, item: ScoreItem, begin: int, end: int, cache=None):
        self.started.set()
        self.release.wait(10)
        assert (cache or 0) == begin  # the cache of every position before the chunk came back
        self.batches.append(("chunk", item.ids[0], begin, end) if item.ids[0] != 1000 else ("chunk", begin, end))
        scored = np.array(item.ids[max(begin + 1, item.start) : end + 1], np.float32)
        return end, ScoreResult(scored, np.zeros((len(scored), 0)), np.zeros((len(scored), 0)))


def test_a_long_sequence_is_scored_in_chunks_and_other_clients_pass_between_them(monkeypatch):
    """An engine that scores chunks: a 64-token sequence longer than the batch budget is scored a chunk at a time
    (the cache of one chunk handed to the next), and another client's 2-sequence request, arriving while the first
    chunk runs, is served right after it, not after the whole sequence; the joined scores are the sequence's whole.
    A sequence that fits the budget is scored whole."""
    monkeypatch.setattr(batching, "MIN_CHUNK_TOKENS", 4)
    monkeypatch.setattr(batching, "ACTIVE_S", 30.0)  # the small client stays a competitor for the whole test
    engine = GatedChunker()
    long_ids = list(range(1000, 1064))
    long = ([ScoreItem(long_ids, 10, 0), ScoreItem([7, 1, 1], 1, 0)], "long")
    small = ([ScoreItem([100 + i, 1, 1, 1], 1, 0) for i in range(2)], "sm")
    (long, short), small = scored_while_gated(engine, long, small, max_batch_tokens=32)
    batches = engine.batches
    assert batches[0] == ("chunk", 0, 32) and batches[1] == [100, 101], batches  # alone: a chunk of max_batch_tokens
    chunks = [b for b in batches if b[0] == "chunk"]
    assert [c[1] for c in chunks[1:]] == [c[2] for c in chunks[:-1]] and chunks[-1][2] == 64, batches  # contiguous
    assert len(chunks) > 2 and all(c[2] - c[1] <= 8 for c in chunks[1:]), batches  # shared: chunks of the budget
    assert batches.index([7]) > batches.index(chunks[-1])  # the request's next sequence after the long one
    assert long.logprobs.tolist() == long_ids[10:]  # the chunks' scores joined: the whole sequence's
    assert short.logprobs.tolist() == [7, 7] and [r.logprobs.tolist() for r in small] == [[100] * 3, [101] * 3]


def test_one_sequence_at_a_time_is_scored_in_chunks_and_a_failed_requests_chunks_stop(monkeypatch):
    """While one client's sequence is scored in chunks (its keys and values held between them), another client's
    long sequence is scored whole, so the batcher holds one sequence's cache at most; and a request answered with an
    error (another of its sequences failed) has its long sequence's chunks stop after the one running."""
    monkeypatch.setattr(batching, "MIN_CHUNK_TOKENS", 4)
    monkeypatch.setattr(batching, "ACTIVE_S", 30.0)
    engine = GatedChunker()
    long_a, long_b = ScoreItem([2000 + i for i in range(64)], 1, 0), ScoreItem([3000 + i for i in range(40)], 1, 0)
    (a,), (b,) = scored_while_gated(engine, ([long_a], "a"), ([long_b], "b"))
    assert engine.batches[:2] == [("chunk", 2000, 0, 16), [3000]], engine.batches  # b's whole, between a's chunks
    assert {x[1] for x in engine.batches if x[0] == "chunk"} == {2000}, engine.batches  # b's never in chunks
    assert a.logprobs.tolist() == list(range(2001, 2064)) and b.logprobs.tolist() == [3000] * 39

    engine = GatedChunker()
    failing = [ScoreItem([666, 1, 1, 1], 1, 0), ScoreItem([4000 + i for i in range(64)], 1, 0)]
    small = ([ScoreItem([5, 1, 1, 1], 1, 0)], "other")  # a competitor just answered: the budget is shared
    other, c = scored_while_gated(engine, small, (failing, "c"))
    assert isinstance(c, ValueError) and [666] in engine.batches and other[0].logprobs.tolist() == [5] * 3
    chunks = [x for x in engine.batches if x[0] == "chunk"]
    assert len(chunks) == 1 and chunks[0][:3] == ("chunk", 4000, 0), engine.batches  # the one running, then none


class GatedDrafter(GatedEngine):
    """A GatedEngine that also drafts: each draft is its prefix's first id (which names the request), once; the batch
    is recorded with the seed of its sampling spec."""

    def __init__(self, invariant: bool):
        super().__init__()
        self.batch_invariant_drafts = invariant
        self.specs: list[int | None] = []

    def generate(self, prefixes: list[list[int]], spec: SamplingSpec) -> list[ContinueResult]:
        self.started.set()
        self.release.wait(10)
        self.batches.append([p[0] for p in prefixes])
        self.specs.append(spec.seed)
        empty = np.zeros((1, 0), np.float32)
        return [ContinueResult(np.array([p[0]]), np.zeros(1, np.float32), empty.astype(np.int32), empty, "length")
                for p in prefixes]  # fmt: skip


@pytest.mark.parametrize("invariant", [True, False])
def test_a_continuation_request_is_split_by_prefix_where_drafts_do_not_depend_on_their_batch(invariant):
    """An engine whose drafts do not depend on their batch (vLLM: a generator per sequence): a client's 8-prefix
    continuation request is split by prefix like a scoring request, and another client's 2-prefix request of the
    same sampling settings, arriving while the first batch runs, shares the next batches with it in turn; a request
    of other settings never shares an engine call with them. An engine whose drafts do (transformers: one generator
    per call): every request runs alone, whole, so that a seed keeps giving the same drafts."""
    engine = GatedDrafter(invariant)

    async def go():
        batcher = Batcher(engine, max_batch_tokens=16, min_shared_batch_tokens=8, window_ms=0)
        spec, other = SamplingSpec(max_tokens=2, seed=7), SamplingSpec(max_tokens=2, seed=8)
        big = asyncio.ensure_future(batcher.generate([[i, 1] for i in range(8)], spec, "big"))
        await asyncio.to_thread(engine.started.wait, 10)
        small = asyncio.ensure_future(batcher.generate([[100 + i, 1] for i in range(2)], spec, "small"))
        odd = asyncio.ensure_future(batcher.generate([[200, 1]], other, "odd"))
        await asyncio.sleep(0.05)
        engine.release.set()
        results = await asyncio.gather(big, small, odd)
        batcher.close()
        return results

    big, small, odd = asyncio.run(go())
    assert [int(r.token_ids[0]) for r in big] == list(range(8))  # each request its own drafts, in order
    assert [int(r.token_ids[0]) for r in small] == [100, 101] and int(odd[0].token_ids[0]) == 200
    batches = engine.batches
    for batch, seed in zip(batches, engine.specs, strict=True):  # one sampling spec a call
        assert all((i == 200) == (seed == 8) for i in batch), (batches, engine.specs)
    if not invariant:
        assert sorted(map(sorted, batches)) == [[0, 1, 2, 3, 4, 5, 6, 7], [100, 101], [200]], batches
        return
    assert batches[0] == [0, 1, 2, 3]  # alone: a whole batch of 16 tokens (4 tokens a prefix)
    where = {i: b for b, batch in enumerate(batches) for i in batch}
    assert where[100] < where[7] and where[101] < where[7], batches  # the small request passes the big one's tail
    assert sorted(where) == [*range(8), 100, 101, 200]  # every prefix drafted once


def test_per_client_quota_refuses_only_that_client():
    engine = GatedEngine()

    async def go():
        batcher = Batcher(engine, max_batch_tokens=64, window_ms=0, max_client_inflight_tokens=8)
        item = [ScoreItem([1, 2, 3, 4], 1, 0)]
        first = asyncio.ensure_future(batcher.score(item, "a"))
        await asyncio.to_thread(engine.started.wait, 10)
        second = asyncio.ensure_future(batcher.score(item, "a"))  # 8 tokens in flight for a: at the quota
        await asyncio.sleep(0.01)
        with pytest.raises(ClientOverQuota, match="'a' has 8 tokens in flight at most") as refused:
            await batcher.score(item, "a")
        other = asyncio.ensure_future(batcher.score(item * 2, "b"))  # b has its own quota
        await asyncio.sleep(0.01)
        engine.release.set()
        results = await asyncio.gather(first, second, other)
        assert [len(r) for r in results] == [1, 1, 2]
        again = await batcher.score(item, "a")  # a's tokens came back
        batcher.close()
        return refused.value.retry_after, again

    retry_after, again = asyncio.run(go())
    assert retry_after >= 1 and len(again) == 1


# ---- the real service over HTTP ------------------------------------------------------------------------

QUOTA_ARGS = ["--max-request-tokens", "64", "--max-client-inflight-tokens", "64", "--batch-window-ms", "400"]


def test_service_quota_answers_429_and_metrics_show_each_client(toy_quick, tmp_path):
    """With a 400 ms batch window a request stays in flight that long: a second request of the same client
    inside the window is over its 64-token quota (429 + Retry-After), another client's joins the batch; the
    project's client retries its 429s and gets every answer; /metrics has queue depth, tokens and waits per
    client."""
    body = {"sequences": [[1] + [5] * 59], "top_k": 2}
    with teacher(toy_quick / "teacher", "hf", tmp_path, *QUOTA_ARGS, env={"OMP_NUM_THREADS": "1"}) as svc:

        async def burst():
            async with httpx.AsyncClient(base_url=svc.url, timeout=30) as http:

                def post(client):
                    return http.post("/v1/score", json=body, headers={"x-tropd-client": client})

                first = asyncio.ensure_future(post("trainer-a"))
                await asyncio.sleep(0.1)  # inside the first request's batch window
                later = await asyncio.gather(post("trainer-a"), post("trainer-b"))
                return [await first, *later]

        first, refused, other = asyncio.run(burst())
        assert first.status_code == 200 and other.status_code == 200
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["type"] == "client_over_quota"
        assert float(refused.headers["retry-after"]) >= 1

        async def with_retries():
            async with TeacherClient(svc.url, client_id="trainer-c", backoff=0.05) as client:
                results = await asyncio.gather(*(client.score(body["sequences"], 1, 2) for _ in range(3)))
                return results, client.retried

        results, retried = asyncio.run(with_retries())
        assert len(results) == 3 and retried >= 2  # three requests, one quota: two waited their turn
        metrics = httpx.get(f"{svc.url}/metrics").text
        assert 'tropd_errors_total{kind="client_over_quota"}' in metrics
        for client in ("trainer-a", "trainer-b", "trainer-c"):
            assert f'tropd_client_engine_tokens_total{{client="{client}"}}' in metrics
            assert f'tropd_client_queue_wait_seconds_count{{client="{client}"}}' in metrics
            assert f'tropd_client_queue_depth{{client="{client}"}} 0.0' in metrics
        assert (
            'tropd_client_engine_tokens_total{client="trainer-a"} 60.0' in metrics
        )  # the refused one never reached it
        limits = httpx.get(f"{svc.url}/v1/info").json()["limits"]
        assert limits["max_client_inflight_tokens"] == 64


def test_bench_fair_share_reports_each_clients_share(toy_quick):
    """`tropd bench teacher --fair-share` (quick, one polite client): a row per policy, shares that add up;
    the numbers themselves are a measurement, not asserted."""
    import json
    import subprocess
    import sys

    command = [sys.executable, "-m", "tropd", "bench", "teacher", "--fair-share", "--engine", "hf", "--quick"]
    command += ["--model", str(toy_quick / "teacher"), "--clients", "1", "--json"]
    command += ["--length", "16", "--request-sequences", "2"]  # small requests: half the time of the defaults (4 x 64)
    result = subprocess.run(command, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert [(r["policy"], r["polite_clients"]) for r in report["rounds"]] == [("fcfs", 1), ("fair", 1)]
    for row in report["rounds"]:
        assert row["greedy_share"] + sum(row["polite_shares"]) == pytest.approx(1.0)
        assert row["polite_latency_p50_s"] > 0 and row["fair_share_each"] == 0.5
    # the mixed-size case: one client's requests 8 x the others' (16 x 16 tokens beside 2 x 16), per policy
    assert [row["policy"] for row in report["mixed"]] == ["fcfs", "fair"]
    for row in report["mixed"]:
        assert (row["small_request_tokens"], row["large_request_tokens"], row["small_clients"]) == (32, 256, 3)
        for key in ("latency_over_alone", "min_fair_share", "aggregate_over_alone", "latency_floor_over_alone"):
            assert row[key] > 0, key
        assert row["service_cpu_per_large_request_s"] > 0 and row["service_cpu_per_small_request_s"] > 0
        assert row["aggregate_tokens_per_s"] == pytest.approx(
            row["large_tokens_per_s"] + sum(row["small_tokens_per_s"])
        )


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--client-weight", "eval"], "expected CLIENT=W"),
        (["--client-weight", "eval=-1"], "expected CLIENT=W"),
        (["--client-weight", "eval=nan"], "expected CLIENT=W"),
        (["--scheduling", "lifo"], "invalid choice"),
        (["--max-client-inflight-tokens", "0"], "positive integer"),
    ],
)
def test_bad_fairness_options_are_one_line_errors(toy_quick, args, needle):
    result = tropd_here("teacher", "serve", "--model", str(toy_quick / "teacher"), *args)
    assert result.returncode == 2 and needle in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
