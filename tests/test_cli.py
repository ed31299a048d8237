import json
import subprocess
import sys

import pytest

TROPD = [sys.executable, "-m", "tropd"]


def run(*args):
    return subprocess.run([*TROPD, *args], capture_output=True, text=True, timeout=300)


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
