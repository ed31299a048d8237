"""`tropd bench teacher`: its options, and a real (quick) run over every path on the quick toy teacher."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from services.teacher.bench.throughput import PATHS
from tests.helpers import tropd_here

TROPD = [sys.executable, "-m", "tropd", "bench", "teacher"]


def run(*args: str, timeout: float = 280) -> subprocess.CompletedProcess:
    return subprocess.run([*TROPD, *args], capture_output=True, text=True, timeout=timeout)


def test_help_documents_every_option():
    result = run("--help", timeout=60)
    assert result.returncode == 0, result.stderr
    for option in ("--model", "--sequences", "--length", "--top-k", "--repeats", "--clients", "--request-sequences"):
        assert option in result.stdout
    for option in ("--skip-stock", "--stock-tokenizer", "--stock-url", "--service-url", "--quick", "--json",
                   "--contention-seconds", "--alternations"):  # fmt: skip
        assert option in result.stdout


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--model", "/does/not/exist"], "not found"),
        (["--clients", "1,x"], "comma-separated positive integers"),
        (["--repeats", "0"], "positive integer"),
        (["--stock-url", "localhost:8000"], "expected an http:// or https:// URL"),
    ],
)
def test_bad_arguments_are_one_line_errors(args, needle):
    result = tropd_here("bench", "teacher", *args)
    assert result.returncode == 2
    assert needle in result.stderr and "Traceback" not in result.stderr


# Long (about 2 minutes on 2 cores): three vLLM start-ups (the engine in-process, the service, the stock server) and
# two contention rounds of at least 3 engine batches each (the service's default batch size). The options here
# shorten what they can: one timed round, 1 s contention windows, requests of 16 sequences (the contention clients
# keep two engine batches in flight: fewer, larger requests fill them with less HTTP overhead than the --quick
# default of 4 sequences), and no separated b/a, whose two more vLLM start-ups (the engine and the service each
# alone) would add a minute: its code is run below on the hf engine, which starts in seconds.
QUICKER = ("--repeats", "1", "--contention-seconds", "1", "--sequences", "64", "--request-sequences", "16",
           "--alternations", "0")  # fmt: skip


@pytest.mark.vllm
@pytest.mark.timeout(660)
def test_quick_run_reports_every_measurement(toy_quick, toy_vllm_teacher, stock_vllm_teacher):
    # (b, c, e) and (d) against the session's vLLM service and stock server (`--service-url`, `--stock-url`): each
    # start takes 20-40 s on 2 cores, and the shared fixtures start them with the functions the bench uses
    shared = ("--service-url", toy_vllm_teacher.get().url, "--stock-url", stock_vllm_teacher.get().url)
    result = run("--quick", *QUICKER, *shared, "--json", "--model", str(toy_quick / "teacher"), timeout=640)
    assert result.returncode == 0, result.stderr[-4000:]  # never 134 (an abort at exit)
    report = json.loads(result.stdout)  # stdout holds the JSON object alone: vLLM's prints went to stderr
    assert report["clients"] == [1, 4] and report["scored_tokens"] == 64 * 63 and report["repeats"] == 1
    got = {(m["path"], m["clients"]): m for m in report["measurements"]}
    assert set(got) == {(path, c) for path in PATHS for c in (1, 4)}
    for (path, _), m in got.items():
        assert m["tokens_per_s"] > 0 and m["over_engine"] > 0
        # the engine is timed in the rounds of each of the two servers
        assert len(m["seconds"]) == report["repeats"] * (2 if path == "engine" else 1)
        assert (m["bytes_per_token"] is None) == (path == "engine")
    assert got[("service_binary", 1)]["bytes_per_token"] < got[("service_json", 1)]["bytes_per_token"]
    assert report["service_over_engine"] > 0 and report["service_over_stock_vllm"] > 0
    assert set(report["raw_ratios"]) == {"service_over_engine", "service_over_stock_vllm"}
    assert isinstance(report["agree"], bool)
    assert set(report["agreement"]) >= {"service_binary", "service_json", "stock_vllm"}
    assert report["server_exit_codes"] == {}  # it started no server of its own
    # one greedy client among N, the completions path beside the stock server, and b/a with each path alone
    keys = ("min_fair_share", "aggregate_over_single", "completions_over_stock_vllm")
    for key in keys:
        assert math.isfinite(report[key]) and report[key] > 0, key
    rounds = report["contention"]["rounds"]
    assert [r["clients"] for r in rounds] == [1, 4] and len(rounds[1]["steady_shares"]) == 3
    assert 0 < rounds[1]["greedy_share"] + sum(rounds[1]["steady_shares"]) <= 1 + 1e-9
    assert report["separated"] is None and report["service_over_engine_separated"] is None  # --alternations 0


def test_separated_b_over_a_alternates_the_engine_alone_and_the_service_alone(toy_quick):
    """The separated measurement (`--alternations N`): A (the engine alone, in its own process) then B (the service
    alone), N times, each timed; run here on the hf engine, which the bench's vllm run differs from only by name."""
    from services.teacher.bench.alone import measure_alone
    from services.teacher.bench.throughput import BenchConfig, make_requests

    requests = make_requests(BenchConfig(str(toy_quick / "teacher"), sequences=8, length=32, request_sequences=4), 26)
    lines = []
    report = measure_alone(str(toy_quick / "teacher"), "hf", requests, 3, 20, 2, 1, 120, progress=lines.append)
    assert report["engine"] == "hf" and report["order"].split() == ["A", "B"]
    assert [len(s) for s in report["seconds"].values()] == [2, 2] and all(t > 0 for t in report["seconds"]["engine"])
    assert report["service_over_engine"] == report["tokens_per_s"]["service_binary"] / report["tokens_per_s"]["engine"]
    assert [line.split(" (")[0] for line in lines] == [f"bench: separated {p}{i}" for i in (1,) for p in "AB"]
