"""Answer verifiers: `exact`, `math` (math-verify), a user's `module:function`, and their errors."""

from __future__ import annotations

import sys
import threading
import uuid

import pytest

from trainer.data.verifiers import final_answer, load_verifier, score_all
from tropd.errors import UserError

# ---- exact ----


@pytest.mark.parametrize(
    ("response", "answer", "score"),
    [
        (r"so the total is \boxed{42}.", "42", 1.0),
        (r"first \boxed{1}, then \boxed{\frac{1}{2}} done", r"\frac{1}{2}", 1.0),  # the last box, braces nested
        (r"\boxed{41} The answer is 42", "42", 0.0),  # a box wins over a marker
        ("12+30 = 42. The answer is 42.", "42", 1.0),
        ("Step one.\nFinal Answer: 7", "7", 1.0),
        ("The answer is 3. No wait, the answer is: 4", "4", 1.0),
        ("48/2 = 24\n#### 24", "24", 1.0),
        ("  Paris.  ", "paris", 1.0),  # the whole response
        ("New   York\n City", "new york city.", 1.0),  # whitespace collapsed, case-folded, period removed
        ("The answer is 42", "43", 0.0),
        ("42 apples", "42", 0.0),  # no marker: the whole response must match
        ("The answer is 42", None, 0.0),
    ],
)
def test_exact(response: str, answer: str | None, score: float) -> None:
    assert load_verifier("exact")(response, answer, {}) == score


def test_final_answer_forms() -> None:
    assert final_answer(r"x \boxed{a{b}c} y") == "a{b}c"
    assert final_answer(r"open \boxed{12 and more") == r"open \boxed{12 and more"  # an open box is not an answer
    assert final_answer("reasoning #### 9") == " 9"
    assert final_answer("no marker at all") == "no marker at all"


# ---- math ----


@pytest.mark.parametrize(
    ("response", "answer", "score"),
    [
        (r"Half of it: $\boxed{\frac{1}{2}}$", "0.5", 1.0),
        ("1/2", "0.5", 1.0),
        ("The answer is 42.", "42", 1.0),
        (r"\boxed{42}", "42", 1.0),
        (r"$\sqrt{4}$", "2", 1.0),
        (r"\boxed{x^2 + 1}", "1+x^2", 1.0),
        (r"\boxed{\frac{1}{3}}", "0.5", 0.0),
        ("The answer is 41.", "42", 0.0),
        ("I do not know.", "42", 0.0),
        (r"\boxed{42}", None, 0.0),
    ],
)
def test_math(response: str, answer: str | None, score: float) -> None:
    assert load_verifier("math")(response, answer, {}) == score


def test_math_outside_the_main_thread() -> None:
    """math-verify's signal-based timeouts fail off the main thread; the verifier runs there without them."""
    verifier = load_verifier("math")
    scores: list[float] = []
    worker = threading.Thread(target=lambda: scores.extend(score_all(verifier, ["1/2", "3"], ["0.5", "4"], [{}, {}])))
    worker.start()
    worker.join()
    assert scores == [1.0, 0.0]


def test_math_without_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "math_verify", None)  # makes `import math_verify` fail
    with pytest.raises(UserError, match="pip install math-verify"):
        load_verifier("math")


# ---- module:function ----

VERIFIER_SOURCE = """
def contains(response, answer, record):
    return answer is not None and answer in response

def by_length(response, answer, record):
    return min(1.0, len(response) / record["target_len"])

def returns_text(response, answer, record):
    return "yes"

def returns_two(response, answer, record):
    return 2

def raises(response, answer, record):
    raise KeyError("label")

NOT_A_FUNCTION = 3
"""


@pytest.fixture
def verifier_file(tmp_path):
    path = tmp_path / "my_checks.py"
    path.write_text(VERIFIER_SOURCE)
    return path


def test_function_from_a_file(verifier_file) -> None:
    contains = load_verifier(f"{verifier_file}:contains")
    assert contains("the answer is 42", "42", {}) == 1.0
    assert contains("the answer is 41", "42", {}) == 0.0
    by_length = load_verifier(f"{verifier_file}:by_length")
    assert score_all(by_length, ["ab", "abcdef"], [None, None], [{"target_len": 4}] * 2) == [0.5, 1.0]


def test_function_from_a_dotted_module(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = f"checks_{uuid.uuid4().hex[:8]}"  # a fresh name, so no module cached by another test answers
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / package / "answers.py").write_text(VERIFIER_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    verifier = load_verifier(f"{package}.answers:contains")
    assert score_all(verifier, ["x = 7", "x = 8"], ["7", "7"], [{}, {}]) == [1.0, 0.0]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("returns_text", "returned a str: it must return a bool or a number in \\[0, 1\\]"),
        ("returns_two", "returned 2: it must return a bool or a number in \\[0, 1\\]"),
        ("raises", "raised KeyError: 'label'"),
    ],
)
def test_bad_results_name_the_function(verifier_file, name: str, message: str) -> None:
    verifier = load_verifier(f"{verifier_file}:{name}")
    with pytest.raises(UserError, match=message) as caught:
        verifier("response", "answer", {})
    assert f":{name}'" in str(caught.value) and "\n" not in str(caught.value)


def test_load_errors_are_one_line(verifier_file, tmp_path) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("def f(:\n")
    cases = {
        "no_such_module_xyz:f": "module 'no_such_module_xyz' not found",
        f"{tmp_path}/missing.py:f": "missing.py not found",
        f"{verifier_file}:absent": "has no attribute 'absent'",
        f"{verifier_file}:NOT_A_FUNCTION": "NOT_A_FUNCTION is not callable \\(its type is int\\)",
        f"{broken}:f": "loading .*broken.py failed: SyntaxError",
        "regex": "unknown verifier 'regex': use `exact`, `math`, `module:function`",
        "module:": "unknown verifier 'module:'",
    }
    for spec, message in cases.items():
        with pytest.raises(UserError, match=message) as caught:
            load_verifier(spec)
        assert "\n" not in str(caught.value)
        if spec.count(":") == 1 and spec.split(":")[1]:
            assert repr(spec) in str(caught.value)  # the message names the spec


def test_score_all_wants_one_answer_and_record_per_response() -> None:
    with pytest.raises(ValueError, match="2 responses, 1 answers, 2 records"):
        score_all(load_verifier("exact"), ["a", "b"], ["a"], [{}, {}])
