"""The toy world as a prompt source: the task mix of `data.toy`, the toy vocabulary, the task verifiers.

Draws exactly what the trainer drew before prompt sources existed (the same random calls in the same order), so
toy runs keep their results.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from trainer.config import DataConfig, EvalConfig
from trainer.data.source import Prompt
from trainer.toy import tasks
from trainer.toy.tokenizer import VOCAB
from tropd.errors import UserError

POOL = 20000


class ToySource:
    pad_id = VOCAB.pad_id
    stop_ids = (VOCAB.eos_id,)
    banned_ids = (VOCAB.pad_id, VOCAB.bos_id, VOCAB.sep_id)
    vocab_limit = None

    def __init__(self, config: DataConfig, student_dir: str | Path, seed: int):
        _check_toy_student(student_dir)
        self.mix = config.toy
        self.teachers = dict(config.toy_teachers)  # task -> its teacher's name (absent: the run's first)
        self.pools = {t: tasks.examples(t, "train", POOL, seed) for t in config.toy}

    def draw(self, rng: random.Random, n: int) -> list[Prompt]:
        names, weights = zip(*self.mix.items(), strict=True)
        chosen = rng.choices(names, weights, k=n)
        return [self._prompt(rng.choice(self.pools[t])) for t in chosen]

    def eval_sets(self, config: EvalConfig) -> dict[str, list[Prompt]]:
        return {t: [self._prompt(e) for e in tasks.examples(t, "eval", config.n)] for t in config.tasks}

    def kl_prompts(self, config: EvalConfig) -> list[Prompt]:
        per_task = max(1, config.kl_prompts // len(config.tasks))
        return [self._prompt(e) for t in config.tasks for e in tasks.examples(t, "eval", per_task)]

    def _prompt(self, example: tasks.Example) -> Prompt:
        return Prompt(VOCAB.prompt_ids(example.prompt), None, {"task": example.task, "prompt": example.prompt},
                      self.teachers.get(example.task))  # fmt: skip

    def decode(self, ids: list[int]) -> str:
        return VOCAB.decode(ids)

    def longest_prompt(self) -> int:
        return max(len(VOCAB.prompt_ids(e.prompt)) for pool in self.pools.values() for e in pool)

    def default_verifier(self) -> str:
        return "toy"

    def verifiers(self) -> dict:
        return {"toy": toy_verifier}


def toy_verifier(response: str, answer: str | None, record: dict) -> float:
    """The task's exact verifier (`trainer.toy.tasks.check`) on a toy prompt."""
    return float(tasks.check(record["task"], record["prompt"], response))


def _check_toy_student(student_dir: str | Path) -> None:
    """data.source toy speaks the toy vocabulary: refuse a student whose tokenizer is another."""
    path = Path(student_dir) / "tokenizer.json"
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))["model"]["vocab"]
    except (OSError, ValueError, KeyError, TypeError):
        vocab = None
    if not isinstance(vocab, dict) or any(vocab.get(t) != i for i, t in enumerate(VOCAB.tokens) if i >= 4):
        raise UserError(f"data.source toy needs a toy-world student (its character vocabulary); {student_dir} has "
                        "another tokenizer: use data.source=files with your prompt files")  # fmt: skip
