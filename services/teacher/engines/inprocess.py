"""A teacher engine loaded in the caller's process, behind the client's interface (no HTTP).

For users who want the teacher beside the student (one machine, enough memory), and for measuring what
the service costs against it (`tropd bench trainer`). Calls run on one worker thread, as in the service.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

from services.teacher.engines.load import load_engine
from services.teacher.engines.types import SamplingSpec, ScoreItem
from services.teacher.protocol import PROTOCOL_VERSION


class InProcessTeacher:
    def __init__(self, model_dir: str, engine: str = "hf", max_top_k: int = 20):
        self.engine = load_engine(engine, model_dir, max_top_k=max_top_k)
        self.max_top_k = min(max_top_k, self.engine.info.vocab_size)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher-engine")

    async def info(self) -> dict:
        return {**asdict(self.engine.info), "max_top_k": self.max_top_k, "protocol": PROTOCOL_VERSION}

    async def score(self, sequences, start=1, top_k: int = 0, temperature: float = 1.0):
        starts = [start] * len(sequences) if isinstance(start, int) else list(start)
        t = float(temperature)
        items = [ScoreItem(list(s), int(b), top_k, temperature=t) for s, b in zip(sequences, starts, strict=True)]
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.engine.score, items)

    async def continue_(self, prefixes, max_tokens: int, *, temperature=1.0, top_p=1.0, seed=None, stop_ids=(),
                        top_k=0):  # fmt: skip
        spec = SamplingSpec(max_tokens, float(temperature), float(top_p), seed, tuple(stop_ids), top_k)
        prefixes = [list(p) for p in prefixes]
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.engine.generate, prefixes, spec)

    async def aclose(self) -> None:
        self._pool.shutdown(wait=True)
        self.engine.close()
