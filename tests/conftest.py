"""Shared fixtures: the quick toy world and a real-shaped world (each built once per checkout and cached under
artifacts/)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def toy_quick() -> Path:
    from trainer.toy import world

    out = Path(os.environ.get("TROPD_TEST_TOY", ROOT / "artifacts" / "toy-quick"))
    world.build(out, seed=0, quick=True)
    return out


@pytest.fixture(scope="session")
def realworld() -> Path:
    """A byte-level BPE tokenizer with ChatML, a Qwen3 teacher and student, JSONL prompt sets (tests/realworld.py)."""
    from tests.realworld import build_realworld

    return build_realworld(Path(os.environ.get("TROPD_TEST_REALWORLD", ROOT / "artifacts" / "realworld")))


@pytest.fixture(scope="module")
def reference(toy_quick):
    """An independent transformers float32 forward pass, one sequence at a time."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(toy_quick / "teacher", dtype=torch.float32).eval()

    def score(seq: list[int], start: int, k: int):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), -1)
        rows = logp[start - 1 : len(seq) - 1]
        chosen = rows.gather(-1, torch.tensor(seq[start:])[:, None])[:, 0]
        top = rows.topk(k, -1)
        return chosen.numpy(), top.indices.numpy(), top.values.numpy()

    return score


# Fixtures that build or load a model world, start a service or train: a test that uses one is `slow`, and
# `make test-fast` (pytest -m "not slow") leaves it out. Markers of whole kinds of slow tests do the same.
SLOW_FIXTURES = {"toy_quick", "realworld", "reference"}
SLOW_MARKERS = {"vllm", "gpu", "reliability"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        slow_fixture = SLOW_FIXTURES & set(getattr(item, "fixturenames", ()))
        if slow_fixture or any(item.get_closest_marker(name) for name in SLOW_MARKERS):
            item.add_marker(pytest.mark.slow)
