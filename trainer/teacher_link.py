"""The trainer's connection to the teacher: the async client run on its own event-loop thread.

Training is synchronous torch code; scoring requests must progress while it runs. So the client lives on
a background thread with its own asyncio loop, and the trainer submits requests that return
`concurrent.futures.Future`s. Requests are split into chunks of `request_sequences` sequences, with at
most `max_concurrency` in flight.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading
import time
from concurrent.futures import Future

import httpx

from services.teacher.client import IDENTITY_KEYS, TeacherClient, TeacherError, read_key_file
from services.teacher.protocol import chat_template_fingerprint, tokenizer_fingerprint
from trainer.config import TeacherConfig
from tropd.errors import UserError

# text a tokenizer mismatch shows in: digits, punctuation, accents, other scripts, markup, whitespace runs
PROBE_TEXT = "Probe: 12+345=357; x_1 <b>café</b> naïve 東京 Ωμέγα  tab\tend.\n"
PROBE_CHAT = [{"role": "user", "content": "What is 17 * 23?"}]


class TeacherLink:
    def __init__(self, config: TeacherConfig):
        self.config = config
        # sent only when not 1: clients of teachers that score at 1 alone take no temperature (refused at check)
        self._temperature = {"temperature": config.temperature} if config.temperature != 1.0 else {}
        self.urls = [config.url] if isinstance(config.url, str) else list(config.url)
        if config.resolve_replicas and config.api == "tropd":
            self.urls = resolved_replicas(self.urls)
        api_key = None
        if config.api_key_env:
            api_key = os.environ.get(config.api_key_env)
            if not api_key:
                raise UserError(f"teacher.api_key_env {config.api_key_env}: that environment variable is not set")
        if config.api_key_file:
            try:
                api_key = read_key_file(config.api_key_file)
            except TeacherError as exc:
                raise UserError(f"teacher.api_key_file: {exc}") from None
        if config.api != "inprocess":
            for url in self.urls:
                _check_url(url)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="teacher-link", daemon=True)
        self._thread.start()
        kwargs = dict(api_key=api_key, timeout=config.timeout_s, retries=config.retries)
        if config.api == "tropd":
            kwargs["client_id"] = config.client_id  # None: the client sends hostname-pid
            if config.api_key_file:  # read again on a 401 (a rotated key)
                kwargs.update(api_key=None, api_key_file=config.api_key_file)
        self.client = self._call(self._make_client(config, kwargs))
        self._limit = asyncio.Semaphore(config.max_concurrency)
        self.latencies: list[float] = []  # seconds per scoring call, drained by the trainer's metrics

    async def _make_client(self, config: TeacherConfig, kwargs):
        if config.api == "inprocess":
            from services.teacher.engines.inprocess import InProcessTeacher

            return InProcessTeacher(config.model, config.engine, max_top_k=max(20, config.top_k))
        if config.api == "vllm-openai":
            from services.teacher.openai_client import VLLMOpenAIClient

            return VLLMOpenAIClient(self.urls[0], **kwargs)
        return TeacherClient(self.urls, **kwargs)

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def check(self, student_dir: str, top_k: int, student_vocab: int | None = None) -> dict:
        """Read the teacher's info; refuse a different tokenizer or chat template, a vocabulary larger than the
        student's (its top-k ids would index past the student's logits), or a top-k it cannot give."""
        info = self._replicas_info() if len(self.urls) > 1 else self._info()
        mine = tokenizer_fingerprint(student_dir)
        theirs = info.get("tokenizer_sha256")
        if theirs is not None and theirs != mine:
            raise UserError(
                f"the teacher's tokenizer differs from the student's: teacher {theirs[:16]}..., "
                f"student {mine[:16]}... (tokenizer_sha256); distillation needs one shared vocabulary"
            )
        template = info.get("chat_template_sha256")  # None: the teacher has none, or cannot tell (stock server)
        if template is not None and template != chat_template_fingerprint(student_dir):
            raise UserError(
                "the teacher's chat template differs from the student's (chat_template_sha256): the teacher would "
                "score prompts rendered in another format; give both the same tokenizer files"
            )
        if info.get("engine") == "vllm-openai":
            self._probe_stock_tokenizer(student_dir)
        vocab = info.get("vocab_size")
        if student_vocab is not None and isinstance(vocab, int) and vocab > student_vocab:
            raise UserError(f"the teacher's vocabulary ({vocab} ids) is larger than the student's ({student_vocab}): "
                            "its top-k ids would fall outside the student's logits")  # fmt: skip
        max_top_k = info.get("max_top_k")
        if max_top_k is not None and top_k > max_top_k:
            raise UserError(f"teacher.top_k={top_k} but the teacher serves at most top-k {max_top_k}")
        if isinstance(vocab, int) and top_k > vocab:
            raise UserError(f"teacher.top_k={top_k} is larger than the teacher's vocabulary ({vocab} ids)")
        if self._temperature and not info.get("score_temperature", False):
            raise UserError(f"teacher.temperature={self.config.temperature} but this teacher ({info.get('engine')} "
                            "engine) scores at temperature 1 only: set teacher.temperature=1, or serve the teacher "
                            "with `tropd teacher` (either engine)")  # fmt: skip
        return info

    def _info(self) -> dict:
        try:
            return self._call(self.client.info())
        except (TeacherError, OSError) as exc:
            raise UserError(f"cannot reach the teacher at {self.config.url}: {exc}") from None

    def _replicas_info(self) -> dict:
        """The replicas' common info: every reachable replica must serve the same model, engine, dtype and
        tokenizer (else the scores would depend on which one answered); unreachable ones are probed later and
        must then match too."""
        answers = self._call(self.client.infos())
        reached = [(url, info) for url, info in zip(self.urls, answers, strict=True) if isinstance(info, dict)]
        if not reached:
            raise UserError(f"cannot reach any teacher replica: {'; '.join(str(a) for a in answers)}")
        first_url, first = reached[0]
        for url, info in reached[1:]:
            differs = [key for key in IDENTITY_KEYS if info.get(key) != first.get(key)]
            if differs:
                raise UserError(
                    f"teacher replicas {first_url} and {url} differ in {', '.join(differs)}: every replica must serve "
                    "the same model with the same engine, dtype and tokenizer"
                )
        for url, info in zip(self.urls, answers, strict=True):
            if not isinstance(info, dict):
                print(f"[train] teacher replica {url} is not serving now ({info}); it is probed and used once "
                      "ready", file=sys.stderr, flush=True)  # fmt: skip
        self.client.expect(first)
        return first

    def replica_requests(self) -> dict[str, int]:
        """Requests sent to each replica so far (one entry per URL of teacher.url)."""
        return {r.url: r.requests for r in getattr(self.client, "replicas", [])}

    def _probe_stock_tokenizer(self, student_dir: str) -> None:
        """A stock vLLM server reports no tokenizer fingerprint: compare behaviour instead. Its ids of a probe text
        (and of a probe chat, when the student has a chat template) must equal the student tokenizer's; the client
        then refuses ids past the student's tokenizer before they reach the server."""
        from trainer.data.files import load_tokenizer

        tokenizer = load_tokenizer(student_dir)
        self.client.vocab_size = self.client.vocab_size or len(tokenizer)
        if self.config.skip_tokenizer_check:
            return
        if self._call(self.client.tokenize("")) is None:  # any tokenizer encodes the empty text
            raise UserError(
                f"the stock vLLM server at {self.config.url} cannot tokenize (started with --skip-tokenizer-init?), "
                "so the trainer cannot check that it shares the student's tokenizer: start it with its tokenizer, "
                "or set teacher.skip_tokenizer_check=true if you know they match"
            )
        for text, mine in probe_texts(tokenizer):
            if self._call(self.client.tokenize(text)) != mine:  # None: its tokenizer failed on the student's text
                raise UserError(
                    f"the stock vLLM server at {self.config.url} tokenizes a probe text differently from the "
                    "student's tokenizer: distillation needs one shared vocabulary"
                )
        if tokenizer.chat_template:
            mine = tokenizer.apply_chat_template(PROBE_CHAT, add_generation_prompt=True, tokenize=True)
            mine = mine["input_ids"] if isinstance(mine, dict) else list(mine)
            if self._call(self.client.tokenize(messages=PROBE_CHAT)) != mine:
                raise UserError(
                    f"the stock vLLM server at {self.config.url} renders a probe chat differently from the student's "
                    "chat template (or has none): the teacher would score prompts in another format"
                )

    def score(self, sequences: list[list[int]], starts: list[int], top_k: int) -> Future:
        return asyncio.run_coroutine_threadsafe(self._score(sequences, starts, top_k), self._loop)

    def continue_(self, prefixes: list[list[int]], max_tokens: int, **kwargs) -> Future:
        return asyncio.run_coroutine_threadsafe(self._continue(prefixes, max_tokens, **kwargs), self._loop)

    async def _score(self, sequences, starts, top_k):
        n = self.config.request_sequences
        parts = await asyncio.gather(
            *(
                self._timed(self.client.score(sequences[i : i + n], starts[i : i + n], top_k, **self._temperature))
                for i in range(0, len(sequences), n)
            )
        )
        return [r for part in parts for r in part]

    async def _continue(self, prefixes, max_tokens, **kwargs):
        return await self._timed(self.client.continue_(prefixes, max_tokens, **kwargs))

    async def _timed(self, coro):
        async with self._limit:
            start = time.perf_counter()
            result = await coro
            self.latencies.append(time.perf_counter() - start)
            return result

    def close(self) -> None:
        try:
            self._call(self.client.aclose())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)


