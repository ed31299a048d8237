"""torchrun on CPU with the real-shaped Qwen3 world: FSDP2 (`parallel: fsdp`) and DDP over 2 processes train like one
process with the same global batch (sampling through the sharded root in lockstep, evaluation on every rank, full
state gathered for checkpoints)."""

from __future__ import annotations

import json
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
        "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=12", "eval.n=5",
        "eval.kl_prompts=5", "tensorboard=false", "plot=false", "threads=1", "device=cpu", "guidance.decay_steps=2",
        "optim.warmup_steps=10", "optim.schedule=constant", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def one(realworld, tmp_path_factory):
    """The one-process run that both two-process runs are compared with: trained once."""
    out = tmp_path_factory.mktemp("one-process") / "one"
    result = subprocess.run([sys.executable, "-m", "tropd", "train", *_args(realworld, out)], capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_two_processes_match_one(realworld, one, tmp_path, parallel):
    two_args = _args(realworld, tmp_path / "two", f"parallel={parallel}")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), "-m", "tropd", "train", *two_args]  # fmt: skip
    two = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_file(one / "student" / "model.safetensors")
    b = load_file(tmp_path / "two" / "student" / "model.safetensors")
    init = load_file(realworld / "student" / "model.safetensors")
    assert a.keys() == b.keys() == init.keys()
    assert any(not torch.allclose(a[k], init[k], atol=1e-4) for k in a)  # training moved the weights
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), (key, (a[key] - b[key]).abs().max())
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    # evaluation spread over the ranks (each its share of the prompts, gathered on rank 0) gives one process's numbers
    one_eval, two_eval = (json.loads((run / "summary.json").read_text()) for run in (one, tmp_path / "two"))
    for when in ("eval_before", "eval_after"):
        assert one_eval[when]["accuracy"] == two_eval[when]["accuracy"]
        assert abs(one_eval[when]["reverse_kl"] - two_eval[when]["reverse_kl"]) < 1e-3 * abs(
            one_eval[when]["reverse_kl"]
        )


def _torchrun(*args):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), "-m", "tropd", "train", *args]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def _one(*args):
    return subprocess.run([sys.executable, "-m", "tropd", "train", *args], capture_output=True, text=True, timeout=600)


def test_a_checkpoint_resumes_under_another_world_size_and_from_ddp_to_fsdp(realworld, tmp_path):
    """The optimizer state is saved by parameter name, whole: FSDP over 2 processes -> 1 process, and DDP over 2 ->
    FSDP over 2, both end where one straight process of 3 steps ends."""
    straight = _one(*_args(realworld, tmp_path / "straight", "checkpoint_every=0"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    for name, (first, before), (then, after) in (
        ("fsdp-then-one", (_torchrun, "parallel=fsdp"), (_one, "parallel=ddp")),
        ("ddp-then-fsdp", (_torchrun, "parallel=ddp"), (_torchrun, "parallel=fsdp")),
    ):
        out = tmp_path / name
        part = first(*_args(realworld, out, "steps=2", before))
        assert part.returncode == 0, part.stderr[-3000:]
        rest = then(*_args(realworld, out, "steps=3", after), "--resume")
        assert rest.returncode == 0, rest.stderr[-3000:]
        a = load_file(tmp_path / "straight" / "student" / "model.safetensors")
        b = load_file(out / "student" / "model.safetensors")
        for key in a:
            assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), (name, key, (a[key] - b[key]).abs().max())


def test_a_checkpoint_of_an_earlier_version_resumes_without_fsdp_and_is_refused_with_it():
    """Earlier checkpoints keyed the optimizer state by parameter index: loaded as they are in one process (or
    DDP); under FSDP one line says how to go on."""
    from trainer.parallel import DataParallel
    from tropd.errors import UserError

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    legacy = optimizer.state_dict()
    assert all(isinstance(k, int) for k in legacy["state"])
    fresh = torch.optim.AdamW(model.parameters(), lr=0.1)
    DataParallel(1, torch.device("cpu")).load_optimizer(model, fresh, legacy)
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], legacy["state"][0]["exp_avg"])

    class Sharded(DataParallel):
        sharded = True

    with pytest.raises(UserError, match="earlier version .* resume with parallel=ddp"):
        Sharded(1, torch.device("cpu"), "fsdp").load_optimizer(model, fresh, legacy)
