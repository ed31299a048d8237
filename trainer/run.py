"""A run assembled: the prompt sources by name (`data.source`), and `train()` with them.

The one place that knows every source, the toy world's among them: the training loop (`trainer.train` and what it
imports) is handed its source by `open_source` and never imports the toy world. Above the loop and the sources,
below the commands (`trainer.cli`) and the benchmarks (`trainer.bench`).
"""

from __future__ import annotations

from pathlib import Path

from trainer import train as loop
from trainer.config import DataConfig, TrainConfig
from trainer.data.files import FileSource
from trainer.data.source import PromptSource
from trainer.toy.source import ToySource


def open_source(config: DataConfig, student_dir: str | Path, seed: int, log=print) -> PromptSource:
    """The prompt source `data.source` names; a bad data file or a student of another vocabulary stops here."""
    if config.source == "toy":
        return ToySource(config, student_dir, seed)
    return FileSource(config, student_dir, seed, log)


def plan(config: TrainConfig, log=print):
    """The memory plan (`trainer.plan`) of the run `config` describes, on this machine, without running it: what
    `train` checks at start, in the same state of the process (the loop's modules imported, the source opened)."""
    import os

    from trainer.models import resolve_dtype
    from trainer.parallel import resolve_device
    from trainer.plan import plan_run

    device = resolve_device(config.device)
    config = config.model_copy(update={"dtype": resolve_dtype(config.dtype, device)})
    source = open_source(config.data, config.student, config.seed, log)
    return plan_run(config, source.longest_prompt(), str(device), int(os.environ.get("WORLD_SIZE", "1")))


def train(config: TrainConfig, resume: bool = False, log=print) -> dict | None:
    """Run (or resume) training with the source the config names; the summary on rank 0, None on other ranks."""
    return loop.train(config, open_source, resume=resume, log=log)
