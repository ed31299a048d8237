"""The real-shaped world (tests/realworld.py) and the teacher service on it: a byte-level BPE tokenizer with
ChatML, Qwen3 models with more embedding rows than tokens, and two stop ids (`<|im_end|>`, `<|endoftext|>`)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import numpy as np
import pytest
import torch

from services.teacher.client import TeacherClient
from services.teacher.engines.hf import HFEngine
from services.teacher.engines.types import stop_ids, union_of_stops
from tests.helpers import teacher
from tests.realworld import build_realworld

ENGINES = ["hf", pytest.param("vllm", marks=pytest.mark.vllm)]


def _records(world, name: str) -> list[dict]:
    return [json.loads(line) for line in (world / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def tok(realworld):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(realworld / "teacher")


@pytest.fixture(scope="module")
def models(realworld):
    from transformers import AutoModelForCausalLM

    load = AutoModelForCausalLM.from_pretrained
    return {role: load(realworld / role, dtype=torch.float32).eval() for role in ("teacher", "student")}


def _prompts(world, tok, split: str = "eval", n: int = 8) -> dict[str, list[list[int]]]:
    """Prompt ids of `n` chat records (rendered by the chat template) and `n` plain-text records."""
    chats = [r["messages"] for r in _records(world, f"{split}-chat.jsonl")[:n]]
    chat = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in chats]
    text = [r["prompt"] for r in _records(world, f"{split}-text.jsonl")[:n]]
    return {"chat": [tok(t)["input_ids"] for t in chat], "text": [tok(t)["input_ids"] for t in text]}


def _ids(tok, *tokens: str) -> list[int]:
    return [tok.convert_tokens_to_ids(t) for t in tokens]


def test_the_world_is_shaped_like_a_qwen3_one(realworld, tok, models):
    spec = json.loads((realworld / "teacher" / "tokenizer.json").read_text())
    assert spec["model"]["type"] == "BPE" and spec["pre_tokenizer"]["type"] == "ByteLevel"
    assert spec["decoder"]["type"] == "ByteLevel"
    assert 600 <= len(tok) <= 1200
    endoftext, im_start, im_end = _ids(tok, "<|endoftext|>", "<|im_start|>", "<|im_end|>")
    assert [endoftext, im_start, im_end] == list(range(len(tok) - 3, len(tok)))  # after the BPE, as in Qwen
    assert tok.bos_token is None and (tok.pad_token_id, tok.eos_token_id) == (endoftext, im_end)
    assert tok.decode(tok("héllo, wörld!")["input_ids"]) == "héllo, wörld!"  # bytes: nothing is unknown
    assert "chat_template" in json.loads((realworld / "teacher" / "tokenizer_config.json").read_text())
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert not tok.apply_chat_template(messages, tokenize=False).endswith("assistant\n")
    for role, model in models.items():
        assert model.config.model_type == "qwen3" and model.config.tie_word_embeddings
        assert model.config.vocab_size > len(tok) and model.config.vocab_size % 64 == 0
        generation = json.loads((realworld / role / "generation_config.json").read_text())
        assert generation["eos_token_id"] == [im_end, endoftext]
        assert (realworld / role / "model.safetensors").is_file()
        assert (realworld / role / "tokenizer.json").read_bytes() == (
            realworld / "teacher" / "tokenizer.json"
        ).read_bytes()
    count = {r: sum(p.numel() for p in m.parameters()) for r, m in models.items()}
    assert count["teacher"] > 2 * count["student"]
    for split, n in (("train", 200), ("eval", 40)):
        chat, text = _records(realworld, f"{split}-chat.jsonl"), _records(realworld, f"{split}-text.jsonl")
        assert len(chat) == len(text) == n
        assert all(m["role"] in ("system", "user") for r in chat for m in r["messages"]) and all(
            r["answer"] for r in chat
        )
        assert all(r["prompt"].endswith("Answer:") and r["answer"] for r in text)
    start = time.monotonic()
    assert build_realworld(realworld) == realworld and time.monotonic() - start < 1  # cached


def _sample(model, prompt: list[int], n: int, stops: set[int], gen=None) -> list[int]:
    """`n` tokens at most, greedy without `gen`, ending at a stop id (plain loop, no cache: a reference)."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([prompt + out])).logits[0, -1]
            out.append(
                int(logits.argmax()) if gen is None else int(torch.multinomial(logits.softmax(-1), 1, generator=gen))
            )
            if out[-1] in stops:
                break
    return out


