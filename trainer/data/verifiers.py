"""Answer verifiers: score a decoded response against a reference answer, for eval accuracy on users' data.

A verifier is `(response, answer, record) -> score in [0, 1]`: the decoded response text, the reference answer
(None when the record has none) and the prompt record as read from the file. `load_verifier(spec)` builds one:

- `exact`: normalised string match of the response's final answer against the reference answer. The final
  answer is the content of the last `\\boxed{...}` if any, else the text after the last `answer is` /
  `answer:` / `####` marker (case-insensitive) if any, else the whole response. Both sides are normalised:
  stripped, whitespace collapsed to one space, case-folded, a trailing period removed.
- `math`: symbolic equivalence with the `math-verify` package (`\\boxed{\\frac{1}{2}}` matches `0.5`).
- `module:function` or `path/to/file.py:function`: a function of the user's, called with
  `(response, answer, record)`, returning a bool or a number in [0, 1].

A None answer scores 0 with `exact` and `math`; a user's function decides for itself.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import re
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tropd.errors import UserError, first_line

Verifier = Callable[[str, str | None, dict], float]

VALID_FORMS = "`exact`, `math`, `module:function` or `path/to/file.py:function`"
_ANSWER_MARKER = re.compile(r"answer is:?|answer:|####", re.IGNORECASE)
_BOXED = "\\boxed{"


def load_verifier(spec: str) -> Verifier:
    """The verifier named by `spec` (see the module docstring); a bad spec is a one-line UserError."""
    spec = spec.strip()
    if spec == "exact":
        return exact_match
    if spec == "math":
        return _math_verifier()
    if ":" in spec:
        source, _, name = spec.rpartition(":")
        if source and name.isidentifier():
            return _user_verifier(spec, source, name)
    raise UserError(f"unknown verifier {spec!r}: use {VALID_FORMS}")


def score_all(
    verifier: Verifier, responses: Sequence[str], answers: Sequence[str | None], records: Sequence[dict]
) -> list[float]:
    """One score per response: `verifier(responses[i], answers[i], records[i])` as a float."""
    if not len(responses) == len(answers) == len(records):
        raise ValueError(f"{len(responses)} responses, {len(answers)} answers, {len(records)} records")
    return [float(verifier(r, a, rec)) for r, a, rec in zip(responses, answers, records, strict=True)]


# ---- exact ----


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` in `text` (braces balanced), None when there is none or it is
    left open."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, begin = 1, start + len(_BOXED)
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i]
    return None


def final_answer(response: str) -> str:
    """The last `\\boxed{...}`, else the text after the last answer marker, else the whole response."""
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed
    markers = list(_ANSWER_MARKER.finditer(response))
    return response[markers[-1].end() :] if markers else response


def normalise(text: str) -> str:
    """Stripped, whitespace collapsed, case-folded, without a trailing period."""
    text = " ".join(text.split()).casefold()
    return text.removesuffix(".").rstrip()


def exact_match(response: str, answer: str | None, record: dict | None = None) -> float:
    """1.0 when `normalise(final_answer(response)) == normalise(answer)`; 0.0 otherwise or when answer is None."""
    if answer is None:
        return 0.0
    return float(normalise(final_answer(response)) == normalise(str(answer)))


# ---- math ----


def _math_verifier() -> Verifier:
    try:
        from math_verify import parse, verify
    except ImportError as exc:
        raise UserError("verifier 'math' needs the math-verify package: pip install math-verify") from exc

    def math_match(response: str, answer: str | None, record: dict | None = None) -> float:
        """1.0 when math-verify finds the response's answer equivalent to the reference answer."""
        if answer is None:
            return 0.0
        # math-verify's timeouts use SIGALRM, which only the main thread may set: elsewhere run without them.
        in_main = threading.current_thread() is threading.main_thread()
        timeouts = {} if in_main else {"parsing_timeout": None}
        gold_text = str(answer)
        if "$" not in gold_text and "\\boxed" not in gold_text:
            gold_text = f"${gold_text}$"  # so that a plain `0.5` or `1/2` is read as LaTeX math
        gold = parse(gold_text, **timeouts)
        pred = parse(response, **timeouts)
        verify_timeouts = {} if in_main else {"timeout_seconds": None}
        return float(bool(gold) and bool(pred) and verify(gold, pred, **verify_timeouts))

    return math_match


# ---- module:function ----


def _user_verifier(spec: str, source: str, name: str) -> Verifier:
    module = _import_file(spec, source) if source.endswith(".py") or "/" in source else _import_module(spec, source)
    fn = getattr(module, name, None)
    if fn is None:
        raise UserError(f"verifier {spec!r}: {source} has no attribute {name!r}")
    if not callable(fn):
        raise UserError(f"verifier {spec!r}: {name} is not callable (its type is {type(fn).__name__})")

    def user_verifier(response: str, answer: str | None, record: dict) -> float:
        try:
            score = fn(response, answer, record)
        except Exception as exc:
            raise UserError(f"verifier {spec!r} raised {type(exc).__name__}: {first_line(exc)}") from exc
        return _as_score(score, spec)

    return user_verifier


def _import_module(spec: str, dotted: str) -> Any:
    try:
        return importlib.import_module(dotted)
    except ModuleNotFoundError as exc:
        raise UserError(f"verifier {spec!r}: module {exc.name or dotted!r} not found") from exc
    except Exception as exc:
        raise UserError(f"verifier {spec!r}: importing {dotted} failed: {first_line(exc)}") from exc


def _import_file(spec: str, source: str) -> Any:
    path = Path(source).expanduser()
    if not path.is_file():
        raise UserError(f"verifier {spec!r}: file {source} not found")
    # A name of its own per file, so that two verifier files called the same never replace each other.
    module_name = f"tropd_user_verifier_{abs(hash(str(path.resolve())))}"
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise UserError(f"verifier {spec!r}: {source} is not a Python file")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up here
    try:
        loader_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise UserError(f"verifier {spec!r}: loading {source} failed: {type(exc).__name__}: {first_line(exc)}") from exc
    return module


def _as_score(score: Any, spec: str) -> float:
    """A user's result as a float in [0, 1]: a bool (numpy's too) or a real number; anything else is an error."""
    if isinstance(score, bool) or type(score).__name__ == "bool_":
        return float(bool(score))
    if isinstance(score, numbers.Real) and math.isfinite(score) and 0.0 <= score <= 1.0:
        return float(score)
    shown = repr(score) if isinstance(score, numbers.Real) else f"a {type(score).__name__}"
    raise UserError(f"verifier {spec!r} returned {shown[:80]}: it must return a bool or a number in [0, 1]")
