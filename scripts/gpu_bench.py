"""Trainer steps on random-initialised Qwen3-shaped models, for a GPU: tokens/s and peak GPU memory.

The student has Qwen3-0.6B's shape and the teacher (in the trainer's process, transformers engine) Qwen3-1.7B's,
both with Qwen's 151,936-row embedding table and a byte-level BPE tokenizer with ChatML (from the tests' real-shaped
world, which also gives the prompts). Random weights: speed and memory do not depend on them.

    python scripts/gpu_bench.py --out DIR [--tiny] [--steps N] [--device cuda|cpu]

`--tiny` shrinks both models to a few layers of width 64, to check the script on a CPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {  # Qwen3 family shapes (config.json of the published models)
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128),
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128),
    "tiny-student": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=32),
    "tiny-teacher": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=3, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=32),
}  # fmt: skip
VOCAB = 151936


def make_model(shape: str, world: Path, out: Path, seed: int) -> Path:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    student = world / "student"
    generation = json.loads((student / "generation_config.json").read_text())
    config = Qwen3Config(vocab_size=VOCAB, max_position_embeddings=4096, tie_word_embeddings=True,
                         eos_token_id=generation["eos_token_id"], pad_token_id=generation.get("pad_token_id"),
                         **SHAPES[shape])  # fmt: skip
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = generation["eos_token_id"]
    path = out / shape
    model.save_pretrained(path, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (student / name).is_file():
            shutil.copy2(student / name, path / name)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="working directory (models, runs, bench.json)")
    parser.add_argument("--tiny", action="store_true", help="tiny models, to check the script on a CPU")
    parser.add_argument("--steps", type=int, default=8, help="trainer steps (the first 2 are warm-up)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = parser.parse_args()
    import torch

    from tests.realworld import build_realworld
    from trainer.config import load_config
    from trainer.run import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    world = build_realworld(out / "world")
    student = make_model("tiny-student" if args.tiny else "qwen3-0.6b", world, out, seed=0)
    teacher = make_model("tiny-teacher" if args.tiny else "qwen3-1.7b", world, out, seed=1)
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "runs": {}}
    prompts, tokens, micro = (8, 32, 4) if args.tiny else (64, 512, 16)
    for dtype in ("bfloat16",) if args.tiny else ("bfloat16", "float32"):
        run = out / f"run-{dtype}"
        shutil.rmtree(run, ignore_errors=True)
        config = load_config(None, [
            f"student={student}", f"out={run}", "data.source=files", f"data.train=[{world / 'train-chat.jsonl'}]",
            "teacher.api=inprocess", f"teacher.model={teacher}", f"steps={args.steps}", f"device={args.device}",
            f"dtype={dtype}", f"rollout.prompts_per_step={prompts}", "rollout.samples_per_prompt=1",
            f"rollout.max_new_tokens={tokens}", f"rollout.micro_batch_sequences={micro}", "gradient_checkpointing=true",
            "eval.before_after=false", "eval.every=0", "checkpoint_every=0", "tensorboard=false", "plot=false",
            "teacher.top_k=16", "optim.lr=1e-6",
        ])  # fmt: skip
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        train(config, log=lambda *a: print(*a, file=sys.stderr))
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        steady = [r for r in records if "loss" in r][2:]
        report["runs"][dtype] = {
            "student": student.name, "teacher": teacher.name, "prompts_per_step": prompts, "max_new_tokens": tokens,
            "micro_batch_sequences": micro, "steps": args.steps, "wall_s": round(time.perf_counter() - start, 1),
            "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in steady),
            "step_s": statistics.mean(r["step_s"] for r in steady),
            "sample_s": statistics.mean(r["sample_s"] for r in steady),
            "response_tokens": statistics.mean(r["response_tokens"] for r in steady),
            "peak_memory_mb": max((r.get("peak_memory_mb", 0.0) for r in steady), default=0.0),
            "skipped_steps": records[-1].get("skipped_steps"),
        }  # fmt: skip
        print(json.dumps(report["runs"][dtype]), file=sys.stderr)
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
