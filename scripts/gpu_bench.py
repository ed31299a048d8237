"""Trainer steps at a real shape on a GPU: rollout and training tokens/s, the training step's MFU, and the peak memory
of each phase beside the memory plan's prediction.

The student has Qwen3-0.6B's shape and the teacher (in the trainer's process, transformers engine) Qwen3-1.7B's,
both with Qwen's 151,936-row embedding table and a byte-level BPE tokenizer with ChatML (from the tests' real-shaped
world, which also gives the prompts). Random weights: speed and memory do not depend on them. 64 prompts x 1,024
response tokens a step in bfloat16 (`dtype: auto` on CUDA).

    python scripts/gpu_bench.py --work DIR [--tiny] [--steps N] [--device cuda|cpu]   # JSON on stdout

`--work` holds the models and the run (gigabytes: keep it out of what must come back); only the JSON report is
printed. `--tiny` shrinks both models to a few layers of width 64 and the batch to 8 x 32, to check the script on a
CPU.
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
# dense bf16 peak FLOP/s by device name (the vendors' data sheets, without sparsity)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}


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


def peak_flops(device_name: str) -> float | None:
    return next((flops for key, flops in PEAK_BF16.items() if key in device_name), None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="working directory for the models and the run (large)")
    parser.add_argument("--tiny", action="store_true", help="tiny models and batch, to check the script on a CPU")
    parser.add_argument("--steps", type=int, default=4, help="trainer steps (the first 2 are warm-up)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = parser.parse_args()
    if args.steps < 3:
        parser.error("--steps must be at least 3 (the first 2 are warm-up)")
    import torch

    from tests.realworld import build_realworld
    from trainer.config import load_config
    from trainer.run import plan, train

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    world = build_realworld(work / "world")
    student = make_model("tiny-student" if args.tiny else "qwen3-0.6b", world, work, seed=0)
    teacher = make_model("tiny-teacher" if args.tiny else "qwen3-1.7b", world, work, seed=1)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    prompts, tokens, micro = (8, 32, 4) if args.tiny else (64, 1024, 16)
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    config = load_config(None, [
        f"student={student}", f"out={run}", "data.source=files", f"data.train=[{world / 'train-chat.jsonl'}]",
        "teacher.api=inprocess", f"teacher.model={teacher}", f"steps={args.steps}", f"device={args.device}",
        f"rollout.prompts_per_step={prompts}", "rollout.samples_per_prompt=1", f"rollout.max_new_tokens={tokens}",
        f"rollout.micro_batch_sequences={micro}", "gradient_checkpointing=true", "eval.before_after=false",
        "eval.every=0", "checkpoint_every=0", "tensorboard=false", "plot=false", "teacher.top_k=16", "optim.lr=1e-6",
    ])  # fmt: skip
    predicted = plan(config, log=lambda *a: print(*a, file=sys.stderr))
    start = time.perf_counter()
    train(config, log=lambda *a: print(*a, file=sys.stderr))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in records if "loss" in r][2:]

    def mean(key: str) -> float:
        return statistics.mean(r.get(key, 0.0) for r in steady)

    response = mean("response_tokens")
    train_s = mean("step_s") - mean("sample_s") - mean("wait_teacher_s")
    params = predicted.as_json()["parts"]["weights (float32)"] // 4
    prompt_tokens = mean("prompt_tokens")
    # model FLOPs of the training step: a no-grad scoring forward (2N a token), a forward and backward (6N) and the
    # checkpointed forward again (2N), over every token of the sequences (attention's own FLOPs left out)
    flops = 10 * params * (response + prompt_tokens)
    peak = peak_flops(device_name) if args.device == "cuda" else None
    phases = predicted.as_json()["phases"]
    resident = predicted.peak_bytes - phases[predicted.peak_phase]
    report = {
        "device": device_name, "student": student.name, "teacher": teacher.name, "prompts_per_step": prompts,
        "max_new_tokens": tokens, "micro_batch_sequences": micro, "steps": args.steps, "dtype": "auto",
        "wall_s": round(time.perf_counter() - start, 1), "response_tokens": response,
        "rollout_tokens_per_s": response / max(1e-9, mean("sample_s")),
        "training_tokens_per_s": (response + prompt_tokens) / max(1e-9, train_s),
        "step_s": mean("step_s"), "sample_s": mean("sample_s"), "wait_teacher_s": mean("wait_teacher_s"),
        "mfu": flops / max(1e-9, train_s) / peak if peak else None,
        "measured_peak_mb": {phase: max(r.get(f"peak_{phase}_mb", 0.0) for r in steady)
                             for phase in ("rollout", "score", "step")},
        "predicted_peak_mb": {
            "rollout": (resident + max(phases["rollout prefill"], phases["rollout decoding"])) / 2**20,
            "step": (resident + phases["step"]) / 2**20,
        },
        "skipped_steps": records[-1].get("skipped_steps"),
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
