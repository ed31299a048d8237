"""`POST /v1/completions` (vLLM's OpenAI shape) on the real service, called by clients no one here wrote:
the `openai` package, and the scoring requests of two peer trainers sent exactly as they send them
(ArcticTraining's on-policy distillation teacher client; ms-swift's GKD teacher client). Checked against an
independent transformers forward pass, and field by field against vLLM's stock OpenAI server."""

from __future__ import annotations

import random

import httpx
import numpy as np
import openai
import pytest

from tests.helpers import teacher
from trainer.toy.tokenizer import VOCAB

KEY = "completions-test-key"
ENV = {"TROPD_TEST_KEY": KEY, "OMP_NUM_THREADS": "1"}
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def service(toy_quick, tmp_path_factory):
    args = ["--api-key-env", "TROPD_TEST_KEY"]
    with teacher(toy_quick / "teacher", "hf", tmp_path_factory.mktemp("logs"), *args, env=ENV) as svc:
        yield svc
    assert svc.process.returncode == 0, svc.log()[-3000:]


def sequences(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[VOCAB.bos_id] + [rng.randrange(VOCAB.size) for _ in range(rng.randrange(6, 40))] for _ in range(n)]


def model_id(url: str, headers=None) -> str:
    return httpx.get(f"{url}/v1/models", headers=headers).json()["data"][0]["id"]


# ---- requests as the peers send them (their request and their parsing, nothing else) ---------------------


def arctic_teacher_logprobs(url: str, prompt: list[int], completion: list[int], headers=None) -> list[float]:
    """ArcticTraining's `TeacherClient._compute_logprobs_async`: the token log-probs of `completion`."""
    payload = {"prompt": prompt + completion, "max_tokens": 0, "echo": True, "logprobs": 1}
    result = httpx.post(f"{url}/v1/completions", json=payload, headers=headers, timeout=60).json()
    token_logprobs = result["choices"][0]["logprobs"]["token_logprobs"]
    return [lp if lp is not None else 0.0 for lp in token_logprobs[len(prompt) :]]


def swift_teacher_topk(url: str, ids: list[int], topk: int, headers=None) -> tuple[list, list]:
    """ms-swift's GKD `TeacherAPIClient`: per position the top-k (ids, log-probs) from `prompt_logprobs`."""
    payload = {"model": model_id(url, headers), "prompt": ids, "max_tokens": 0, "temperature": 0, "logprobs": topk}
    payload["echo"] = True
    choice = httpx.post(f"{url}/v1/completions", json=payload, headers=headers, timeout=60).json()["choices"][0]
    indices, values = [], []
    for entries in choice["prompt_logprobs"]:
        best = sorted((entries or {}).items(), key=lambda kv: -kv[1]["logprob"])[:topk]
        indices.append([int(t) for t, _ in best])
        values.append([e["logprob"] for _, e in best])
    return indices, values


# ---- against an independent forward pass ------------------------------------------------------------


