"""The trainer on CUDA (run by scripts/gpu-check.sh where a GPU is lent; skipped without one): the real-shaped
Qwen3 world trains in float32 and in bfloat16 autocast, and the student's scores on the GPU equal the CPU's."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from trainer.config import load_config
from trainer.run import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_trains_on_cuda(realworld, tmp_path, dtype):
    out = tmp_path / "run"
    config = load_config(None, [
        f"student={realworld / 'student'}", f"out={out}", "data.source=files",
        f"data.train=[{realworld / 'train-chat.jsonl'}]", "teacher.api=inprocess",
        f"teacher.model={realworld / 'teacher'}", "steps=6", "device=cuda", f"dtype={dtype}",
        "rollout.prompts_per_step=8", "rollout.max_new_tokens=24", "rollout.micro_batch_sequences=3",
        "loss_chunk_tokens=64", "gradient_checkpointing=true", "eval.n=8", "eval.kl_prompts=8",
        "tensorboard=false", "plot=false", "optim.warmup_steps=10", "optim.schedule=constant",
    ])  # fmt: skip
    summary = train(config, log=lambda *_: None)
    assert summary["skipped_steps"] == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert all(r["peak_memory_mb"] > 0 for r in steps)
    after, init = (
        load_file(out / "student" / "model.safetensors"),
        load_file(realworld / "student" / "model.safetensors"),
    )
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in after.values())  # fp32 master weights
    assert any(not torch.allclose(after[k], init[k]) for k in after)


def test_student_scores_on_cuda_equal_the_cpus(realworld):
    from transformers import AutoModelForCausalLM

    from trainer.student import ScoringModule, StudentStep

    model = AutoModelForCausalLM.from_pretrained(realworld / "student", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 600, (n,), generator=g).tolist() for n in (5, 9, 3, 7)]
    responses = [torch.randint(0, 600, (n,), generator=g).tolist() for n in (6, 2, 8, 4)]
    top_ids = torch.randint(0, 600, (4, 8, 5), generator=g)
    results = []
    for device in ("cpu", "cuda"):
        module = ScoringModule(model.to(device), chunk_tokens=7)
        step = StudentStep(module, prompts, responses, 0, top_ids, micro_batch_sequences=3, device=device)
        scores = step.scores()
        results.append([scores.lp_B_T[step.mask_B_T].cpu(), scores.topk_lp_B_T_K1[step.mask_B_T].cpu()])
    for cpu, cuda in zip(*results, strict=True):
        assert torch.allclose(cpu, cuda, atol=1e-4), (cpu - cuda).abs().max()
