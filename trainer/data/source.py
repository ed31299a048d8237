"""What a prompt source gives the trainer: `Prompt`s, and the `PromptSource` interface every source implements.

A leaf module: the sources (`trainer.data.files.FileSource`, `trainer.toy.source.ToySource`) and the trainer core that
draws from them import it, so no source imports another to learn the interface.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from trainer.config import DataConfig, EvalConfig


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    answer: str | None = None
    record: dict = field(default_factory=dict)  # what a verifier may read (the file's record, or the toy task)
    teacher: str | None = None  # the name of the teacher that scores it (None: the run's first)
    teacher_ids: list[int] | None = None  # the teacher's own context in place of `ids` (None: the student's prompt)


class PromptSource(Protocol):
    pad_id: int
    stop_ids: tuple[int, ...]  # a response ends at any of them
    banned_ids: tuple[int, ...]  # never sampled (besides ids >= vocab_limit)
    vocab_limit: int | None  # ids at or above it are rows of the embedding table with no token

    def draw(self, rng: random.Random, n: int) -> list[Prompt]: ...

    def eval_sets(self, config: EvalConfig) -> dict[str, list[Prompt]]: ...

    def kl_prompts(self, config: EvalConfig) -> list[Prompt]: ...

    def decode(self, ids: list[int]) -> str: ...

    def longest_prompt(self) -> int: ...  # tokens of the longest prompt it may give (the memory plan's)

    def default_verifier(self) -> str: ...

    def verifiers(self) -> dict[str, Callable[[str, str | None, dict], float]]: ...  # the source's own, by name


# (data config, student directory, seed, log) -> the source: how the loop is handed its prompts (`trainer.run`)
SourceOpener = Callable[[DataConfig, str | Path, int, Callable[..., None]], PromptSource]