class Gathered:
    """The results of a request split among teachers, back in the order of its rows: `result()` waits for each part
    (a `Future` of the results of `rows`, in order)."""

    def __init__(self, parts: list[tuple[list[int], Future]], n: int):
        self.parts, self.n = parts, n

    def result(self) -> list:
        out: list = [None] * self.n
        for rows, future in self.parts:
            for i, r in zip(rows, future.result(), strict=True):
                out[i] = r
        return out


class Teachers:
    """The run's teachers by name (`TrainConfig.teacher_sections`), each a `TeacherLink`. A request's rows go to the
    teacher each names (None: the first), all teachers at once; the answers come back in the rows' order."""

    def __init__(self, sections: dict[str, TeacherConfig]):
        self.links: dict[str, TeacherLink] = {}
        try:
            for name, section in sections.items():
                self.links[name] = TeacherLink(section)
        except BaseException:
            self.close()
            raise
        self.default = next(iter(sections))
        self.named = len(sections) > 1  # per-teacher metrics and identities only when there are several

    def name_of(self, teacher: str | None) -> str:
        return teacher or self.default

    def check(self, student_dir: str, top_k: int, student_vocab: int | None = None) -> dict[str, dict]:
        """Each teacher's info, checked as `TeacherLink.check` checks one; a refusal names the teacher."""
        infos = {}
        for name, link in self.links.items():
            try:
                infos[name] = link.check(student_dir, top_k, student_vocab)
            except UserError as exc:
                raise UserError(f"teacher {name!r}: {exc}" if self.named else str(exc)) from None
        return infos

    def _split(self, teachers: list[str | None]) -> dict[str, list[int]]:
        groups: dict[str, list[int]] = {}
        for i, teacher in enumerate(teachers):
            groups.setdefault(self.name_of(teacher), []).append(i)
        return groups

    def score(self, sequences: list[list[int]], starts: list[int], top_k: int, teachers: list[str | None]) -> Gathered:
        parts = [(rows, self.links[name].score([sequences[i] for i in rows], [starts[i] for i in rows], top_k))
                 for name, rows in self._split(teachers).items()]  # fmt: skip
        return Gathered(parts, len(sequences))

    def continue_(self, prefixes: list[list[int]], max_tokens: int, teachers: list[str | None], **kwargs) -> Gathered:
        parts = [(rows, self.links[name].continue_([prefixes[i] for i in rows], max_tokens, **kwargs))
                 for name, rows in self._split(teachers).items()]  # fmt: skip
        return Gathered(parts, len(prefixes))

    def latencies(self) -> dict[str, list[float]]:
        """Seconds of each scoring call since the last time asked, by teacher (drained)."""
        out = {}
        for name, link in self.links.items():
            out[name], link.latencies[:] = list(link.latencies), []
        return out

    def replica_requests(self) -> dict[str, int]:
        return {url: n for link in self.links.values() for url, n in link.replica_requests().items()}

    def close(self) -> None:
        for link in self.links.values():
            link.close()


