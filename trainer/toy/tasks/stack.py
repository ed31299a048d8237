"""`code`: run a tiny stack program (reverse Polish, digits and `+ *`).

The teacher prints the stack after each operation, the student only the result:

    prompt  1 7 7 * +         teacher  1 49;50;#50                   student  #50
"""

from __future__ import annotations

import random

from trainer.toy.tasks.answers import final_answer


def make(rng: random.Random) -> tuple[str, str, str]:
    a, b, c = (str(rng.randint(0, 9)) for _ in range(3))
    o1, o2 = rng.choice("+*"), rng.choice("+*")
    program = [a, b, c, o1, o2] if rng.random() < 0.5 else [a, b, o1, c, o2]
    trace = run(program)
    teacher = ";".join(" ".join(map(str, s)) for s in trace) + f";#{trace[-1][0]}"
    return " ".join(program), teacher, f"#{trace[-1][0]}"


def run(program: list[str]) -> list[list[int]]:
    """The stack after each operation."""
    return [after for *_, after in steps(program)]


def steps(program: list[str]) -> list[tuple[int, int, str, list[int]]]:
    """Each operation of `program` as (left operand, right operand, operator, the stack after it)."""
    stack: list[int] = []
    out = []
    for word in program:
        if word.isdigit():
            stack.append(int(word))
            continue
        right, left = stack.pop(), stack.pop()
        stack.append(left + right if word == "+" else left * right)
        out.append((left, right, word, list(stack)))
    return out


def check(prompt: str, response: str) -> bool:
    answer = final_answer(response)
    return answer is not None and answer.isdigit() and int(answer) == run(prompt.split())[-1][0]
