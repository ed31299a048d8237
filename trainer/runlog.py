"""The run log: metrics.jsonl (one JSON record a step), TensorBoard scalars, and the records' helpers."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def metrics_record(line: str) -> dict | None:
    """A metrics.jsonl line as a record with an integer step, or None."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


class RunLog:
    """metrics.jsonl and TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int):
        self.path = run_dir / "metrics.jsonl"
        if resume_step and self.path.is_file():  # drop steps after the checkpoint: they will run again
            kept = []
            for number, line in enumerate(self.path.read_text().splitlines(), 1):
                record = metrics_record(line)
                if record is None:
                    if line.strip():
                        print(f"[train] {self.path} line {number} is not a metrics record: dropped", file=sys.stderr)
                elif record["step"] <= resume_step and not record.get("final"):
                    kept.append(json.dumps(record))
            self.path.write_text("".join(line + "\n" for line in kept))
        elif not resume_step:
            self.path.write_text("")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in flatten(record, "/").items():
                if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def flatten(record: dict, sep: str = ".", prefix: str = "") -> dict:
    """Nested mappings as one level with joined keys: {"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(flatten(value, sep, f"{prefix}{key}{sep}"))
        else:
            out[f"{prefix}{key}"] = value
    return out
