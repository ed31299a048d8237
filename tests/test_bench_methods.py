"""`tropd bench methods --quick`: every method trains and reports (who wins is not checked here)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from trainer.methods_bench import ARMS, SWEEP_ARMS, overrides, run_key, settings


@pytest.mark.timeout(900)
def test_quick_run_reports_every_method(toy_quick, tmp_path):
    out = tmp_path / "results"
    command = [sys.executable, "-m", "tropd", "bench", "methods", "--quick", "--json", "--toy", str(toy_quick),
               "--out", str(out)]  # fmt: skip
    result = subprocess.run([*command, "--jobs", "2"], capture_output=True, text=True, timeout=880)
    assert result.returncode == 0, result.stderr[-3000:]
    # the sweep's first student is the toy student itself: its opd and tropd runs are the table's, trained once
    n = len(ARMS) + len(SWEEP_ARMS)
    assert f"{n + len(SWEEP_ARMS)} runs in the report, {n} distinct, {n} to train" in result.stderr
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
    assert json.loads((out / "runs" / "student-sft10" / "tropd-sweep-student.json").read_text())["sft"]["steps"] == 10
    text = (tmp_path / "results.md").read_text()  # the report sits beside its folder, images linked from it
    assert "![accuracy curves](results/accuracy.png)" in text and not (out / "results.md").exists()
    assert "(teacher 128x4, student 96x3, student drills 0.5)" in text  # which toy models made the numbers
    for arm in ARMS:
        assert f"| {arm} |" in text
    for name in ("results.json", "accuracy.png", "reverse_kl.png", "sweep.png"):
        assert (out / name).stat().st_size > 0, name
    assert "torch threads per run: " in text and "(2 at a time;" in text  # how the cores were shared

    # --resume: every run is found again in the report, nothing is trained, the tables are the same
    again = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert ", 0 to train" in again.stderr
    assert json.loads(again.stdout) == tables

    # without --resume a run is trained again, in place of the directory of the last one
    fresh = subprocess.run([*command, "--methods", "opd", "--no-sweep"], capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "1 runs in the report, 1 distinct, 1 to train" in fresh.stderr
    # ... and the runs of the earlier report it does not include are carried along, for a later --resume
    carried = json.loads((out / "results.json").read_text())["other_runs"]
    assert len(carried) == len(ARMS) + len(SWEEP_ARMS) - 1
    # a carried sweep run still says whose it is (its key was made with that student)
    assert sorted(r["arm"] for r in carried if r.get("student") == "student-sft10") == sorted(SWEEP_ARMS)


def test_run_key_names_what_decides_a_run_and_not_where_it_is_written():
    from pathlib import Path

    s = settings(False, None, None)
    toy = Path("artifacts/toy")

    def key(arm="tropd", seed=0, out="a", build=None, steps=None):
        base = overrides(settings(False, steps, None) if steps else s, toy / "student", toy / "teacher", "hf",
                         Path(out), seed)  # fmt: skip
        return run_key(arm, base, build or {"version": 1})

    assert s["steps"] == 600 and s["seeds"] == 3  # the full benchmark's budget
    assert key(out="a") == key(out="b/c")
    assert len({key(), key(arm="opd"), key(seed=1), key(build={"version": 2}), key(steps=300)}) == 5
    nearer = overrides(s, Path("out/runs/student-sft100"), toy / "teacher", "hf", Path("a"), 0)
    assert run_key("tropd", nearer, {"version": 1}) != key()  # the sweep's students are told apart


def test_unknown_method_is_a_one_line_error():
    command = [sys.executable, "-m", "tropd", "bench", "methods", "--quick", "--methods", "opd,nope"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "unknown nope" in result.stderr and "Traceback" not in result.stderr


def test_a_quick_run_never_defaults_to_the_published_report():
    from trainer.cli import methods_out
    from tropd.cli import build_parser

    def out(*argv):
        return methods_out(build_parser().parse_args(["bench", "methods", *argv]))

    assert out() == "docs/results"
    assert out("--quick") == "runs/methods-quick"
    assert out("--quick", "--out", "x") == "x"
