"""`math`: two-step arithmetic. The teacher writes every intermediate result, the student only the answer.

prompt  97+57+60          teacher  97+57=154;154+60=214;#214      student  #214
prompt  12*7+40           teacher  12*7=84;84+40=124;#124         student  #124
"""

from __future__ import annotations

import random

from trainer.toy.tasks.answers import final_answer


def make(rng: random.Random) -> tuple[str, str, str]:
    if rng.random() < 0.5:
        a, b, c = rng.randint(0, 99), rng.randint(0, 99), rng.randint(0, 99)
        first, op = a + b, "+"
    else:
        a, b, c = rng.randint(0, 99), rng.randint(0, 9), rng.randint(0, 99)
        first, op = a * b, "*"
    total = first + c
    prompt = f"{a}{op}{b}+{c}"
    teacher = f"{a}{op}{b}={first};{first}+{c}={total};#{total}"
    return prompt, teacher, f"#{total}"


def solve(prompt: str) -> int:
    head, c = prompt.rsplit("+", 1)
    if "*" in head:
        a, b = head.split("*")
        return int(a) * int(b) + int(c)
    a, b = head.split("+")
    return int(a) + int(b) + int(c)


def check(prompt: str, response: str) -> bool:
    answer = final_answer(response)
    return answer is not None and answer.isdigit() and int(answer) == solve(prompt)
