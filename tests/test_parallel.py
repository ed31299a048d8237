"""torchrun on CPU with the real-shaped Qwen3 world: FSDP2 (`parallel: fsdp`) and DDP over 2 processes train like one
process with the same global batch (sampling through the sharded root in lockstep, evaluation on every rank, full
state gathered for checkpoints)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import free_port


def _args(world, out, *extra):
    return [
        f"student={world / 'student'}", f"out={out}", "data.source=files", f"data.train=[{world / 'train-chat.jsonl'}]",
        "teacher.api=inprocess", f"teacher.model={world / 'teacher'}", "steps=3", "checkpoint_every=2",
        "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=12", "eval.n=4",
        "eval.kl_prompts=4", "tensorboard=false", "plot=false", "threads=1", "device=cpu", "guidance.decay_steps=2",
        "optim.warmup_steps=10", "optim.schedule=constant", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_two_processes_match_one(realworld, tmp_path, parallel):
    one = subprocess.run([sys.executable, "-m", "tropd", "train", *_args(realworld, tmp_path / "one")],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    two_args = _args(realworld, tmp_path / "two", f"parallel={parallel}")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), "-m", "tropd", "train", *two_args]  # fmt: skip
    two = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_file(tmp_path / "one" / "student" / "model.safetensors")
    b = load_file(tmp_path / "two" / "student" / "model.safetensors")
    init = load_file(realworld / "student" / "model.safetensors")
    assert a.keys() == b.keys() == init.keys()
    assert any(not torch.allclose(a[k], init[k], atol=1e-4) for k in a)  # training moved the weights
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), (key, (a[key] - b[key]).abs().max())
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
