"""`tropd bench methods --quick`: every method trains and reports (who wins is not checked here)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import tropd_here
from trainer.bench.methods import ARMS, SWEEP_ARMS, lr_grid, overrides, run_key, settings, world_id
from trainer.bench.report import agreement_table, probe_markdown, tuning_table, verdict


@pytest.mark.timeout(900)
def test_quick_run_reports_every_method(toy_quick, tmp_path):
    out = tmp_path / "results"
    # 2 steps a run (evaluated after each), not --quick's 6: the 15 runs train, evaluate and report all the same.
    # Still long (about a minute on 2 cores): 15 runs of which each loads its models and evaluates 3 times, and the
    # sweep's 10 SFT steps
    command = [sys.executable, "-m", "tropd", "bench", "methods", "--quick", "--steps", "2", "--json", "--toy",
               str(toy_quick), "--out", str(out)]  # fmt: skip
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
    # every method's final student answers the same held-out prompts, beside the teacher and the right answer
    runs = json.loads((out / "results.json").read_text())["runs"]
    shown = [[(e["task"], e["prompt"]) for e in r["probe"]["examples"]] for r in runs]
    assert all(s == shown[0] for s in shown) and {t for t, _ in shown[0]} == {"math", "code"}
    for r in runs:
        for t, a in r["probe"]["agreement"].items():
            assert a["n"] == 20 and 0 <= a["teacher_prefers_wrong"] <= a["with_answer"] <= a["wrong"] <= a["n"], t
            assert a["wrong"] == round(20 * (1 - r["final"]["accuracy"][t]))  # the same greedy answers as the eval
    section = text.split("## What the final students write")[1]
    assert f"| math | `{shown[0][0][1]}` |" in section and "| teacher | `" in section
    assert "log p_T(a <eos> | x, c#) > log p_T(a* <eos> | x, c#)" in section  # the measure, defined
    for arm in ARMS:
        assert f"| {arm} | " in section
    assert "of OPD's wrong answers" in section or "OPD's students gave no wrong answer" in section

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


def test_only_runs_of_the_same_toy_world_are_carried_along(tmp_path):
    from trainer.bench.methods import _earlier_runs, _fill

    def run(key, arm="opd", **more):
        return {"arm": arm, "seed": 0, "key": key, **more}

    old, new = {"version": 1, "seed": 0}, {"version": 1, "seed": 1}
    # an earlier report of the old world, which had carried along one run of its own world and one untagged
    (tmp_path / "results.json").write_text(json.dumps({
        "toy_build": old, "tuning": [], "runs": [run("a")], "sweep": [run("s", student="student-sft100")],
        "other_runs": [run("t", world=world_id(old)), run("u")],
    }))  # fmt: skip
    (tmp_path / "results.partial.json").write_text(json.dumps({"toy_build": new, "runs": [run("b", "tropd")]}))
    earlier = _earlier_runs(tmp_path, print)
    assert set(earlier) == {"a", "s", "t", "u", "b"}  # every run can still be reused by its key

    def carried(build, keys=("b",)):
        report = {"toy_build": build}
        _fill(report, [("runs", "tropd", 0, Path("student"), 0.003)][: len(keys)], list(keys), earlier, earlier)
        return report

    report = carried(new)
    assert [r["key"] for r in report["runs"]] == ["b"] and "world" not in report["runs"][0]
    assert report["other_runs"] == []  # the old world's runs (and the untagged one) stay out of the new report
    report = carried(old, keys=())
    assert sorted(r["key"] for r in report["other_runs"]) == ["a", "s", "t"]
    assert {r["world"] for r in report["other_runs"]} == {world_id(old)}  # the tag is kept, for the next report
    assert next(r for r in report["other_runs"] if r["key"] == "s")["student"] == "student-sft100"


def test_unknown_method_is_a_one_line_error():
    result = tropd_here("bench", "methods", "--quick", "--methods", "opd,nope")
    assert result.returncode == 2 and "unknown nope" in result.stderr and "Traceback" not in result.stderr


def test_a_quick_run_never_defaults_to_the_published_report():
    from trainer.cli import methods_out
    from tropd.cli import build_parser

    def out(*argv):
        return methods_out(build_parser().parse_args(["bench", "methods", *argv]))

    assert out() == "docs/results"
    assert out("--quick") == "runs/methods-quick"
    assert out("--quick", "--out", "x") == "x"


@pytest.mark.timeout(600)
def test_tune_runs_every_method_at_three_rates_and_reports_them(toy_quick, tmp_path):
    out = tmp_path / "results"
    command = [sys.executable, "-m", "tropd", "bench", "methods", "--quick", "--tune", "--json", "--toy",
               str(toy_quick), "--out", str(out), "--methods", "opd,tropd", "--steps", "2", "--no-sweep",
               "--jobs", "2"]  # fmt: skip
    # 2 at a time (1 torch thread each): a quarter of the time of one at a time on 2 cores; the runs are the same
    result = subprocess.run(command, capture_output=True, text=True, timeout=580)
    assert result.returncode == 0, result.stderr[-3000:]
    # 2 methods x 3 rates on seed 0, then 1 seed (--quick) at the best rate: the tuning run itself, not trained again
    assert "tuning: 6 runs in the report, 6 distinct, 6 to train" in result.stderr
    assert "2 runs in the report, 2 distinct, 0 to train" in result.stderr
    tables = json.loads(result.stdout)
    grid = lr_grid(3e-3)
    assert grid == [3e-3, 1e-3, 9e-3]
    assert [(r["arm"], r["lrs"]) for r in tables["tuning_table"]] == [("opd", grid), ("tropd", grid)]
    for tuned, row in zip(tables["tuning_table"], tables["table"], strict=True):
        assert row["arm"] == tuned["arm"] and row["lr"] == tuned["best_lr"]  # the table is at each one's best rate
        best = tuned["runs"][f"{tuned['best_lr']:g}"]
        assert all(best["math"] + best["code"] >= c["math"] + c["code"] for c in tuned["runs"].values())
    text = (tmp_path / "results.md").read_text()
    assert "## Learning-rate tuning" in text and "| method | lr 0.001 | lr 0.003 | lr 0.009 | best lr |" in text
    for r in tables["tuning_table"]:
        assert f"| {r['arm']} | {r['best_lr']:g} |" in text.split("## Methods")[1]  # the methods table's lr
    assert "Every method is compared at its own best learning rate (tuned on seed 0): opd " in text
    assert "OPD still collapses at its best rate" in text or "OPD does not collapse at its best rate" in text


def _row(arm, math_mean, code_mean, collapsed=0, sd=0.02, lr=0.003):
    return {"arm": arm, "seeds": 3, "lr": lr, "collapsed": collapsed, "final_math": {"mean": math_mean, "sd": sd},
            "final_code": {"mean": code_mean, "sd": sd}}  # fmt: skip


def _tuned(arm, best, lrs=(0.003, 0.001, 0.009)):
    return {"arm": arm, "lrs": list(lrs), "best_lr": best, "runs": {}}


def test_verdict_prose_follows_the_numbers():
    tuning = [_tuned("tropd", 0.003), _tuned("opd", 0.001)]
    collapsed = verdict([_row("tropd", 0.5, 0.7), _row("opd", 0.0, 0.0, collapsed=3, lr=0.001)], tuning)
    assert "OPD still collapses at its best rate, 0.001: 3/3 runs collapsed." in collapsed
    assert any("tropd vs opd (baseline): math wins (+50.0 points" in line for line in collapsed)
    # the best rate of opd is the grid's lowest: the report says a wider grid might do better
    assert any("edge of the grid for opd" in line for line in collapsed)

    stable = verdict([_row("tropd", 0.5, 0.7), _row("opd", 0.3, 0.7, lr=0.001)], tuning)
    assert ("OPD does not collapse at its best rate, 0.001 (0/3 runs collapsed); TrOPD still wins on math "
            "(it does tie on code).") in stable  # fmt: skip
    level = verdict([_row("tropd", 0.5, 0.6), _row("opd", 0.6, 0.6, lr=0.001)], tuning)
    assert any("TrOPD wins on neither math nor code there (it does lose on math and tie on code)" in x for x in level)
    assert not any("still wins" in line for line in level)
    untuned = verdict([_row("tropd", 0.5, 0.7), _row("opd", 0.0, 0.0, collapsed=3)], None, 0.003)
    assert "Every method ran at the default learning rate 0.003, not tuned (`--tune` tunes each)." in untuned
    assert not any("best rate" in line for line in untuned)


def test_tuning_picks_the_highest_final_math_plus_code_and_the_default_on_ties():
    def run(arm, lr, math_acc, code_acc):
        return {"arm": arm, "lr": lr, "collapsed": False, "final": {"accuracy": {"math": math_acc, "code": code_acc}}}

    lrs = lr_grid(0.003)
    runs = [run("a", 0.003, 0.2, 0.2), run("a", 0.001, 0.1, 0.4), run("a", 0.009, 0.3, 0.0),
            run("b", 0.003, 0.2, 0.2), run("b", 0.001, 0.2, 0.2), run("b", 0.009, 0.1, 0.1)]  # fmt: skip
    rows = {r["arm"]: r for r in tuning_table(runs, lrs)}
    assert rows["a"]["best_lr"] == 0.001 and rows["b"]["best_lr"] == 0.003
    assert rows["a"]["runs"]["0.001"] == {"math": 0.1, "code": 0.4, "collapsed": False}


def test_the_default_rate_keeps_the_untuned_run_key():
    s = {**settings(True, None, None), "lr": 3e-3}
    toy = Path("artifacts/toy-quick")

    def key(lr):
        return run_key("opd", overrides(s, toy / "student", toy / "teacher", "hf", Path("a"), 0, lr), None)

    assert key(3e-3) == key(None)  # a tuning run at the default rate is the untuned run: reused, not trained again
    assert len({key(None), key(1e-3), key(9e-3)}) == 3


def _probed(arm, wrong, prefers, with_answer=None, gap=1.0):
    cell = {"n": 10, "wrong": wrong, "with_answer": wrong if with_answer is None else with_answer,
            "teacher_prefers_wrong": prefers, "median_gap": gap if wrong else None}  # fmt: skip
    examples = [{"task": t, "prompt": f"{t}-p", "right": "7", "student": "1;#6", "teacher": "1;#7", "correct": False}
                for t in ("math", "code")]  # fmt: skip
    return {"arm": arm, "probe": {"examples": examples, "agreement": {"math": cell, "code": dict(cell)}}}


def test_the_agreement_section_follows_the_numbers_and_survives_empty_cases():
    rows = [{"arm": a, "final_kl": {"mean": kl, "sd": 0.0}} for a, kl in (("opd", 0.05), ("tropd", 0.9))]
    runs = [_probed("opd", 8, 8), _probed("opd", 6, 3), _probed("tropd", 2, 1)]
    agree = {a["arm"]: a for a in agreement_table(runs)}
    assert agree["opd"]["seeds"] == 2 and agree["opd"]["math"]["wrong"] == 14
    assert agree["opd"]["math"]["teacher_prefers_wrong"] == 11
    text = "\n".join(probe_markdown(runs, rows))
    assert "| opd | 14/20 | 11/14 (79%) | +1.00 | 14/20 | 11/14 (79%) | +1.00 |" in text
    assert "in 79% (22/28) of OPD's wrong answers, more often than in 50% (2/4) of TrOPD's" in text
    assert "final reverse KL: opd 0.05, tropd 0.90" in text and "TrOPD's students made fewer errors" in text
    assert "| right answer | `7` |" in text and "`1;#6` ✗" in text
    # no wrong answers at all, a run without a probe (reused from an older report), no opd: no crash
    none = probe_markdown([_probed("opd", 0, 0), _probed("tropd", 0, 0), {"arm": "sft"}], rows)
    assert "| opd | 0/10 | - | - |" in "\n".join(none) and any("no wrong answer" in line for line in none)
    assert probe_markdown([{"arm": "opd"}], rows) == []
    assert "of OPD's" not in "\n".join(probe_markdown([_probed("tropd", 3, 1)], rows))
