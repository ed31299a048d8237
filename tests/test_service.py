"""The real teacher service (each engine, on the quick toy teacher) over real HTTP."""

from __future__ import annotations

import asyncio
import random

import httpx
import numpy as np
import pytest

from services.teacher.client import TeacherClient, TeacherError
from services.teacher.protocol import BINARY_MEDIA_TYPE, decode_results, tokenizer_fingerprint
from tests.helpers import teacher
from trainer.toy import tasks
from trainer.toy.tokenizer import VOCAB

ENGINES = ["hf", pytest.param("vllm", marks=pytest.mark.vllm)]


@pytest.fixture(scope="module", params=ENGINES)
def service(request, toy_quick, toy_vllm_teacher, tmp_path_factory):
    if request.param == "vllm":  # one vLLM service, shared with tests/test_completions_api.py (tests/conftest.py)
        yield toy_vllm_teacher.get()
        return
    with teacher(toy_quick / "teacher", request.param, tmp_path_factory.mktemp("logs")) as svc:
        yield svc
    assert svc.process.returncode == 0, svc.log()[-3000:]  # graceful exit on SIGTERM, no crash at exit


def sequences(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        task = list(tasks.TASKS)[i % 3]
        ex = tasks.examples(task, "eval", n, seed)[i]
        response = ex.teacher if rng.random() < 0.5 else ex.student
        out.append(VOCAB.prompt_ids(ex.prompt) + VOCAB.encode(response) + [VOCAB.eos_id])
    return out


def run(coro):
    return asyncio.run(coro)


async def _score(url, seqs, start, k, binary=True, temperature=1.0):
    async with TeacherClient(url, binary=binary) as client:
        return await client.score(seqs, start, k, temperature)


def test_info(service, toy_quick):
    info = httpx.get(f"{service.url}/v1/info").json()
    assert info["protocol"] == 1
    assert info["vocab_size"] == VOCAB.size
    assert info["tokenizer_sha256"] == tokenizer_fingerprint(toy_quick / "teacher")
    assert info["max_top_k"] == 20 and info["eos_id"] == VOCAB.eos_id
    assert info["engine"] in ("hf", "vllm")
    assert httpx.get(f"{service.url}/healthz").status_code == 200
    assert httpx.get(f"{service.url}/readyz").status_code == 200


def test_scores_match_transformers(service, reference):
    seqs = sequences(24)
    starts = [1 + (i % 7) for i in range(len(seqs))]
    results = run(_score(service.url, seqs, starts, 5))
    for seq, s, r in zip(seqs, starts, results, strict=True):
        chosen, top_ids, top_lp = reference(seq, s, 5)
        assert r.logprobs.shape == (len(seq) - s,)
        np.testing.assert_allclose(r.logprobs, chosen, atol=1e-4)
        np.testing.assert_allclose(r.top_logprobs, top_lp, atol=1e-4)
        for got, want in zip(r.top_ids, top_ids, strict=True):
            assert set(got.tolist()) == set(want.tolist())
        assert np.all(np.diff(r.top_logprobs, axis=1) <= 0)


def test_scores_at_a_temperature_match_transformers(service, reference):
    """Scores at T = 0.7 are log-softmax(logits / 0.7), also when one engine batch mixes temperatures."""
    info = httpx.get(f"{service.url}/v1/info").json()
    assert info["score_temperature"] is True
    seqs = sequences(8, seed=3)

    async def both():
        return await asyncio.gather(_score(service.url, seqs, 2, 5, temperature=0.7), _score(service.url, seqs, 2, 5))

    cooled, plain = run(both())
    tol = 1e-5 if info["engine"] == "hf" else 1e-4
    for seq, r, r1 in zip(seqs, cooled, plain, strict=True):
        chosen, top_ids, top_lp = reference(seq, 2, 5, temperature=0.7)
        np.testing.assert_allclose(r.logprobs, chosen, atol=tol)
        np.testing.assert_allclose(r.top_logprobs, top_lp, atol=tol)
        np.testing.assert_allclose(r1.logprobs, reference(seq, 2, 5)[0], atol=1e-4)  # the other temperature's
        assert not np.allclose(r.logprobs, r1.logprobs, atol=1e-3)


def test_binary_and_json_agree_exactly(service):
    seqs = sequences(12, seed=1)
    a = run(_score(service.url, seqs, 2, 4, binary=True))
    b = run(_score(service.url, seqs, 2, 4, binary=False))
    for x, y in zip(a, b, strict=True):
        assert x.logprobs.dtype == y.logprobs.dtype == np.float32
        assert np.array_equal(x.logprobs, y.logprobs)
        assert np.array_equal(x.top_ids, y.top_ids)
        assert np.array_equal(x.top_logprobs, y.top_logprobs)
    raw = httpx.post(
        f"{service.url}/v1/score", json={"sequences": seqs, "top_k": 0}, headers={"accept": BINARY_MEDIA_TYPE}
    )
    assert raw.headers["content-type"].startswith(BINARY_MEDIA_TYPE)
    results, usage = decode_results(raw.content)
    assert usage["tokens"] == sum(len(s) - 1 for s in seqs)
    assert results[0].top_ids.shape == (len(seqs[0]) - 1, 0)


def test_continuation_logprobs_match_scoring(service):
    prefixes = [VOCAB.prompt_ids(e.prompt) for e in tasks.examples("math", "eval", 6)]

    async def go():
        async with TeacherClient(service.url) as client:
            drafts = await client.continue_(prefixes, 30, temperature=1.0, seed=7, top_k=3)
            again = await client.continue_(prefixes, 30, temperature=1.0, seed=7, top_k=3)
            greedy = await client.continue_(prefixes, 30, temperature=0, top_k=3)
            scored = await client.score(
                [p + d.token_ids.tolist() for p, d in zip(prefixes, drafts, strict=True)], [len(p) for p in prefixes], 3
            )
            return drafts, again, greedy, scored

    drafts, again, greedy, scored = run(go())
    for d, a, g, s in zip(drafts, again, greedy, scored, strict=True):
        assert len(d.token_ids) >= 1 and d.finish_reason in ("stop", "length")
        if d.finish_reason == "stop":
            assert d.token_ids[-1] == VOCAB.eos_id
        assert np.array_equal(d.token_ids, a.token_ids)  # same seed, same draft
        np.testing.assert_allclose(d.logprobs, s.logprobs, atol=1e-4)
        np.testing.assert_allclose(d.top_logprobs, s.top_logprobs, atol=1e-4)
        assert np.array_equal(g.token_ids[:1], g.top_ids[:1, 0])  # greedy takes the top token
        assert d.top_ids.shape == (len(d.token_ids), 3)


def test_concurrent_clients_all_get_correct_answers(service, reference):
    pool = sequences(30, seed=2)
    want = {i: reference(seq, 1, 3) for i, seq in enumerate(pool)}

    async def client_task(c: int) -> int:
        rng = random.Random(c)
        checked = 0
        async with TeacherClient(service.url) as client:
            for _ in range(50):
                picks = rng.sample(range(len(pool)), rng.randint(1, 6))
                results = await client.score([pool[i] for i in picks], 1, 3)
                for i, r in zip(picks, results, strict=True):
                    np.testing.assert_allclose(r.logprobs, want[i][0], atol=1e-4)
                    checked += 1
        return checked

    async def go():
        return await asyncio.gather(*(client_task(c) for c in range(8)))

    assert sum(run(go())) >= 400
    metrics = httpx.get(f"{service.url}/metrics").text
    assert 'tropd_requests_total{route="/v1/score",status="200"}' in metrics
    assert "tropd_batch_sequences_count" in metrics


BAD_INPUTS = [
    ({"sequences": [[1, 2, VOCAB.size]], "top_k": 1}, 422, "sequences[0][2]"),
    ({"sequences": [[1, -1, 2]]}, 422, "sequences[0][1]"),
    ({"sequences": [[]]}, 422, "sequences[0]"),
    ({"sequences": []}, 422, "sequences"),
    ({"sequences": [[1] * 600]}, 422, "sequences[0]"),
    ({"sequences": [[1, 2, 3]], "top_k": 21}, 422, "top_k"),
    ({"sequences": [[1, 2, 3]], "top_k": -1}, 422, "top_k"),
    ({"sequences": [[1, 2, 3]], "start": 0}, 422, "start"),
    ({"sequences": [[1, 2, 3]], "start": 3}, 422, "start"),
    ({"sequences": [[1, 2, 3]], "start": [1, 1]}, 422, "start"),
    ({"sequences": [[1, "2", 3]]}, 422, "sequences[0][1]"),
    ({"sequences": [[1, 2.5, 3]]}, 422, "sequences[0][1]"),
    ({"sequences": [[1, 2, 3]], "extra": 1}, 422, "extra"),
    ({"sequences": "nope"}, 422, "sequences"),
    ({"sequences": [[1, 2, 10**30]]}, 422, "sequences[0][2]"),
    ({"sequences": [[1, 2, 3]], "temperature": 0}, 422, "temperature"),
    ({"sequences": [[1, 2, 3]], "temperature": 101}, 422, "temperature"),
]


@pytest.mark.parametrize("body,status,field", BAD_INPUTS)
def test_bad_score_input_names_the_field(service, body, status, field):
    response = httpx.post(f"{service.url}/v1/score", json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["field"] == field
    assert httpx.post(f"{service.url}/v1/score", json={"sequences": [[1, 5, 6]]}).status_code == 200


@pytest.mark.parametrize(
    "body,field",
    [
        ({"prefixes": [[1, 5]], "max_tokens": 0}, "max_tokens"),
        ({"prefixes": [[1, 5]], "max_tokens": 600}, "max_tokens"),
        ({"prefixes": [[1, 5]], "max_tokens": 5, "temperature": -1}, "temperature"),
        ({"prefixes": [[1, 5]], "max_tokens": 5, "top_p": 0}, "top_p"),
        ({"prefixes": [[1, 5]], "max_tokens": 5, "stop_ids": [999]}, "stop_ids[0]"),
        ({"prefixes": [[1, 500]], "max_tokens": 5}, "prefixes[0][1]"),
        ({"prefixes": [[1, 5]], "max_tokens": 5, "top_k": 99}, "top_k"),
    ],
)
def test_bad_continue_input_names_the_field(service, body, field):
    response = httpx.post(f"{service.url}/v1/continue", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field


def test_malformed_bodies(service):
    url = f"{service.url}/v1/score"
    r = httpx.post(url, content=b'{"sequences": [[1, 2', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "malformed_body"
    r = httpx.post(url, content=b'{"sequences": [[1, 2]], "top_k": NaN}', headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "top_k"
    r = httpx.post(url, content=b"sequences=1", headers={"content-type": "text/plain"})
    assert r.status_code == 415
    r = httpx.post(url, content=b"x" * (9 << 20), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["field"] == "body"
    assert httpx.get(f"{service.url}/v1/nothing").status_code == 404
    assert httpx.get(f"{service.url}/v1/score").status_code == 405
    assert httpx.post(url, json={"sequences": [[1, 5, 6]]}).status_code == 200


def test_client_raises_clear_errors(service):
    with pytest.raises(TeacherError, match="top_k") as info:
        run(_score(service.url, [[1, 2, 3]], 1, 99))
    assert info.value.status == 422 and info.value.field == "top_k"


def test_auth(toy_quick, tmp_path):
    key = "s3cret-key-for-test"
    env = {"TROPD_TEST_KEY": key}
    with teacher(toy_quick / "teacher", "hf", tmp_path, "--api-key-env", "TROPD_TEST_KEY", env=env) as svc:
        for path, method in [("/v1/info", "GET"), ("/readyz", "GET"), ("/metrics", "GET"), ("/v1/score", "POST")]:
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": key}):
                r = httpx.request(method, svc.url + path, headers=headers, json={"sequences": [[1, 5, 6]]})
                assert r.status_code == 401, (path, headers)
                assert r.json()["error"]["type"] == "unauthorized"
        assert httpx.get(f"{svc.url}/healthz").status_code == 200
        good = {"authorization": f"Bearer {key}"}
        assert httpx.post(f"{svc.url}/v1/score", json={"sequences": [[1, 5, 6]]}, headers=good).status_code == 200

        async def with_client():
            async with TeacherClient(svc.url, api_key=key) as client:
                return await client.info()

        assert run(with_client())["vocab_size"] == VOCAB.size
    assert key not in svc.log()


def test_a_top_k_over_the_vocabulary_is_capped_at_the_vocabulary(toy_quick, tmp_path, reference):
    """--max-top-k above the vocabulary: the service offers the whole distribution and no more."""
    with teacher(toy_quick / "teacher", "hf", tmp_path, "--max-top-k", "64") as svc:
        assert httpx.get(f"{svc.url}/v1/info").json()["max_top_k"] == VOCAB.size
        seq = sequences(1)[0]
        (result,) = run(_score(svc.url, [seq], 1, VOCAB.size))
        np.testing.assert_allclose(np.exp(result.top_logprobs).sum(-1), 1.0, atol=1e-5)
        chosen, _, top_lp = reference(seq, 1, VOCAB.size)
        np.testing.assert_allclose(result.top_logprobs, top_lp, atol=1e-4)
        answer = httpx.post(f"{svc.url}/v1/score", json={"sequences": [seq], "top_k": VOCAB.size + 1})
        assert answer.status_code == 422 and answer.json()["error"]["field"] == "top_k"
        assert httpx.get(f"{svc.url}/readyz").status_code == 200


def test_a_temperature_above_the_engines_range_is_a_422_naming_it_never_a_500(service):
    """vLLM samples at temperatures up to 2 and raises above; the service refuses such a request with a 422 that
    names `temperature` (on /v1/continue and on /v1/completions), and the hf engine serves it."""
    info = httpx.get(f"{service.url}/v1/info").json()
    requests = [
        ("/v1/continue", {"prefixes": [[0]], "max_tokens": 4, "temperature": 5, "top_k": 0}),
        ("/v1/completions", {"prompt": [[1, 5, 6]], "max_tokens": 1, "temperature": 5}),
    ]
    for route, body in requests:
        response = httpx.post(f"{service.url}{route}", json=body, timeout=60)
        if info["engine"] == "vllm":
            assert response.status_code == 422, response.text
            assert response.json()["error"]["field"] == "temperature", response.text
        else:
            assert response.status_code == 200, response.text
    at_the_limit = {"prefixes": [[0]], "max_tokens": 4, "temperature": 2, "top_k": 0}
    assert httpx.post(f"{service.url}/v1/continue", json=at_the_limit, timeout=60).status_code == 200
    assert httpx.get(f"{service.url}/readyz").status_code == 200  # and the service serves on
