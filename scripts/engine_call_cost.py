"""What one scoring call of a teacher engine costs, in this process: its wall time, the CPU time of the process
during it (all threads), and the wall time per token, for batches of 256-token sequences from one to 128 of them.

`tropd bench teacher --fair-share` reports how close the fair scheduler comes to the least a small request can take
beside other clients; these numbers say what part of that is the engine's own: whether one call keeps every core
busy (CPU / wall near the core count) and whether a larger call costs less per token (a fixed cost per call).

    python scripts/engine_call_cost.py [--engine hf|vllm] [--model artifacts/toy-quick/teacher] [--calls 20]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEQUENCES = (1, 2, 8, 32, 128)
LENGTH = 256


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=("hf", "vllm"), default="hf")
    parser.add_argument("--model", default="artifacts/toy-quick/teacher")
    parser.add_argument("--calls", type=int, default=20, help="timed calls per size, after 2 warm-ups (20)")
    args = parser.parse_args(argv)
    if not Path(args.model).is_dir():
        parser.error(f"--model {args.model}: no such directory (build the quick toy world: tropd toy build --quick)")
    if args.calls < 1:
        parser.error("--calls must be at least 1")

    import numpy as np

    from services.teacher.engines.load import load_engine
    from services.teacher.engines.types import ScoreItem

    engine = load_engine(args.engine, args.model)
    rng = np.random.default_rng(0)
    print(f"{args.engine} engine, {args.model}, {LENGTH}-token sequences, top-5, {args.calls} calls per size")
    print(f"{'tokens':>8} {'wall ms':>9} {'cpu ms':>9} {'cpu/wall':>9} {'us/token':>9}")
    for n in SEQUENCES:
        items = [ScoreItem(rng.integers(0, engine.info.vocab_size, LENGTH).tolist(), 1, 5) for _ in range(n)]
        for _ in range(2):
            engine.score(items)
        calls = max(1, args.calls * 8 // max(n, 8))  # fewer calls of the large batches
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(calls):
            engine.score(items)
        wall, cpu = (time.perf_counter() - wall) / calls, (time.process_time() - cpu) / calls
        per_token = wall / (n * LENGTH) * 1e6
        print(f"{n * LENGTH:>8} {wall * 1e3:>9.1f} {cpu * 1e3:>9.1f} {cpu / wall:>9.2f} {per_token:>9.1f}")
    engine.close()


if __name__ == "__main__":
    main()
