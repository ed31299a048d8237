"""`tropd bench methods --quick`: every method trains and reports (who wins is not checked here)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from trainer.methods_bench import ARMS, SWEEP_ARMS


@pytest.mark.timeout(900)
def test_quick_run_reports_every_method(toy_quick, tmp_path):
    out = tmp_path / "results"
    command = [sys.executable, "-m", "tropd", "bench", "methods", "--quick", "--json", "--toy", str(toy_quick),
               "--out", str(out)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=880)
    assert result.returncode == 0, result.stderr[-3000:]
    tables = json.loads(result.stdout)
    assert [row["arm"] for row in tables["table"]] == list(ARMS)
    for row in tables["table"]:
        assert row["seeds"] == 1 and row["response_tokens"] > 0
        for key in ("final_math", "final_code", "best_math", "final_kl"):
            assert math.isfinite(row[key]["mean"]), (row["arm"], key)
    assert {(r["student"], r["arm"]) for r in tables["sweep_table"]} == {
        (s, a) for s in ("student", "student-sft10") for a in SWEEP_ARMS
    }
    # the sweep's x-axis is measured for every student (its order on a quick toy is noise: not checked here)
    assert all(math.isfinite(r["init_kl"]["mean"]) for r in tables["sweep_table"])
    assert (out / "runs" / "student-sft10" / "config.json").is_file()
    text = (out / "results.md").read_text()
    assert "(teacher 128x4, student 96x3, student drills 0.5)" in text  # which toy models made the numbers
    for arm in ARMS:
        assert f"| {arm} |" in text
    for name in ("results.json", "accuracy.png", "reverse_kl.png", "sweep.png"):
        assert (out / name).stat().st_size > 0, name


def test_unknown_method_is_a_one_line_error():
    command = [sys.executable, "-m", "tropd", "bench", "methods", "--quick", "--methods", "opd,nope"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "unknown nope" in result.stderr and "Traceback" not in result.stderr
