import json
import subprocess
import sys

from tests.helpers import tropd_here


def test_bench_trainer_quick_reports_every_measurement(toy_quick):
    # 4 steps an arm, not --quick's 6 (the means skip the first 2). Still long (about a minute on 2 cores): two
    # teacher services, four short runs, the decoders, six peak-memory subprocesses and the rollout shapes, none of
    # which has a smaller setting than --quick
    command = [sys.executable, "-m", "tropd", "bench", "trainer", "--quick", "--json", "--toy", str(toy_quick),
               "--threads", "1", "--steps", "4"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["async_over_sync"] > 0 and report["service_over_inprocess"] > 0
    assert report["settings"]["threads"] == 1
    a, b = report["async_vs_sync"], report["service_vs_inprocess"]
    for key in ("step_s_sync", "step_s_async", "wait_teacher_s_sync", "injected_latency_ms"):
        assert a[key] >= 0, key
    assert b["tokens_per_s_service"] > 0 and b["tokens_per_s_inprocess"] > 0
    for shape in report["decoders"]["shapes"].values():
        assert shape["tokens_per_s_fast"] > 0 and shape["tokens_per_s_library"] > 0
    assert report["decoders"]["shapes"]["toy_student"]["rule_picks"] == "fast"
    peak = report["peak_memory_mb"]
    assert peak["unchunked"] > min(v for k, v in peak.items() if k.startswith("chunk_")) > 0
    # (e) rollouts: rows that stop at different lengths, quick sizes
    rollout = report["rollout"]
    assert (rollout["settings"]["rows"], rollout["settings"]["new_tokens"]) == (16, 32) and rollout["shapes"]
    for shape in rollout["shapes"].values():
        assert shape["tokens_per_s"] > 0 and 0 < shape["mean_length"] <= 32 and shape["params"] > 0
    # (f) rollout engines, quick: the toy student on torch and on vLLM, and one weight sync
    engines = report["engines"]["shapes"]
    assert list(engines) == ["toy_student"]
    toy = engines["toy_student"]
    assert toy["torch_tokens_per_s"] > 0 and toy["vllm_tokens_per_s"] > 0 and toy["sync_ms"] > 0
    assert isinstance(toy["vllm_runtime_mb"], float)  # a difference of resident memory: reported, not bounded
    assert toy["vllm_over_torch_rollout_tokens_per_s"] == toy["vllm_tokens_per_s"] / toy["torch_tokens_per_s"]


def test_bench_trainer_bad_latency_is_a_clear_error():
    result = tropd_here("bench", "trainer", "--latency-ms", "-5", "--no-build")
    assert result.returncode == 2 and "latency" in result.stderr and "Traceback" not in result.stderr


def test_bench_trainer_bad_threads_is_a_clear_error():
    result = tropd_here("bench", "trainer", "--threads", "0", "--no-build")
    assert result.returncode == 2 and "--threads" in result.stderr and "Traceback" not in result.stderr


def test_peak_memory_is_the_measuring_process_own_not_its_parents():
    # ru_maxrss is kept across exec, so a variant's process started by a large parent read a step smaller than the
    # parent's resident memory as 0 MB; the peak is this process's own (VmHWM)
    held = bytearray(b"\x01") * (600 * 2**20)  # a parent with 600 MiB resident
    probe = "from trainer.bench.memory import _peak_rss_kb; print(_peak_rss_kb())"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert 0 < int(result.stdout) < 300 * 2**10 < len(held) // 2**10