def test_the_openai_package_gets_the_teachers_log_probs(service, reference):
    client = openai.OpenAI(base_url=f"{service.url}/v1", api_key=KEY, default_headers={"X-TrOPD-Client": "peer"})
    model = client.models.list().data[0].id
    seqs = sequences(6)
    answer = client.completions.create(
        model=model, prompt=seqs, max_tokens=0, echo=True, logprobs=1, extra_body={"prompt_logprobs": 3}
    )
    assert [c.index for c in answer.choices] == list(range(len(seqs)))
    assert answer.usage.prompt_tokens == sum(map(len, seqs)) and answer.model == model
    for seq, choice in zip(seqs, answer.choices, strict=True):
        chosen, top_ids, top_lp = reference(seq, 1, 3)
        everything = reference(seq, 1, VOCAB.size)[2]  # every token's log-prob, by position
        lp = choice.logprobs
        assert lp.tokens == [f"token_id:{t}" for t in seq] and lp.token_logprobs[0] is None
        np.testing.assert_allclose(lp.token_logprobs[1:], chosen, atol=1e-4)
        prompt_logprobs = choice.model_extra["prompt_logprobs"]
        assert prompt_logprobs[0] is None and len(prompt_logprobs) == len(seq)
        for p, entries in enumerate(prompt_logprobs[1:]):
            top = sorted(entries.items(), key=lambda kv: kv[1]["rank"] or 99)[:3]
            assert [int(t) for t, _ in top] == top_ids[p].tolist()
            assert [e["rank"] for _, e in top] == [1, 2, 3]
            np.testing.assert_allclose([e["logprob"] for _, e in top], top_lp[p], atol=1e-4)
            assert entries[str(seq[p + 1])]["logprob"] == pytest.approx(chosen[p], abs=1e-4)
            # the actual token's rank, in the top-k or not: the tokens at least as likely (ties within 1e-4 either way)
            rank, whole = entries[str(seq[p + 1])]["rank"], everything[p]
            assert (whole > chosen[p] + 1e-4).sum() + 1 <= rank <= (whole >= chosen[p] - 1e-4).sum()
            assert len(lp.top_logprobs[p + 1]) <= 2  # logprobs 1: the token and at most one more
    metrics = httpx.get(f"{service.url}/metrics", headers=AUTH).text
    assert 'tropd_client_requests_total{client="peer"}' in metrics
    assert 'tropd_requests_total{route="/v1/completions",status="200"}' in metrics


def test_a_peer_trainers_scoring_request(service, reference):
    for seq in sequences(4, seed=1):
        prompt, completion = seq[:5], seq[5:]
        got = arctic_teacher_logprobs(service.url, prompt, completion, AUTH)
        np.testing.assert_allclose(got, reference(seq, 5, 1)[0], atol=1e-4)
        indices, values = swift_teacher_topk(service.url, seq, 4, AUTH)
        _, top_ids, top_lp = reference(seq, 1, 4)
        assert indices[0] == [] and indices[1:] == top_ids.tolist()
        np.testing.assert_allclose(values[1:], top_lp, atol=1e-4)


def test_one_generated_token(service, reference):
    client = openai.OpenAI(base_url=f"{service.url}/v1", api_key=KEY)
    seqs = sequences(3, seed=2)
    answer = client.completions.create(model="teacher", prompt=seqs, max_tokens=1, temperature=0, logprobs=2)
    for seq, choice in zip(seqs, answer.choices, strict=True):
        logp = reference(seq + [0], len(seq), 2)  # the distribution after the whole prompt
        (token,) = choice.logprobs.tokens
        assert token == f"token_id:{logp[1][0][0]}"  # greedy: the top token
        assert choice.logprobs.token_logprobs[0] == pytest.approx(logp[2][0][0], abs=1e-4)
        assert choice.finish_reason in ("length", "stop") and choice.model_extra["prompt_logprobs"] is None
    assert answer.usage.completion_tokens == len(seqs)


BAD = [
    ({"prompt": "a text prompt", "max_tokens": 0, "echo": True}, 422, "prompt"),
    ({"prompt": ["text", "list"], "max_tokens": 0, "echo": True}, 422, "prompt"),
    ({"prompt": [], "max_tokens": 0, "echo": True}, 422, "prompt"),
    ({"prompt": [[]], "max_tokens": 0, "echo": True}, 422, "prompt[0]"),
    ({"prompt": [1, 2, VOCAB.size], "max_tokens": 0, "echo": True}, 422, "prompt[0][2]"),
    ({"prompt": [1, 2] * 300, "max_tokens": 0, "echo": True}, 422, "prompt[0]"),
    ({"prompt": [1, 2], "max_tokens": 16}, 422, "max_tokens"),
    ({"prompt": [1, 2]}, 422, "max_tokens"),
    ({"prompt": [1, 2], "max_tokens": 0}, 422, "max_tokens"),
    ({"prompt": [1, 2], "max_tokens": 0, "echo": True, "logprobs": 21}, 422, "logprobs"),
    ({"prompt": [1, 2], "max_tokens": 0, "echo": True, "prompt_logprobs": -1}, 422, "prompt_logprobs"),
    ({"prompt": [1, 2], "max_tokens": 1, "n": 2}, 422, "n"),
    ({"prompt": [1, 2], "max_tokens": 1, "stream": True}, 422, "stream"),
    ({"prompt": [1, 2], "max_tokens": 1, "temperature": -1}, 422, "temperature"),
    ({"prompt": [1, 2], "max_tokens": 1, "stop": ["x"]}, 422, "stop"),
    ({"prompt": [1, 2], "max_tokens": 1, "model": "another"}, 404, "model"),
]


