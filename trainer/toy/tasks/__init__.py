"""Synthetic task families with exact verifiers: `math`, `code` and `general`.

Each family yields `Example(prompt, teacher, student, answer)`: the prompt text, the response in the
teacher's style (a worked scratchpad), the response in the student's warm-start style (answer only), and
the value the verifier wants. Train and eval splits are disjoint by a hash of the prompt.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

from trainer.toy.tasks import arith, grammar, stack
from trainer.toy.tasks.answers import final_answer as final_answer  # the answer parser, re-exported


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    teacher: str
    student: str


@dataclass(frozen=True)
class Task:
    name: str
    make: Callable[[random.Random], tuple[str, str, str]]
    check: Callable[[str, str], bool]


TASKS: dict[str, Task] = {
    "math": Task("math", arith.make, arith.check),
    "code": Task("code", stack.make, stack.check),
    "general": Task("general", grammar.make, grammar.check),
}
SPLITS = ("train", "eval")


def in_eval_split(prompt: str) -> bool:
    """About one prompt in ten belongs to the eval split, fixed by the prompt text alone."""
    return hashlib.sha256(prompt.encode()).digest()[0] < 26


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: choose from {', '.join(TASKS)}")
    return TASKS[name]


def examples(task: str, split: str, n: int, seed: int = 0) -> list[Example]:
    """`n` examples of `task` from `split`, deterministic for a seed. Eval examples are distinct."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: choose from {', '.join(SPLITS)}")
    spec = get_task(task)
    rng = random.Random(f"{task}/{split}/{seed}")
    out: list[Example] = []
    seen: set[str] = set()
    want_eval = split == "eval"
    for _ in range(n * 200):
        if len(out) == n:
            break
        prompt, teacher, student = spec.make(rng)
        if in_eval_split(prompt) != want_eval or (want_eval and prompt in seen):
            continue
        seen.add(prompt)
        out.append(Example(task, prompt, teacher, student))
    if len(out) < n:
        raise ValueError(f"task {task!r} has fewer than {n} distinct {split} prompts")
    return out


def check(task: str, prompt: str, response: str) -> bool:
    """True when `response` (either style) answers `prompt` correctly."""
    return get_task(task).check(prompt, response)
