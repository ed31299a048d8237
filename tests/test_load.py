"""Load: 8 concurrent clients, 1,000 requests of random sizes against one real service (transformers engine).

Every response is checked against an independent transformers forward pass; there must be no error at
all (the clients do not retry). Latency percentiles and throughput are printed, and written as JSON to
the path in $TROPD_LOAD_REPORT when it is set. The server's resident memory is sampled from /proc over
the run and must not keep growing.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from services.teacher.client import TeacherClient
from tests.helpers import teacher
from trainer.toy import tasks
from trainer.toy.tokenizer import VOCAB

pytestmark = pytest.mark.reliability

CLIENTS = 8
REQUESTS_PER_CLIENT = 125  # 1,000 requests: about 13 s of load on 2 quiet cores (2,000 took twice as long)
MAX_TOP_K = 20
# one torch thread in the server: on 2 shared cores, OpenMP threads that spin against other processes slow
# every forward pass by an order of magnitude
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def pool(n: int = 48, seed: int = 0) -> list[list[int]]:
    """Task sequences of the toy world and random token strings, 2 to 160 tokens long."""
    rng = random.Random(seed)
    out = []
    for i in range(n // 2):
        ex = tasks.examples(list(tasks.TASKS)[i % 3], "eval", n, seed)[i]
        out.append(VOCAB.prompt_ids(ex.prompt) + VOCAB.encode(ex.teacher) + [VOCAB.eos_id])
    for _ in range(n - len(out)):
        out.append([VOCAB.bos_id] + [rng.randrange(VOCAB.size) for _ in range(rng.randint(1, 159))])
    return out


def reference_logprobs(model_dir: Path, seqs: list[list[int]]) -> list[np.ndarray]:
    """log_softmax rows (float64) of an independent float32 transformers forward pass, one sequence at a time;
    row j is the distribution of token j+1. The model is causal, so any prefix of a sequence shares rows."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [torch.log_softmax(model(torch.tensor([s])).logits[0].double(), -1).numpy() for s in seqs]


class RssSampler(threading.Thread):
    """Resident set size of a process, from /proc/<pid>/status, every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.interval, self.samples_mib = pid, interval, []
        self.stopped = threading.Event()

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def run(self) -> None:
        while not self.stopped.is_set():
            self.samples_mib.append(self.rss_mib())
            self.stopped.wait(self.interval)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs /proc to sample the server's memory")
@pytest.mark.timeout(900)  # about 25 s on 2 quiet cores, minutes when other work shares them
def test_load_8_clients_1000_requests(toy_quick, tmp_path):
    seqs = pool()
    ref = reference_logprobs(toy_quick / "teacher", seqs)

    def check(picks, starts, k, results) -> None:
        assert len(results) == len(picks)
        for (i, length), s, r in zip(picks, starts, results, strict=True):
            rows = ref[i][s - 1 : length - 1]
            want = rows[np.arange(len(rows)), seqs[i][s:length]]
            np.testing.assert_allclose(r.logprobs, want, atol=1e-4, rtol=1e-4)
            assert r.top_ids.shape == r.top_logprobs.shape == (length - s, k)
            if k:
                top = -np.sort(-rows, axis=1)[:, :k]
                np.testing.assert_allclose(r.top_logprobs, top, atol=1e-4, rtol=1e-4)
                # ids checked through their log-probs, so that near-ties at the k-th place cannot fail the test
                np.testing.assert_allclose(np.take_along_axis(rows, r.top_ids, 1), r.top_logprobs, atol=1e-4, rtol=1e-4)

    async def client(url: str, c: int, latencies: list[float]) -> tuple[int, int]:
        rng = random.Random(100 + c)
        n_seqs = n_tokens = 0
        async with TeacherClient(url, retries=0, binary=c % 2 == 0, client_id=f"load-{c}") as t:
            for _ in range(REQUESTS_PER_CLIENT):
                picks = []
                for _ in range(rng.randint(1, 6)):
                    i = rng.randrange(len(seqs))
                    picks.append((i, rng.randint(2, len(seqs[i]))))  # a random-length prefix of a pool sequence
                starts = [rng.randint(1, length - 1) for _, length in picks]
                k = rng.choice([0, 1, 5, MAX_TOP_K])
                start = time.perf_counter()
                results = await t.score([seqs[i][:length] for i, length in picks], starts, k)
                latencies.append(time.perf_counter() - start)
                check(picks, starts, k, results)
                n_seqs += len(picks)
                n_tokens += sum(length - s for (_, length), s in zip(picks, starts, strict=True))
        return n_seqs, n_tokens

    async def run_clients(url: str) -> tuple[list[float], int, int, float]:
        latencies: list[float] = []
        start = time.perf_counter()
        counts = await asyncio.gather(*(client(url, c, latencies) for c in range(CLIENTS)))
        return latencies, sum(n for n, _ in counts), sum(t for _, t in counts), time.perf_counter() - start

    with teacher(toy_quick / "teacher", "hf", tmp_path, env=ONE_THREAD) as service:
        sampler = RssSampler(service.process.pid)
        sampler.start()
        try:
            latencies, n_seqs, n_tokens, wall = asyncio.run(run_clients(service.url))
        finally:
            sampler.stopped.set()
            sampler.join()
        metrics = httpx.get(f"{service.url}/metrics").text
    assert service.process.returncode == 0, service.log()[-3000:]

    requests = len(latencies)
    assert requests == CLIENTS * REQUESTS_PER_CLIENT >= 1000
    rss = sampler.samples_mib
    q = len(rss) // 4
    assert q >= 5, f"too few RSS samples: {len(rss)}"
    second, last = float(np.mean(rss[q : 2 * q])), float(np.mean(rss[3 * q :]))
    report = {
        "clients": CLIENTS,
        "requests": requests,
        "errors": 0,
        "sequences": n_seqs,
        "scored_tokens": n_tokens,
        "wall_s": round(wall, 2),
        "requests_per_s": round(requests / wall, 1),
        "tokens_per_s": round(n_tokens / wall, 1),
        "latency_ms": {
            "p50": round(1000 * float(np.percentile(latencies, 50)), 2),
            "p99": round(1000 * float(np.percentile(latencies, 99)), 2),
            "max": round(1000 * max(latencies), 2),
        },
        "server_rss_mib": {
            "first": round(rss[0], 1),
            "second_quarter_mean": round(second, 1),
            "last_quarter_mean": round(last, 1),
            "max": round(max(rss), 1),
            "samples": len(rss),
        },
    }
    print("\nload report:", json.dumps(report, indent=2))
    if os.environ.get("TROPD_LOAD_REPORT"):
        Path(os.environ["TROPD_LOAD_REPORT"]).write_text(json.dumps(report, indent=2) + "\n")
    counted = [line for line in metrics.splitlines() if line.startswith("tropd_requests_total{")]
    assert counted == [
        'tropd_requests_total{route="/readyz",status="200"} 1.0',
        f'tropd_requests_total{{route="/v1/score",status="200"}} {float(requests)}',
    ], counted
    assert "tropd_errors_total{" not in metrics  # no error of any kind was counted
    # no steady growth: the last quarter of the run holds no more than the second, within 5% + 24 MiB of noise
    assert last <= 1.05 * second + 24, report["server_rss_mib"]