@pytest.mark.parametrize("body,status,field", BAD, ids=[str(b)[:50] for b, _, _ in BAD])
def test_bad_input_is_a_clear_4xx(service, body, status, field):
    answer = httpx.post(f"{service.url}/v1/completions", json=body, headers=AUTH)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["field"] == field and error["message"], error


def test_the_key_is_required(service):
    assert httpx.post(f"{service.url}/v1/completions", json={"prompt": [1, 2], "max_tokens": 1}).status_code == 401
    assert httpx.get(f"{service.url}/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{service.url}/v1", api_key="wrong", max_retries=0).models.list()


# ---- against vLLM's stock server ---------------------------------------------------------------------


def assert_same_completion(ours: dict, stock: dict, generated: bool, atol: float = 1e-5, ranks: bool = True) -> None:
    """Every number and token the same (log-probs within `atol`; every rank equal with `ranks`, else those of the
    top-k); `finish_reason` only when a token was generated (for `max_tokens: 0` vLLM reports the one it samples
    and drops)."""
    assert ours["object"] == stock["object"] == "text_completion"
    assert ours["usage"]["prompt_tokens"] == stock["usage"]["prompt_tokens"]
    assert len(ours["choices"]) == len(stock["choices"])
    for mine, theirs in zip(ours["choices"], stock["choices"], strict=True):
        assert mine["index"] == theirs["index"]
        assert mine["finish_reason"] == theirs["finish_reason"] or not generated
        assert (mine["logprobs"] is None) == (theirs["logprobs"] is None)
        if mine["logprobs"] is not None:
            a, b = mine["logprobs"], theirs["logprobs"]
            assert a["tokens"] == b["tokens"] and a["text_offset"] == b["text_offset"]
            assert [x is None for x in a["token_logprobs"]] == [x is None for x in b["token_logprobs"]]
            np.testing.assert_allclose(
                [x for x in a["token_logprobs"] if x is not None],
                [x for x in b["token_logprobs"] if x is not None],
                atol=atol,
            )
            for x, y in zip(a["top_logprobs"], b["top_logprobs"], strict=True):
                assert (x is None) == (y is None)
                if x is not None:
                    assert list(x) == list(y)  # the same tokens, in the same order
                    np.testing.assert_allclose(list(x.values()), list(y.values()), atol=atol)
        assert (mine["prompt_logprobs"] is None) == (theirs["prompt_logprobs"] is None)
        for x, y in zip(mine["prompt_logprobs"] or [], theirs["prompt_logprobs"] or [], strict=True):
            assert (x is None) == (y is None)
            if x is not None:
                assert list(x) == list(y)
                for token, entry in x.items():
                    assert entry["logprob"] == pytest.approx(y[token]["logprob"], abs=atol)
                    assert entry["rank"] == y[token]["rank"] or not ranks and entry["rank"] > len(x) - 1


@pytest.fixture(scope="module")
def stock(stock_vllm_teacher):
    """The session's stock server (tests/conftest.py), shared with tests/test_openai_client.py."""
    return stock_vllm_teacher.get()