def _logprobs(model, seq: list[int], start: int) -> torch.Tensor:
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), -1)
    return logp[start - 1 : len(seq) - 1].gather(-1, torch.tensor(seq[start:])[:, None])[:, 0]


def test_teacher_ends_chat_turns_and_documents_with_different_ids_and_the_student_disagrees(realworld, tok, models):
    stops = set(_ids(tok, "<|endoftext|>", "<|im_end|>"))
    prompts = _prompts(realworld, tok)
    for form, end in (("chat", "<|im_end|>"), ("text", "<|endoftext|>")):
        for p in prompts[form]:
            assert _sample(models["teacher"], p, 40, stops)[-1] == tok.convert_tokens_to_ids(end)
    gen = torch.Generator().manual_seed(0)
    kl, n = 0.0, 0
    for p in prompts["chat"] + prompts["text"]:
        seq = p + _sample(models["student"], p, 24, stops, gen)
        d = _logprobs(models["student"], seq, len(p)) - _logprobs(models["teacher"], seq, len(p))
        kl, n = kl + float(d.sum()), n + len(d)
    assert kl / n > 0.5  # reverse KL, nats per token on the student's samples (about 4 at seed 0)


def test_stop_ids_are_the_union_of_the_three_eos_settings(realworld, tok):
    assert union_of_stops(None, None, None) == (None, [])
    assert union_of_stops(7, [9, 7], 3) == (7, [3, 7, 9])
    assert union_of_stops([5, 2], None, 2) == (5, [2, 5])
    assert union_of_stops(None, 4, None) == (4, [4])
    im_end, endoftext = _ids(tok, "<|im_end|>", "<|endoftext|>")
    assert stop_ids(realworld / "teacher", im_end) == (im_end, sorted([im_end, endoftext]))
    assert HFEngine(str(realworld / "teacher")).info.stop_ids == sorted([im_end, endoftext])


# ---- the service on the Qwen3 teacher, each engine, over HTTP -------------------------------------------


@pytest.fixture(scope="module", params=ENGINES)
def service(request, realworld, models, realworld_vllm_teacher, tmp_path_factory):
    if request.param == "vllm":  # one vLLM service, shared with tests/test_realworld_train.py (tests/conftest.py)
        yield realworld_vllm_teacher.get()
        return
    vocab = models["teacher"].config.vocab_size  # a top-k of the whole vocabulary reaches the padded rows
    with teacher(
        realworld / "teacher", request.param, tmp_path_factory.mktemp("logs"), "--max-top-k", str(vocab)
    ) as svc:
        yield svc
    assert svc.process.returncode == 0, svc.log()[-3000:]


def run(coro):
    return asyncio.run(coro)


async def _call(url, method: str, *args, **kwargs):
    async with TeacherClient(url) as client:
        return await getattr(client, method)(*args, **kwargs)


def _reference(model, seq: list[int], start: int, k: int):
    with torch.no_grad():
        rows = torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), -1)[start - 1 : len(seq) - 1]
    top = rows.topk(k, -1)
    return rows.gather(-1, torch.tensor(seq[start:])[:, None])[:, 0].numpy(), top.indices.numpy(), top.values.numpy()


def test_info_reports_every_stop_id_and_the_models_vocabulary(service, realworld, tok, models):
    info = httpx.get(f"{service.url}/v1/info").json()
    im_end, endoftext = _ids(tok, "<|im_end|>", "<|endoftext|>")
    assert info["stop_ids"] == sorted([im_end, endoftext]) and info["eos_id"] == im_end
    assert info["vocab_size"] == models["teacher"].config.vocab_size > len(tok)


