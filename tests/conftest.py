"""Shared fixtures: the quick toy world (built once per checkout and cached under artifacts/)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def toy_quick() -> Path:
    from trainer import toy

    out = Path(os.environ.get("TROPD_TEST_TOY", ROOT / "artifacts" / "toy-quick"))
    toy.build(out, seed=0, quick=True)
    return out
