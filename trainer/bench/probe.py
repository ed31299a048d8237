"""What a final student of `tropd bench methods` writes, beside its teacher, and whether the teacher backs its errors.

Two things per run, on held-out prompts (the eval split, the same prompts for every method):

- `examples`: the greedy answers of the student and of the teacher to the first few prompts of each task, with the
  right answer;
- `agreement`: over the student's wrong greedy answers that end in a final answer (`...#A`), how often the teacher
  prefers that wrong answer to the right one at the same place. For a wrong response `r = c + "#" + a_S` (c: the
  student's own scratchpad, a_S: its final answer) and the right final answer a*, with x the prompt,

      gap = log p_T(a_S <eos> | x, c#) - log p_T(a* <eos> | x, c#)

  (sums of the teacher's per-token log-probs); the teacher backs the error when gap > 0. Reverse KL on the student's
  own samples rewards exactly such answers: a student that miscopies an operand into the teacher's scratchpad is
  trained towards whatever the teacher says after that wrong prefix, which it never saw in training.
"""

from __future__ import annotations

import statistics

import torch

from trainer.rollout.sampling import response_forward
from trainer.toy import tasks, world
from trainer.toy.tokenizer import VOCAB

SHOWN = 3  # greedy answers shown per task
MEASURED = 100  # prompts per task for the agreement measure (the first SHOWN are among them)


def right_answer(example: tasks.Example) -> str:
    """The final answer of the teacher-style reference (for `general`, the canonical closing)."""
    return tasks.final_answer(example.teacher) or ""


@torch.no_grad()
def answer_logprobs(teacher, prompt: str, context: str, answers: list[str]) -> list[float]:
    """log p_T(a <eos> | prompt, context) for each answer a: the sum of the teacher's per-token log-probs."""
    prompt_ids = VOCAB.prompt_ids(prompt)
    responses = [VOCAB.encode(context + a) + [VOCAB.eos_id] for a in answers]
    logprobs_B_T, mask_B_T, _ = response_forward(teacher, [prompt_ids] * len(answers), responses, VOCAB.pad_id)
    start = len(VOCAB.encode(context))
    return [logprobs_B_T[i, start : int(mask_B_T[i].sum())].sum().item() for i in range(len(answers))]


def teacher_gap(teacher, example: tasks.Example, response: str) -> float | None:
    """`gap` of the module docstring for a wrong response; None when it has no final answer to compare."""
    answer = tasks.final_answer(response)
    if answer is None:
        return None
    context = response[: len(response) - len(answer)]
    wrong, right = answer_logprobs(teacher, example.prompt, context, [answer, right_answer(example)])
    return wrong - right


def probe(student_dir: str, teacher_dir: str, task_names: tuple[str, ...], n: int = MEASURED) -> dict:
    """Greedy answers of the student and the teacher on the first `n` eval prompts of each task: the first few
    shown side by side, and the teacher's agreement with the student's wrong answers (module docstring)."""
    world.quiet_transformers()
    student, teacher = world.load_model(student_dir), world.load_model(teacher_dir)
    examples, agreement = [], {}
    for task in task_names:
        exs = tasks.examples(task, "eval", n)
        prompts = [e.prompt for e in exs]
        mine, theirs = world.generate(student, prompts), world.generate(teacher, prompts)
        for e, s, t in list(zip(exs, mine, theirs, strict=True))[:SHOWN]:
            examples.append({"task": task, "prompt": e.prompt, "right": right_answer(e), "student": s, "teacher": t,
                             "correct": tasks.check(task, e.prompt, s)})  # fmt: skip
        wrong = [(e, s) for e, s in zip(exs, mine, strict=True) if not tasks.check(task, e.prompt, s)]
        gaps = [g for g in (teacher_gap(teacher, e, s) for e, s in wrong) if g is not None]
        agreement[task] = {
            "n": n,
            "wrong": len(wrong),
            "with_answer": len(gaps),
            "teacher_prefers_wrong": sum(g > 0 for g in gaps),
            "median_gap": statistics.median(gaps) if gaps else None,
        }
    return {"examples": examples, "agreement": agreement}