def test_scores_match_transformers(service, realworld, tok, models):
    prompts = _prompts(realworld, tok, "train", 6)
    answers = [r["answer"] for r in _records(realworld, "train-chat.jsonl")[:6]]
    answers += [" " + r["answer"] for r in _records(realworld, "train-text.jsonl")[:6]]
    ends = _ids(tok, "<|im_end|>") * 6 + _ids(tok, "<|endoftext|>") * 6
    seqs = [
        p + tok(a)["input_ids"] + [e] for p, a, e in zip(prompts["chat"] + prompts["text"], answers, ends, strict=True)
    ]
    starts = [1 + i % 5 for i in range(len(seqs))]
    results = run(_call(service.url, "score", seqs, starts, 5))
    for seq, s, r in zip(seqs, starts, results, strict=True):
        chosen, top_ids, top_lp = _reference(models["teacher"], seq, s, 5)
        np.testing.assert_allclose(r.logprobs, chosen, atol=1e-4)
        np.testing.assert_allclose(r.top_logprobs, top_lp, atol=1e-4)
        assert all(set(g.tolist()) == set(w.tolist()) for g, w in zip(r.top_ids, top_ids, strict=True))


def test_ids_are_valid_up_to_the_models_vocabulary_not_the_tokenizers(service, realworld, tok, models):
    vocab = models["teacher"].config.vocab_size
    seq = _prompts(realworld, tok, n=1)["text"][0] + [len(tok), vocab - 1]  # ids no text encodes to
    (result,) = run(_call(service.url, "score", [seq], 1, vocab))
    chosen, _, top_lp = _reference(models["teacher"], seq, 1, vocab)
    np.testing.assert_allclose(result.logprobs, chosen, atol=1e-4)
    np.testing.assert_allclose(result.top_logprobs, top_lp, atol=1e-4)  # the whole distribution, padded rows too
    assert (result.top_ids >= len(tok)).any() and (result.top_ids < vocab).all()
    for path, body, field in [
        ("/v1/score", {"sequences": [seq[:-1] + [vocab]]}, f"sequences[0][{len(seq) - 1}]"),
        ("/v1/continue", {"prefixes": [[1, vocab]], "max_tokens": 2}, "prefixes[0][1]"),
        ("/v1/continue", {"prefixes": [[1, 2]], "max_tokens": 2, "stop_ids": [vocab]}, "stop_ids[0]"),
    ]:
        answer = httpx.post(service.url + path, json=body)
        assert answer.status_code == 422 and answer.json()["error"]["field"] == field, answer.text
    answer = httpx.post(
        f"{service.url}/v1/continue", json={"prefixes": [seq], "max_tokens": 2, "stop_ids": [vocab - 1]}
    )
    assert answer.status_code == 200, answer.text


def test_drafts_stop_at_every_stop_id_and_never_continue_past_one(service, realworld, tok):
    stops = set(httpx.get(f"{service.url}/v1/info").json()["stop_ids"])
    prompts = _prompts(realworld, tok)
    seen = set()
    for form, end in (("chat", "<|im_end|>"), ("text", "<|endoftext|>")):
        greedy = run(_call(service.url, "continue_", prompts[form], 40, temperature=0, top_k=2))
        sampled = run(_call(service.url, "continue_", prompts[form] * 3, 40, temperature=1.0, seed=3, top_k=2))
        for d in greedy + sampled:
            tokens = d.token_ids.tolist()
            assert not stops & set(tokens[:-1])  # nothing after a stop id
            assert d.finish_reason == ("stop" if tokens[-1] in stops else "length")
            assert d.finish_reason == "stop" or len(tokens) == 40
            assert d.top_ids.shape == (len(tokens), 2) and len(d.logprobs) == len(tokens)
        assert all(d.token_ids[-1] == tok.convert_tokens_to_ids(end) for d in greedy)  # this teacher's habit
        seen |= {int(d.token_ids[-1]) for d in greedy + sampled} & stops
    assert seen == stops  # drafts ended at each of the teacher's stop ids
    # a request's own stop id ends a draft at its first occurrence, the id kept, as the model's do
    drafts = run(_call(service.url, "continue_", prompts["text"], 40, temperature=0))
    prefix, tokens = max(
        zip(prompts["text"], [d.token_ids.tolist() for d in drafts], strict=True), key=lambda p: len(p[1])
    )
    assert len(tokens) >= 3
    chosen = tokens[1]
    (cut,) = run(_call(service.url, "continue_", [prefix], 40, temperature=0, stop_ids=[chosen]))
    assert cut.token_ids.tolist() == tokens[: tokens.index(chosen) + 1] and cut.finish_reason == "stop"


