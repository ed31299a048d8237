import json
import shutil
import subprocess
import sys

import pytest

from tests.helpers import tropd_here as run

TROPD = [sys.executable, "-m", "tropd"]


def test_the_command_runs_as_a_module():
    result = subprocess.run([*TROPD, "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "usage: tropd" in result.stdout, result.stderr


@pytest.mark.parametrize(
    "args",
    [[], ["toy"], ["toy", "build"], ["toy", "eval"], ["demo"], ["bench"]],
)
def test_help_everywhere(args):
    result = run(*args, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


@pytest.mark.parametrize(
    "args,needle",
    [
        (["toy", "eval", "--model", "/does/not/exist", "--task", "math"], "not found"),
        (["toy", "eval", "--model", ".", "--task", "poetry"], "invalid choice"),
        (["toy", "eval", "--model", ".", "--task", "math", "--n", "0"], "positive integer"),
        (["toy", "build", "--seed", "minus"], "integer"),
        (["toy", "eval", "--model", ".", "--task", "math", "--teacher", "/nope"], "not found"),
        (["frobnicate"], "invalid choice"),
        (["toy", "build", "--bogus"], "unrecognized"),
    ],
)
def test_bad_arguments_are_one_line_errors(args, needle):
    result = run(*args)
    assert result.returncode == 2
    assert needle in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_toy_eval_json(toy_quick):
    result = run(
        "toy",
        "eval",
        "--model",
        str(toy_quick / "student"),
        "--task",
        "code",
        "--n",
        "10",
        "--teacher",
        str(toy_quick / "teacher"),
        "--json",
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["task"] == "code" and data["n"] == 10
    assert {"accuracy", "reverse_kl", "outlier_share"} <= set(data)


def _damaged_model(toy_quick, where, kind):
    model = where / kind
    shutil.copytree(toy_quick / "teacher", model)
    if kind == "garbage-weights":
        (model / "model.safetensors").write_bytes(b"xx")
    elif kind == "bad-config":
        (model / "config.json").write_text("{not json")
    return model


@pytest.mark.parametrize(
    "kind,needle", [("garbage-weights", "model.safetensors is damaged"), ("bad-config", "config.json is not")]
)
def test_damaged_model_directory_is_a_one_line_error(toy_quick, tmp_path, kind, needle):
    model = str(_damaged_model(toy_quick, tmp_path, kind))
    for args in (["toy", "eval", "--model", model, "--task", "math", "--n", "2"],
                 ["teacher", "serve", "--model", model, "--engine", "hf", "--port", "0"]):  # fmt: skip
        result = run(*args)
        assert result.returncode == 2, result.stderr[-2000:]
        assert needle in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["teacher", "serve", "--model", "{teacher}", "--batch-window-ms", "inf"], "--batch-window-ms"),
        (["teacher", "serve", "--model", "{teacher}", "--simulate-latency-ms", "nan"], "--simulate-latency-ms"),
        (["bench", "trainer", "--no-build", "--toy", "{toy}", "--quick", "--steps", "2"], "--steps must be >= 3"),
        (["bench", "trainer", "--no-build", "--toy", "{toy}", "--quick", "--latency-ms", "nan"], "--latency-ms"),
        (["bench", "trainer", "--toy", "{file}", "--quick"], "is a file"),
        (["bench", "methods", "--quick", "--out", "{file}/sub"], "is a file"),
        (["demo", "--out", "{file}"], "is a file"),
        (["demo", "out=elsewhere"], "with --out DIR"),
        (["demo", "teachers.a.url=http://127.0.0.1:9"], "tropd demo serves one teacher"),
        (["toy", "build", "--quick", "--out", "{file}"], "is a file"),
    ],
)
def test_values_that_would_hang_or_crash_are_refused(toy_quick, tmp_path, args, needle):
    (tmp_path / "afile").write_text("")
    places = {"teacher": str(toy_quick / "teacher"), "toy": str(toy_quick), "file": str(tmp_path / "afile")}
    result = run(*[a.format(**places) for a in args])
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.stderr, result.stderr[-2000:]


@pytest.mark.slow  # over 4 s on 2 cores
def test_toy_build_refuses_a_directory_it_did_not_make(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "student").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("{}\n")
    (run_dir / "student" / "model.safetensors").write_bytes(b"trained")
    result = run("toy", "build", "--quick", "--out", str(run_dir))
    assert result.returncode == 2 and "toy build did not make (metrics.jsonl)" in result.stderr, result.stderr
    assert (run_dir / "student" / "model.safetensors").read_bytes() == b"trained"


def test_toy_build_accepts_a_volume_root(tmp_path):
    from trainer.toy import world

    for name in ("lost+found", ".snapshot", "teacher", "student.tmp"):
        (tmp_path / name).mkdir()
    (tmp_path / "build.json").write_text("{}")
    assert world.foreign_files(tmp_path) == []
    (tmp_path / "notes.txt").write_text("")
    assert world.foreign_files(tmp_path) == ["notes.txt"]
