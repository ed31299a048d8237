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
    """An independent transformers float32 forward pass, one sequence at a time; log-softmax(logits / temperature)
    in float64."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(toy_quick / "teacher", dtype=torch.float32).eval()

    def score(seq: list[int], start: int, k: int, temperature: float = 1.0):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].double() / temperature, -1)
        rows = logp[start - 1 : len(seq) - 1]
        chosen = rows.gather(-1, torch.tensor(seq[start:])[:, None])[:, 0]
        top = rows.topk(k, -1)
        return chosen.numpy(), top.indices.numpy(), top.values.numpy()

    return score


# ---- vLLM teacher services shared between modules ---------------------------------------------------------
# A vLLM start-up takes 20-50 s on 2 cores. Tests that only send requests to a vLLM teacher share one service per
# world (the modules named below); tests that stop, kill or reconfigure a teacher start their own. A shared service
# starts when a test first asks for it and stops after the last test of the session that uses its fixture (it must
# exit 0 then), so that an idle vLLM process does not outlive its users. Since it may idle beside other tests' vLLM
# processes meanwhile, its KV cache is 1 GiB (as docker-compose.yml's teacher has it; 1.7 GB resident in all on the
# toy teacher) instead of vLLM's CPU default of 15% of the machine's memory.
SHARED_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_USE_AOT_COMPILE": "0"}


class SharedService:
    """One teacher service, started on the first `get()` and stopped after the last test that uses `fixture`."""

    def __init__(self, fixture: str, start, stop=None):
        self.fixture, self._start, self._stop, self._service = fixture, start, stop, None

    @property
    def running(self) -> bool:
        return self._service is not None

    def get(self):
        if self._service is None:
            self._service = self._start()
        return self._service

    def stop(self) -> None:
        service, self._service = self._service, None
        if service is not None and self._stop is not None:
            self._stop()
        elif service is not None:
            assert service.stop() == 0, service.log()[-3000:]  # a graceful exit on SIGTERM, no crash at exit


_SHARED: dict[str, SharedService] = {}


def _shared(fixture: str, start, stop=None):
    _SHARED[fixture] = shared = SharedService(fixture, start, stop)
    yield shared
    shared.stop()
    del _SHARED[fixture]


@pytest.fixture(scope="session")
def toy_vllm_teacher(toy_quick, tmp_path_factory):
    """`tropd teacher serve --engine vllm` on the quick toy teacher, default options (tests/test_service.py,
    tests/test_completions_api.py)."""
    from tests.helpers import start_teacher

    logs = tmp_path_factory.mktemp("toy-vllm-teacher")
    yield from _shared("toy_vllm_teacher", lambda: start_teacher(toy_quick / "teacher", "vllm", logs, env=SHARED_ENV))


@pytest.fixture(scope="session")
def realworld_vllm_teacher(realworld, tmp_path_factory):
    """`tropd teacher serve --engine vllm` on the real-shaped world's teacher, its top-k limit the model's whole
    vocabulary, padded rows included (tests/test_realworld.py, tests/test_realworld_train.py)."""
    import json

    from tests.helpers import start_teacher

    vocab = json.loads((realworld / "teacher" / "config.json").read_text())["vocab_size"]
    logs = tmp_path_factory.mktemp("realworld-vllm-teacher")

    def start():
        return start_teacher(realworld / "teacher", "vllm", logs, "--max-top-k", str(vocab), env=SHARED_ENV)

    yield from _shared("realworld_vllm_teacher", start)


@pytest.fixture(scope="session")
def stock_vllm_teacher(toy_quick, tmp_path_factory):
    """vLLM's stock OpenAI server on the quick toy teacher, with its tokenizer (echo and `/tokenize` need it) and
    tokens as `token_id:<id>` (tests/test_completions_api.py, tests/test_openai_client.py)."""
    import contextlib
    import os

    from services.teacher.openai_client import stock_vllm

    logs = tmp_path_factory.mktemp("stock-vllm")
    stack = contextlib.ExitStack()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **SHARED_ENV}
    extra = ("--return-tokens-as-token-ids",)

    def start():
        server = stock_vllm(toy_quick / "teacher", logs / "stock.log", 20, env, 240, tokenizer=True, extra=extra)
        return stack.enter_context(server)

    yield from _shared("stock_vllm_teacher", start, stop=stack.close)


@pytest.fixture(autouse=True)
def _stop_shared_services_after_their_last_test(request):
    yield
    if any(shared.running for shared in _SHARED.values()):
        later = request.session.items[request.session.items.index(request.node) + 1 :]
        for shared in list(_SHARED.values()):
            if not any(shared.fixture in item.fixturenames for item in later):
                shared.stop()


# Fixtures that build or load a model world, start a service or train: a test that uses one is `slow`, and
# `make test-fast` (pytest -m "not slow") leaves it out. Markers of whole kinds of slow tests do the same.
SLOW_FIXTURES = {"toy_quick", "realworld", "reference", "toy_vllm_teacher", "realworld_vllm_teacher",
                 "stock_vllm_teacher"}  # fmt: skip
SLOW_MARKERS = {"vllm", "gpu", "reliability"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        slow_fixture = SLOW_FIXTURES & set(getattr(item, "fixturenames", ()))
        if slow_fixture or any(item.get_closest_marker(name) for name in SLOW_MARKERS):
            item.add_marker(pytest.mark.slow)