def probe_texts(tokenizer, spread: int = 256) -> list[tuple[str, list[int]]]:
    """Texts and the student tokenizer's ids of them: the decoded spread of its vocabulary (ids evenly spaced,
    special tokens skipped: any tokenizer can encode its own output), and PROBE_TEXT where it can encode that."""
    ids = list(range(0, len(tokenizer), max(1, len(tokenizer) // spread)))
    texts = [tokenizer.decode(ids, skip_special_tokens=True), PROBE_TEXT]
    probes = []
    for text in texts:
        try:
            probes.append((text, tokenizer(text, add_special_tokens=False)["input_ids"]))
        except Exception:  # noqa: BLE001, S112 - a word-level vocabulary without the probe's characters
            continue
    return probes


def resolved_replicas(urls: list[str]) -> list[str]:
    """One URL per address that each URL's host resolves to (sorted, so every trainer lists them alike); a host
    that does not resolve, or is an address already, stays as it is."""
    out: list[str] = []
    for url in urls:
        parsed = httpx.URL(url)
        try:
            infos = socket.getaddrinfo(parsed.host, parsed.port or 80, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            infos = []
        addresses = sorted({info[4][0] for info in infos})
        if len(addresses) <= 1:
            out.append(url)
            continue
        for address in addresses:
            host = f"[{address}]" if ":" in address else address
            out.append(str(parsed.copy_with(host=host.strip("[]"))).rstrip("/"))
    return list(dict.fromkeys(out))


def _check_url(url: str) -> None:
    """A clear error for a URL that no retry can fix (it would otherwise be retried with back-off)."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise UserError(f"teacher.url {url!r} is not a valid URL: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise UserError(f"teacher.url {url!r} must be an http:// or https:// URL with a host, e.g. http://host:8000")
