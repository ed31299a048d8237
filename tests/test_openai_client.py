"""`VLLMOpenAIClient` against a real stock vLLM OpenAI server on the quick toy teacher, checked against an
independent transformers float32 forward pass."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import httpx
import numpy as np
import pytest

from services.teacher.client import TeacherError
from services.teacher.openai_client import VLLMOpenAIClient
from trainer.config import TeacherConfig
from trainer.teacher_link import TeacherLink
from trainer.toy.tokenizer import VOCAB
from tropd.errors import UserError

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def server(stock_vllm_teacher):
    """The stock server with its tokenizer loaded, as the trainer's start-up probe needs it: the session's
    (tests/conftest.py, `--max-logprobs 20`), shared with tests/test_completions_api.py and the teacher bench."""
    return stock_vllm_teacher.get()


tokenizing_server = server


def sequences(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[VOCAB.bos_id] + [rng.randrange(VOCAB.size) for _ in range(rng.randrange(8, 60))] for _ in range(n)]


def score(url: str, seqs, start, k: int, **options):
    async def go():
        async with VLLMOpenAIClient(url, vocab_size=VOCAB.size, **options) as client:
            return await client.score(seqs, start, k)

    return asyncio.run(go())


@pytest.mark.parametrize("k", [5, 1])
def test_scores_match_transformers(server, reference, k):
    seqs = sequences(12, seed=k)
    starts = [1 + (i % 5) for i in range(len(seqs))]
    results = score(server.url, seqs, starts, k)
    for seq, s, r in zip(seqs, starts, results, strict=True):
        chosen, top_ids, top_lp = reference(seq, s, k)
        assert r.logprobs.shape == (len(seq) - s,) and r.logprobs.dtype == np.float32
        assert r.top_ids.shape == r.top_logprobs.shape == (len(seq) - s, k) and r.top_ids.dtype == np.int32
        np.testing.assert_allclose(r.logprobs, chosen, atol=1e-4)
        np.testing.assert_allclose(r.top_logprobs, top_lp, atol=1e-4)
        for got, want in zip(r.top_ids, top_ids, strict=True):
            assert set(got.tolist()) == set(want.tolist())
        assert np.all(np.diff(r.top_logprobs, axis=1) <= 0)


def test_top_k_zero_gives_the_chosen_tokens_only(server, reference):
    seqs = sequences(4, seed=9)
    for seq, r in zip(seqs, score(server.url, seqs, 1, 0), strict=True):
        assert r.top_ids.shape == (len(seq) - 1, 0)
        np.testing.assert_allclose(r.logprobs, reference(seq, 1, 1)[0], atol=1e-4)


def test_info(server):
    async def go():
        async with VLLMOpenAIClient(server.url, vocab_size=VOCAB.size) as client:
            return await client.info()

    info = asyncio.run(go())
    assert info["engine"] == "vllm-openai" and info["model"].endswith("teacher")
    assert info["max_model_len"] == 512 and info["vocab_size"] == VOCAB.size
    assert info["tokenizer_sha256"] is None


def test_bad_input_is_refused(server):
    # an out-of-range id would crash the stock server's engine (--skip-tokenizer-init): refused before sending
    with pytest.raises(TeacherError) as bad_id:
        score(server.url, [[1, 2, VOCAB.size]], 1, 5)
    assert bad_id.value.field == "sequences[0][2]"
    with pytest.raises(TeacherError) as bad_start:
        score(server.url, [[1, 2, 3]], 3, 5)
    assert bad_start.value.field == "start[0]"
    with pytest.raises(TeacherError) as too_many:  # over the server's --max-logprobs: its 400
        score(server.url, [[1, 2, 3]], 1, 21, retries=0)
    assert too_many.value.status == 400
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_continue_is_not_offered(server):
    async def go():
        async with VLLMOpenAIClient(server.url) as client:
            await client.continue_([[1, 2]], 3)

    with pytest.raises(NotImplementedError):
        asyncio.run(go())


def checked_link(url: str, student: Path, **options) -> TeacherLink:
    link = TeacherLink(TeacherConfig(api="vllm-openai", url=url, retries=0, **options))
    try:
        link.check(str(student), top_k=5)
    finally:
        link.close()
    return link


def test_a_stock_server_that_cannot_tokenize_is_refused_unless_the_user_opts_out(toy_vllm_teacher, toy_quick):
    # a server without `/tokenize` (as a stock server started with --skip-tokenizer-init answers it): our service,
    # which serves the OpenAI-compatible `/v1/models` and `/v1/completions` but no `/tokenize`
    url = toy_vllm_teacher.get().url
    with pytest.raises(UserError, match="cannot tokenize .*teacher.skip_tokenizer_check=true"):
        checked_link(url, toy_quick / "student")
    link = checked_link(url, toy_quick / "student", skip_tokenizer_check=True)
    assert link.client.vocab_size == VOCAB.size  # ids past the student's tokenizer never reach the server


def test_a_stock_server_with_another_tokenizer_is_refused(tokenizing_server, toy_quick, realworld):
    assert checked_link(tokenizing_server.url, toy_quick / "student").client.vocab_size == VOCAB.size
    with pytest.raises(UserError, match="tokenizes a probe text differently"):
        checked_link(tokenizing_server.url, realworld / "student")


def test_trainer_runs_against_the_stock_server(tokenizing_server, toy_quick, tmp_path):
    """`teacher.api: vllm-openai`: a short TrOPD run (no guidance: the stock server offers no drafts)."""
    import json

    from trainer.config import load_config
    from trainer.run import train

    out = tmp_path / "run"
    config = load_config(
        None,
        [f"student={toy_quick / 'student'}", f"out={out}", "teacher.api=vllm-openai",
         f"teacher.url={tokenizing_server.url}",
         "guidance.enabled=false", "steps=4", "rollout.prompts_per_step=4", "rollout.max_new_tokens=24",
         "eval.before_after=false", "eval.every=0", "tensorboard=false", "plot=false", "checkpoint_every=0"],
    )  # fmt: skip
    summary = train(config, log=lambda *_: None)
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and summary["skipped_steps"] == 0
    assert all(np.isfinite(r["loss"]) and r["teacher_latency_s"] > 0 for r in steps)


def test_a_scoring_temperature_is_refused_at_start_on_a_stock_server(tokenizing_server, toy_quick):
    """vLLM's stock server takes prompt log-probs at temperature 1 whatever the request says: refused, not ignored."""
    with pytest.raises(UserError, match=r"teacher.temperature=0.7 .*temperature 1 only"):
        checked_link(tokenizing_server.url, toy_quick / "student", temperature=0.7)
