"""Checks of a Hugging Face model directory given by the user, before any engine loads it: a missing or
damaged directory is a one-line `UserError` naming it, not a traceback from deep inside a library."""

from __future__ import annotations

import json
from pathlib import Path

from tropd.errors import UserError, first_line

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def check_model_dir(path: str | Path, what: str = "model", tokenizer: bool = True) -> Path:
    """`path` as a Path once it holds a readable config.json, weights (a safetensors file's header is read)
    and, with `tokenizer`, tokenizer files."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{what} directory {str(path)!r} not found (no config.json there)")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{what} directory {str(path)!r}: config.json is not readable JSON ({exc})") from None
    if not isinstance(config, dict) or not config.get("model_type"):
        raise UserError(f"{what} directory {str(path)!r}: config.json names no model_type")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise UserError(f"{what} directory {str(path)!r} has no weights (none of {', '.join(WEIGHT_FILES)})")
    if (path / "model.safetensors").is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(path / "model.safetensors"), framework="pt") as f:
                f.keys()
        except Exception as exc:  # safetensors raises its own error type (and OSError) for a damaged file
            raise UserError(
                f"{what} directory {str(path)!r}: model.safetensors is damaged ({first_line(exc)})"
            ) from None
    if tokenizer and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"{what} directory {str(path)!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    return path
