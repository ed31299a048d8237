"""Section (f) of `tropd bench trainer`: the rollout engines, `torch` (the trainer's own loop) against `vllm` (a vLLM
engine in the process), on the workloads of section (e) (`--quick`: the toy student's only), the time of one
weight sync into the engine (the fastest of 3), and what the engine adds to the process's resident memory beyond
its weights and KV cache (`vllm_runtime_mb`; the first engine's includes importing vLLM): the figure the memory plan
takes as `trainer.plan.VLLM_RUNTIME_BYTES`.

vLLM changes process-wide state (it binds threads and reduces torch's), so this runs in its own process,
`python -m trainer.bench.engines [--quick] [--threads N]`, which prints one JSON object; the torch loop is
measured first, then each vLLM engine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def measure(quick: bool, threads: int) -> dict:
    import torch

    from trainer.bench.speed import STOP_EVERY, rollout_workloads
    from trainer.plan import MiB, process_rss_bytes, read_shape
    from trainer.rollout.sampling import sample
    from trainer.rollout.vllm_engine import VLLMRollout

    torch.set_num_threads(threads)
    rows, new_tokens, reps = (16, 32, 2) if quick else (64, 128, 3)
    workloads = list(rollout_workloads(rows))
    if quick:  # a vLLM engine takes about 12 s to start on 2 cores: the toy student alone
        workloads = workloads[:1]
    shapes: dict[str, dict] = {}
    for name, model, prompts, stops in workloads:  # the torch loop first: vLLM changes the process's threads
        best = 0.0
        for rep in range(reps + 1):
            start = time.perf_counter()
            roll = sample(model, prompts, max_new_tokens=new_tokens, pad_id=0, stop_ids=stops,
                          generator=torch.Generator().manual_seed(rep))  # fmt: skip
            if rep:
                best = max(best, int(roll.lengths_B.sum()) / (time.perf_counter() - start))
        shapes[name] = {"params": sum(p.numel() for p in model.parameters()), "torch_tokens_per_s": best}
    with tempfile.TemporaryDirectory(prefix="tropd-bench-engines-") as tmp:
        for name, model, prompts, stops in workloads:
            folder = os.path.join(tmp, name)
            model.save_pretrained(folder, safe_serialization=True)
            width = max(map(len, prompts)) + new_tokens
            before = process_rss_bytes()
            engine = VLLMRollout(folder, dtype="float32", max_model_len=width, cache_tokens=rows * width, seed=0)
            # float32 weights and KV cache, sized as the engine sizes its cache
            own = 4 * shapes[name]["params"] + 4 * max(rows * width, width) * read_shape(folder).kv_bytes_per_token
            runtime_mb = (process_rss_bytes() - before - own) / MiB
            best = 0.0
            for rep in range(reps + 1):
                start = time.perf_counter()
                seeds = range(rep * rows, (rep + 1) * rows)
                responses, _ = engine.sample(prompts, max_new_tokens=new_tokens, temperature=1.0, top_p=1.0,
                                             stop_ids=list(stops), seeds=seeds)  # fmt: skip
                if rep:
                    best = max(best, sum(map(len, responses)) / (time.perf_counter() - start))
            sync_ms = min(engine.sync(model) for _ in range(3)) * 1000
            engine.close()
            shapes[name].update({"vllm_tokens_per_s": best, "vllm_over_torch_rollout_tokens_per_s":
                                 best / shapes[name]["torch_tokens_per_s"], "sync_ms": sync_ms,
                                 "vllm_runtime_mb": runtime_mb})  # fmt: skip
    settings = {"rows": rows, "new_tokens": new_tokens, "stop_every": STOP_EVERY, "threads": threads, "best_of": reps}
    return {"settings": settings, "shapes": shapes}


def main() -> int:
    parser = argparse.ArgumentParser(description="the rollout engines side by side (section (f))")
    parser.add_argument("--quick", action="store_true", help="16 rows x up to 32 tokens (else 64 x up to 128)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(json.dumps(measure(args.quick, args.threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
