"""`service_over_engine` measured with each path alone on the machine (`tropd bench teacher`, key
`separated`).

The co-resident method of `bench.py` keeps the in-process engine loaded while the service runs, so that two
engine processes bind their threads to the same cores. Here each phase has only its own process alive:

  A  the engine in a subprocess (`python -m services.teacher.bench.alone SPEC OUT`): it loads, times its
     passes, writes the seconds to OUT and exits before anything else starts;
  B  `tropd teacher serve` alone, timed through `TeacherClient` (binary body, 1 client).

The phases alternate A B A B (`alternations` pairs), so that load drifting over the run weighs on both alike;
each phase takes two warm-up passes, then `repeats` timed ones. Reported: the median tokens/s of all A
passes and of all B passes, and their ratio b/a.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

WARMUP_PASSES = 2


def engine_phase(spec: dict) -> list[float]:
    """In the subprocess: load the engine, time `repeats` passes of 1 client (one engine call per request)."""
    from services.teacher.bench.passes import EnginePasses
    from services.teacher.engines.load import load_engine

    engine = load_engine(spec["engine"], spec["model"], max_top_k=spec["max_top_k"])
    passes = EnginePasses(engine, spec["requests"], spec["top_k"])
    return _timed(passes.for_clients(1), spec["repeats"], passes.close)


def _timed(one_pass, repeats: int, close) -> list[float]:
    """`WARMUP_PASSES` untimed passes, then the seconds of `repeats` timed ones; `close` runs in any case."""
    try:
        for _ in range(WARMUP_PASSES):
            one_pass()
        return [one_pass()[0] for _ in range(repeats)]
    finally:
        close()


def _engine_alone(spec: dict, workdir: Path, env: dict, timeout: float) -> list[float]:
    spec_path, out = workdir / "spec.json", workdir / "engine-seconds.json"
    spec_path.write_text(json.dumps(spec))
    out.unlink(missing_ok=True)
    command = [sys.executable, "-m", "services.teacher.bench.alone", str(spec_path), str(out)]
    with open(workdir / "engine.log", "ab") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    if done.returncode != 0 or not out.is_file():
        tail = (workdir / "engine.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"the engine subprocess failed ({done.returncode}):\n{tail}")
    return json.loads(out.read_text())


def _service_alone(spec: dict, workdir: Path, env: dict, timeout: float) -> list[float]:
    from services.teacher.bench.passes import HttpPasses
    from services.teacher.client import TeacherClient
    from services.teacher.launch import serving

    options = ("--max-top-k", str(spec["max_top_k"]), "--log-level", "warning")
    log = workdir / "service.log"
    with serving(spec["model"], spec["engine"], log, *options, env=env, timeout=timeout) as service:
        with asyncio.Runner() as runner:
            passes = HttpPasses(runner, lambda: TeacherClient(service.url, binary=True), spec["requests"], 1,
                                spec["top_k"])  # fmt: skip
            return _timed(passes, spec["repeats"], passes.close)


def measure_alone(model: str, engine: str, requests: list, top_k: int, max_top_k: int, repeats: int,
                  alternations: int, timeout: float, progress=print) -> dict:  # fmt: skip
    """A B A B...: the engine alone in a subprocess, then the service alone; b/a from the medians."""
    tokens = sum(len(seq) - 1 for request in requests for seq in request)
    spec = {"model": model, "engine": engine, "requests": requests, "top_k": top_k, "max_top_k": max_top_k,
            "repeats": repeats}  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    seconds: dict[str, list[float]] = {"engine": [], "service_binary": []}
    with tempfile.TemporaryDirectory(prefix="tropd-bench-alone-") as tmp:
        workdir = Path(tmp)
        for i in range(alternations):
            seconds["engine"] += _engine_alone(spec, workdir, env, timeout)
            speed = tokens / statistics.median(seconds["engine"])
            progress(f"bench: separated A{i + 1} (engine alone): {speed:,.0f} tok/s")
            seconds["service_binary"] += _service_alone(spec, workdir, env, timeout)
            speed = tokens / statistics.median(seconds["service_binary"])
            progress(f"bench: separated B{i + 1} (service alone): {speed:,.0f} tok/s")
    speed = {name: tokens / statistics.median(s) for name, s in seconds.items()}
    return {
        "engine": engine,
        "order": "A B " * alternations,
        "seconds": seconds,
        "tokens_per_s": speed,
        "service_over_engine": speed["service_binary"] / speed["engine"],
    }


if __name__ == "__main__":  # the engine phase, in its own process
    spec_file, out_file = sys.argv[1:3]
    result = engine_phase(json.loads(Path(spec_file).read_text()))
    Path(out_file).write_text(json.dumps(result))
