"""The answer of a toy task's response, as both styles write it (`...;#214` and `#214`).

A leaf module: the task families (`arith`, `stack`, `grammar`) check answers with it, and `trainer.toy.tasks`,
which lists those families, re-exports it.
"""

from __future__ import annotations


def final_answer(response: str) -> str | None:
    """The text after the last `#`, the answer in both styles; None when there is none."""
    if "#" not in response:
        return None
    return response.rsplit("#", 1)[1]
