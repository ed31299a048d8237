"""Checkpoints: the student, optimizer, scheduler, RNG states, step and data cursor.

Two layouts, both resumable under any world size, DDP, FSDP or one process:
- whole (one process, DDP): `student/` a save_pretrained folder with the weights, and the optimizer state (keyed by
  parameter name) in `trainer_state.pt`;
- sharded (FSDP): `dcp/`, the model and optimizer state as `torch.distributed.checkpoint` wrote it, each rank its
  own shards (nothing gathered); `student/` then holds the config and tokenizer files only.
Each checkpoint is written to a temporary directory (`staging`) and renamed into place, so a directory named
`step-NNNNNN` is always complete; the last `keep` are kept. `latest()` finds the newest complete one.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch

from tropd.errors import UserError, first_line

PREFIX = "step-"
SHARDED = "dcp"  # the sharded state's folder in a checkpoint
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "tokenizer.model",
)


def staging(run_dir: Path, step: int) -> Path:
    """The temporary directory checkpoint `step` is written in (the same path on every rank)."""
    return run_dir / "checkpoints" / f".tmp-{PREFIX}{step:06d}"


def write_student(out: Path, model, tokenizer_from: Path, state_dict: dict | None = None, weights: bool = True) -> None:
    """A save_pretrained folder of the student: its weights (`state_dict`, else the model's own), config and the
    tokenizer files of `tokenizer_from`; without `weights`, the config and tokenizer only."""
    if weights:
        model.save_pretrained(out, safe_serialization=True, state_dict=state_dict)
    else:
        model.config.save_pretrained(out)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).is_file():
            shutil.copy2(tokenizer_from / name, out / name)


EXPORTS = "exports"  # the whole students written every `export_every` steps


def export(run_dir: Path, step: int, model, tokenizer_from: Path, state_dict: dict | None = None) -> Path:
    """The student of step `step` as a whole save_pretrained folder, `exports/step-NNNNNN` (written beside and
    renamed, so a folder of that name is always complete). `state_dict`: the state gathered from FSDP's shards;
    None: the model's own."""
    final = run_dir / EXPORTS / f"{PREFIX}{step:06d}"
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_student(tmp, model, tokenizer_from, state_dict)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def save(
    run_dir: Path,
    step: int,
    model,
    optimizer,
    scheduler,
    cursor: dict,
    state: dict,
    keep: int,
    tokenizer_from: Path,
    full_state: tuple[dict, dict] | None = None,
    sharded: bool = False,
) -> Path:
    """Write checkpoint `step`. `full_state` is (model state dict or None, optimizer state dict) as
    `DataParallel.full_state` gives them (the model state gathered from FSDP's shards, else None: the model's own);
    without it the model's and optimizer's own state dicts are saved. `sharded`: every rank has already written
    the model and optimizer state under `staging(...) / SHARDED` (`DataParallel.save_sharded`); the rest joins it."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = staging(run_dir, step)
    if not sharded:
        shutil.rmtree(tmp, ignore_errors=True)
    model_state, optimizer_state = full_state or (None, None if sharded else optimizer.state_dict())
    write_student(tmp / "student", model, tokenizer_from, model_state, weights=not sharded)
    torch.save(
        {
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "cursor": cursor,
            "python_random": random.getstate(),
            "torch_random": torch.get_rng_state(),
        },
        tmp / "trainer_state.pt",
    )
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(p for p in root.iterdir() if p.name.startswith(PREFIX))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(run_dir: Path) -> Path | None:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "state.json").is_file())
    return done[-1] if done else None


def is_sharded(path: Path) -> bool:
    """Whether checkpoint `path` holds its model and optimizer state sharded (`dcp/`) rather than whole."""
    return (path / SHARDED / ".metadata").is_file()


def step_of(path: Path) -> int:
    """The step a checkpoint directory `step-NNNNNN` was written at."""
    return int(path.name.removeprefix(PREFIX))


def load_state(path: Path) -> tuple[dict, dict]:
    """(trainer state from trainer_state.pt, state.json); restores the global RNGs. A damaged checkpoint is a
    UserError that names it."""
    try:
        blob = torch.load(path / "trainer_state.pt", weights_only=False, map_location="cpu")
        state = json.loads((path / "state.json").read_text())
        if not isinstance(blob, dict) or not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("unexpected contents")
        missing = {"optimizer", "scheduler", "cursor"} - blob.keys()
        if missing:
            raise ValueError(f"no {', '.join(sorted(missing))}")
        if blob["optimizer"] is None and not is_sharded(path):
            raise ValueError(f"no optimizer state and no {SHARDED}/")
        random.setstate(blob["python_random"])
        torch.set_rng_state(blob["torch_random"])
    except Exception as exc:  # torch.load, json and the RNG setters raise many kinds; all mean "damaged"
        raise UserError(f"checkpoint {path} is damaged ({first_line(exc)}): remove it to resume from the one "
                        "before") from None  # fmt: skip
    return blob, state
