"""torchrun on CPU with the real-shaped Qwen3 world: FSDP2 (`parallel: fsdp`) and DDP over 2 processes train like one
process with the same global batch (sampling through the sharded root in lockstep, evaluation on every rank, sharded
checkpoints under FSDP that resume under another world size)."""

from __future__ import annotations

import json
import shutil
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
        "optim.warmup_steps=10", "optim.schedule=constant", "export_every=2", *extra,
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
    # `export_every=2`: step 2's student as a whole folder (under FSDP gathered from the shards), the last step's
    # only as student/
    for run in (one, tmp_path / "two"):
        assert sorted(p.name for p in (run / "exports").iterdir()) == ["step-000002"]
    a2 = load_file(one / "exports" / "step-000002" / "model.safetensors")
    b2 = load_file(tmp_path / "two" / "exports" / "step-000002" / "model.safetensors")
    assert a2.keys() == a.keys() and (tmp_path / "two" / "exports" / "step-000002" / "tokenizer.json").is_file()
    assert any(not torch.allclose(a2[k], a[k], atol=1e-6) for k in a)  # step 2's, not the final weights
    for key in a2:
        assert torch.allclose(a2[key], b2[key], atol=1e-5, rtol=1e-4), (key, (a2[key] - b2[key]).abs().max())
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


def test_a_checkpoint_resumes_under_another_world_size_and_across_ddp_and_fsdp(realworld, one, tmp_path):
    """FSDP (with micro-batches and gradient checkpointing) writes sharded checkpoints (`dcp/`: each rank writes its
    shards, nothing is gathered, no whole student in the checkpoint), which resume under FSDP over 2 processes and in
    1 process; DDP's (whole, the optimizer state by parameter name) resume under FSDP. Every run ends where one
    straight process of 3 steps ends (the module's one-process run: its checkpoints change nothing it computes)."""
    # FSDP with micro-batches and gradient checkpointing (they change how a step runs, not what it computes)
    how = ("rollout.micro_batch_sequences=2", "gradient_checkpointing=true")
    fsdp = _torchrun(*_args(realworld, tmp_path / "fsdp-then-fsdp", "steps=2", "parallel=fsdp", *how))
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    ckpt = tmp_path / "fsdp-then-fsdp" / "checkpoints" / "step-000002"
    assert (ckpt / "dcp" / ".metadata").is_file() and len(list((ckpt / "dcp").glob("*.distcp"))) == 2
    assert not (ckpt / "student" / "model.safetensors").exists() and (ckpt / "student" / "config.json").is_file()
    assert (tmp_path / "fsdp-then-fsdp" / "student" / "model.safetensors").is_file()  # the final one, gathered
    shutil.copytree(tmp_path / "fsdp-then-fsdp", tmp_path / "fsdp-then-one")
    ddp = _torchrun(*_args(realworld, tmp_path / "ddp-then-fsdp", "steps=2", "parallel=ddp"))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert not (tmp_path / "ddp-then-fsdp" / "checkpoints" / "step-000002" / "dcp").exists()
    for name, (then, *after) in (
        ("fsdp-then-fsdp", (_torchrun, "parallel=fsdp", *how)),
        ("fsdp-then-one", (_one, "parallel=ddp")),
        ("ddp-then-fsdp", (_torchrun, "parallel=fsdp")),
    ):
        out = tmp_path / name
        rest = then(*_args(realworld, out, "steps=3", *after), "--resume")
        assert rest.returncode == 0, rest.stderr[-3000:]
        a = load_file(one / "student" / "model.safetensors")
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


def test_sharded_state_round_trips_in_one_process(tmp_path):
    """`save_sharded` / `load_sharded` (torch.distributed.checkpoint) without a process group: the weights and every
    AdamW state of a fresh model and optimizer equal the saved ones."""
    from trainer.parallel import DataParallel

    dp = DataParallel(1, torch.device("cpu"))
    torch.manual_seed(0)

    def make():
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
        return model, torch.optim.AdamW(model.parameters(), lr=0.1)

    model, optimizer = make()
    model(torch.ones(2, 3)).sum().backward()
    optimizer.step()
    dp.save_sharded(model, optimizer, tmp_path / "dcp")
    again, fresh = make()
    dp.load_sharded(again, fresh, tmp_path / "dcp")
    for a, b in zip(model.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)
    saved, loaded = optimizer.state_dict()["state"], fresh.state_dict()["state"]
    assert saved.keys() == loaded.keys() and len(saved) == 4
    for key in saved:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(saved[key][name], loaded[key][name]), (key, name)