@pytest.mark.vllm
@pytest.mark.timeout(600)
def test_the_same_answers_as_vllms_stock_server(service, toy_vllm_teacher, stock):
    """Our service on its vLLM engine answers as the stock server does: log-probs to 1e-5, every rank equal (the
    same engine, the same batches: each request is one batch on both sides). The hf engine (another kernel) agrees
    to 1e-4. Our vLLM service is the one tests/test_service.py sends its requests to (tests/conftest.py, no key);
    it idles while the stock server runs."""
    seqs = sequences(5, seed=3)
    requests = [
        {"prompt": seqs[0], "max_tokens": 0, "echo": True, "logprobs": 1},  # ArcticTraining's request
        {"prompt": seqs[1], "max_tokens": 0, "temperature": 0, "logprobs": 5, "echo": True},  # ms-swift's
        {"prompt": seqs, "max_tokens": 1, "prompt_logprobs": 5, "temperature": 0},  # VLLMOpenAIClient's, greedy
        {"prompt": seqs[:2], "max_tokens": 1, "echo": True, "logprobs": 3, "temperature": 0},
        {"prompt": seqs[2], "max_tokens": 0, "echo": True, "logprobs": 2, "prompt_logprobs": 4},
        {"prompt": [VOCAB.bos_id], "max_tokens": 0, "echo": True, "logprobs": 1},  # nothing to score
    ]

    def answers(url: str, headers=None) -> list[dict]:
        out = []
        for body in requests:
            answer = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60)
            assert answer.status_code == 200, answer.text[:300]
            out.append(answer.json())
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY if headers else "unused")
        model = client.models.list().data[0].id
        out.append(client.completions.create(model=model, prompt=seqs[3], max_tokens=0, echo=True, logprobs=2))
        out[-1] = out[-1].model_dump()
        return out

    generated = [body["max_tokens"] == 1 for body in requests] + [False]
    from_hf = answers(service.url, AUTH)
    from_vllm = answers(toy_vllm_teacher.get().url)
    from_stock = answers(stock.url)
    for mine, hf, theirs, gen in zip(from_vllm, from_hf, from_stock, generated, strict=True):
        assert_same_completion(mine, theirs, gen)
        assert_same_completion(hf, theirs, gen, atol=1e-4, ranks=False)


def trl_sequence_logprobs(url: str, seqs: list[list[int]], prompt_lengths: list[int], temperature: float = 1.0):
    """TRL's teacher-server scoring (`VLLMClient.get_sequence_logprobs`, which its server-teacher distillation
    trainers call), unchanged: it waits for `GET /health`, reads `GET /v1/models`, then posts token-id prompts with
    `max_tokens: 1` and `prompt_logprobs`."""
    from trl.generation.vllm_client import VLLMClient

    client = VLLMClient(base_url=url, connection_timeout=60)
    return client.get_sequence_logprobs(seqs, prompt_lengths, top_logprobs=5, temperature=temperature)


@pytest.mark.vllm
@pytest.mark.timeout(600)
def test_trls_client_gets_the_stock_servers_numbers(toy_quick, toy_vllm_teacher, stock, tmp_path, reference):
    """TRL's client connects to the service on either engine (no key: TRL sends none) and gets what the stock server
    gives: log-probs within 1e-5 on the vllm engine (1e-4 on hf), the same top-k ids. At T = 0.7 the service scores
    log-softmax(logits / 0.7) where the stock server ignores the temperature."""
    seqs = sequences(6, seed=5)
    lengths = [1 + i % 4 for i in range(len(seqs))]
    theirs = trl_sequence_logprobs(stock.url, seqs, lengths)
    with teacher(toy_quick / "teacher", "hf", tmp_path) as hf:
        ours = {"hf": trl_sequence_logprobs(hf.url, seqs, lengths)}
        cooled = trl_sequence_logprobs(hf.url, seqs, lengths, temperature=0.7)
    ours["vllm"] = trl_sequence_logprobs(toy_vllm_teacher.get().url, seqs, lengths)
    for engine, got in ours.items():
        atol = 1e-5 if engine == "vllm" else 1e-4
        assert got["logprob_token_ids"] == theirs["logprob_token_ids"], engine
        assert got["actual_token_ids"] == theirs["actual_token_ids"], engine
        for key in ("logprobs", "actual_logprobs"):
            for a, b in zip(got[key], theirs[key], strict=True):
                np.testing.assert_allclose(np.array(a), np.array(b), atol=atol, err_msg=f"{engine} {key}")
    for seq, n, actual in zip(seqs, lengths, cooled["actual_logprobs"], strict=True):
        np.testing.assert_allclose(np.array(actual)[:, 0], reference(seq, n, 1, temperature=0.7)[0], atol=1e-5)