def test_hf_scoring_in_groups_keeps_only_the_scored_positions_and_changes_no_number(realworld, monkeypatch):
    """The hf engine scores in groups bounded by their logits, computed from the earliest start only: the same
    numbers as one group of every position."""
    from services.teacher.engines import hf
    from services.teacher.engines.types import ScoreItem

    engine = HFEngine(str(realworld / "teacher"))
    g = torch.Generator().manual_seed(0)
    items = [ScoreItem(torch.randint(0, 600, (int(n),), generator=g).tolist(), int(s), 5)
             for n, s in ((40, 30), (25, 3), (33, 20), (12, 11), (50, 49))]  # fmt: skip
    together = engine.score(items)
    monkeypatch.setattr(hf, "LOGITS_BUDGET_BYTES", 2 * 20 * engine.info.vocab_size * 4)
    assert len(hf.logit_groups(items, engine.info.vocab_size)) > 2
    apart = engine.score(items)
    for a, b in zip(together, apart, strict=True):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
        np.testing.assert_array_equal(a.top_ids, b.top_ids)


def test_hf_scores_a_long_sequence_in_chunks_to_its_whole_numbers_between_another_clients_batches(
    realworld, monkeypatch
):
    """The hf engine's chunks of a sequence, each run over the keys and values of those before it (and in pieces
    whose logits fit LOGITS_BUDGET_BYTES), give its scores whole: log-probs, top-k and ranks, at a temperature. The
    batcher scores a sequence longer than its budget so, a chunk a batch, and another client's request, queued
    meanwhile, is scored between two of its chunks: every result as the engine gives it whole."""
    from services.teacher import batching
    from services.teacher.batching import Batcher
    from services.teacher.engines import hf
    from services.teacher.engines.types import ScoreItem, join_scored

    def assert_same(a, b):  # float32 rounding apart
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(a.top_logprobs, b.top_logprobs, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(a.top_ids, b.top_ids)
        assert np.abs(a.ranks - b.ranks).max() <= 1  # a tie within rounding may count one token more or less

    engine = HFEngine(str(realworld / "teacher"))
    g = torch.Generator().manual_seed(0)
    long = ScoreItem(torch.randint(0, 600, (400,), generator=g).tolist(), 150, 5, ranks=True, temperature=0.7)
    small = [ScoreItem(torch.randint(0, 600, (20,), generator=g).tolist(), 5, 5, ranks=True) for _ in range(2)]
    (whole,) = engine.score([long])
    alone = engine.score(small)
    monkeypatch.setattr(hf, "LOGITS_BUDGET_BYTES", 60 * engine.info.vocab_size * 4)  # pieces of 60 positions
    cache, pieces = None, []
    for begin, end in ((0, 100), (100, 149), (149, 151), (151, 333), (333, 400)):  # chunks across `start`
        cache, piece = engine.score_chunk(long, begin, end, cache)
        pieces.append(piece)
    assert_same(join_scored(pieces, 5, True), whole)

    calls = []

    class Recording:
        def score(self, items):
            calls.append("batch")
            return engine.score(items)

        def score_chunk(self, item, begin, end, cache=None):
            calls.append((begin, end))
            return engine.score_chunk(item, begin, end, cache)

    monkeypatch.setattr(batching, "MIN_CHUNK_TOKENS", 16)
    monkeypatch.setattr(batching, "ACTIVE_S", 30.0)

    async def go():
        batcher = Batcher(Recording(), max_batch_tokens=128, min_shared_batch_tokens=40, window_ms=0)
        results = await asyncio.gather(batcher.score([long], "long"), batcher.score(small, "small"))
        batcher.close()
        return results

    ([chunked], apart) = asyncio.run(go())
    chunks = [c for c in calls if c != "batch"]
    assert chunks[0][0] == 0 and chunks[-1][1] == 400 and len(chunks) > 3, calls
    assert all(c[1] - c[0] <= 128 for c in chunks) and calls.index("batch") < len(calls) - 1, calls
    assert_same(chunked, whole)
    for a, b in zip(apart, alone, strict=True):
        assert_same(a, b)
