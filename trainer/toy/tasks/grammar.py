"""`general`: close a bracket string so that it is balanced (a Dyck language over `()` and `[]`).

The teacher first writes the stack of open brackets, then the closing; the student style is the closing alone
(the toy student's warm start drills the teacher's style here: trainer/toy/world.py). Any closing that balances the
string is correct:

    prompt  ([]((             teacher  (((;#)))                      student  #)))
"""

from __future__ import annotations

import random

from trainer.toy.tasks.answers import final_answer

PAIRS = {"(": ")", "[": "]"}


def make(rng: random.Random) -> tuple[str, str, str]:
    text: list[str] = []
    stack: list[str] = []
    for _ in range(rng.randint(4, 14)):
        if not stack or rng.random() < 0.6:
            stack.append(rng.choice("(["))
            text.append(stack[-1])
        else:
            text.append(PAIRS[stack.pop()])
    if not stack:
        stack.append(rng.choice("(["))
        text.append(stack[-1])
    closing = "".join(PAIRS[c] for c in reversed(stack))
    return "".join(text), "".join(stack) + ";#" + closing, "#" + closing


def balanced(text: str) -> bool:
    stack: list[str] = []
    for ch in text:
        if ch in PAIRS:
            stack.append(ch)
        elif ch in ")]":
            if not stack or PAIRS[stack.pop()] != ch:
                return False
        else:
            return False
    return not stack


def check(prompt: str, response: str) -> bool:
    answer = final_answer(response)
    return answer is not None and answer != "" and balanced(prompt + answer)
