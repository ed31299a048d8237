"""The memory plan against measured memory, and memory bounded by settings at real shapes.

A real-shaped world (tests/realworld.py `build_real_shaped`): the real world's Qwen3 student with Qwen3's 151,936-row
output head (or 32,000 rows), text prompts of about 400 tokens, the real world's teacher in process. Each run is a
`tropd train` subprocess whose own peak RSS (VmHWM) is read at its exit.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import tropd_here
from trainer.config import load_config
from trainer.plan import Shape, make_plan
from tropd.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30
# `tropd train` that prints its peak RSS (kB) on its last line of stderr, however it ends
MEASURED = (
    "import sys\nfrom tropd.cli import main\ntry:\n    sys.exit(main(sys.argv[1:]))\nfinally:\n"
    "    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
    "    print('VMHWM', hwm, file=sys.stderr)"
)


@pytest.fixture(scope="module")
def worlds(realworld, tmp_path_factory):
    from tests.realworld import build_real_shaped

    base = tmp_path_factory.mktemp("real-shaped")
    return {rows: build_real_shaped(realworld, base / str(rows), rows=rows, n_eval=128) for rows in (151936, 32000)}


def _settings(world: Path, realworld: Path, *extra: str) -> list[str]:
    return [
        f"student={world / 'student'}", "data.source=files", f"data.train=[{world / 'train-long.jsonl'}]",
        f"data.eval=[{world / 'eval-long.jsonl'}]", "rollout.prompts_per_step=8", "rollout.max_new_tokens=12",
        "eval.n=128", "eval.kl_prompts=32", "eval.every=0", "steps=2", "teacher.api=inprocess",
        f"teacher.model={realworld / 'teacher'}", "teacher.top_k=8", "tensorboard=false", "plot=false", "threads=2",
        "data.max_prompt_tokens=480", *extra,
    ]  # fmt: skip


def _measured_run(out: Path, settings: list[str]) -> tuple[subprocess.CompletedProcess, int]:
    proc = subprocess.run([sys.executable, "-c", MEASURED, "train", f"out={out}", *settings], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    peak = int(proc.stderr.strip().splitlines()[-1].split()[1]) * 1024
    return proc, peak


SHAPES = {
    "152k-whole": (151936, []),
    "152k-micro-chunk128": (151936, ["rollout.micro_batch_sequences=2", "loss_chunk_tokens=128"]),
    "32k-micro-chunk64-checkpointing": (
        32000,
        ["rollout.micro_batch_sequences=2", "loss_chunk_tokens=64", "gradient_checkpointing=true"],
    ),
}


PLANNED = re.compile(r"memory plan: peak ([0-9.]+) GiB per device \((.+?)\)")


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_the_plan_predicts_the_measured_peak_within_a_quarter(worlds, realworld, tmp_path, shape):
    """The plan the run makes at start (what `tropd train --plan` prints) against the run's own peak RSS. At
    151,936 rows with every part whole, the eval of 128 prompts of ~400 tokens also stays under a ceiling: before
    the sampler kept only the last position's logits and bounded its batches in tokens, it asked for one
    128 x 412 x 151,936 float32 tensor (32 GB)."""
    rows, extra = SHAPES[shape]
    proc, peak = _measured_run(tmp_path / "run", _settings(worlds[rows], realworld, *extra))
    assert proc.returncode == 0, proc.stderr[-2000:]
    planned = PLANNED.search(proc.stdout + proc.stderr)
    predicted, phase = float(planned.group(1)) * GiB, planned.group(2)
    ratio = predicted / peak
    print(f"{shape}: predicted {predicted / GiB:.2f} GiB ({phase}), measured {peak / GiB:.2f} GiB, ratio {ratio:.2f}")
    assert 0.75 <= ratio <= 1.25
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0
    assert all(math.isfinite(summary[k]["reverse_kl"]) for k in ("eval_before", "eval_after"))
    if shape == "152k-whole":
        assert peak < 2 * GiB, f"peak RSS {peak / GiB:.2f} GiB"


def test_a_run_that_cannot_fit_is_refused_in_one_line_before_it_allocates(realworld, tmp_path):
    """memory_limit_gb below the plan's peak: one line naming the largest part and its setting, before the teacher
    is reached (its URL here answers nothing) or the run directory is made."""
    chats = realworld / "train-chat.jsonl"
    settings = [f"student={realworld / 'student'}", "data.source=files", f"data.train=[{chats}]",
                "teacher.url=http://127.0.0.1:9", f"out={tmp_path / 'run'}", "memory_limit_gb=0.05"]  # fmt: skip
    proc = tropd_here("train", *settings)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "memory plan" in last and "does not fit the 0.05 GiB" in last and "shrink it with" in last, last
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()
    plan = tropd_here("train", "--plan", "--json", *settings)
    assert plan.returncode == 0, plan.stderr[-2000:]
    report = json.loads(plan.stdout)
    assert report["fits"] is False and report["limit_bytes"] == int(0.05 * GiB)
    assert (
        report["peak_bytes"]
        == report["parts"]["baseline"]
        + sum(v for k, v in report["parts"].items() if k != "baseline" and "." not in k)
        + report["phases"][report["peak_phase"]]
    )


def _shape(**changes) -> Shape:
    base = dict(params=10_000_000, vocab=151936, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16,
                intermediate=128)  # fmt: skip
    return Shape(**{**base, **changes})


def test_each_setting_shrinks_the_part_it_names():
    """Pure arithmetic: the settings a refusal names do shrink their parts."""

    def peak(*overrides, device="cpu", world=1):
        config = load_config(None, ["dtype=float32", "rollout.prompts_per_step=64", "rollout.max_new_tokens=512",
                                    *overrides])  # fmt: skip
        return make_plan(config, _shape(), device=device, world=world, limit_bytes=GiB, baseline_bytes=0,
                         prompt_tokens=400).as_json()  # fmt: skip

    base = peak()
    assert (
        peak("loss_chunk_tokens=64")["parts"]["step.output head's logits chunk"]
        < (base["parts"]["step.output head's logits chunk"])
    )
    assert peak("rollout.micro_batch_sequences=4")["phases"]["step"] < base["phases"]["step"]
    assert peak("gradient_checkpointing=true")["phases"]["step"] < base["phases"]["step"]
    small = peak("rollout.sample_batch_tokens=4096")
    assert small["phases"]["rollout decoding"] < base["phases"]["rollout decoding"]
    sharded = peak("parallel=fsdp", world=4)
    assert sharded["parts"]["optimizer state (AdamW, float32)"] * 4 == base["parts"]["optimizer state (AdamW, float32)"]
    assert (
        peak("dtype=bfloat16", device="cuda")["phases"]["rollout decoding"]
        < peak(device="cuda")["phases"]["rollout decoding"]
    )


def test_a_vllm_rollout_engine_is_in_the_plan():
    """rollout.engine=vllm: on CPU the engine's weights, KV cache (sized by rollout.sample_batch_tokens) and runtime
    stay resident and the trainer's own sampling phases go; on CUDA the engine's share of the device is a phase of
    its own (it sleeps while the trainer steps)."""
    from trainer.plan import VLLM_RUNTIME_BYTES

    def plan(device, *overrides):
        config = load_config(None, ["dtype=float32", "rollout.prompts_per_step=64", "rollout.max_new_tokens=512",
                                    *overrides])  # fmt: skip
        return make_plan(config, _shape(), device=device, world=1, limit_bytes=80 * GiB, baseline_bytes=0,
                         prompt_tokens=400, engine="vllm").as_json()  # fmt: skip

    cpu = plan("cpu", "rollout.sample_batch_tokens=8192")
    assert cpu["parts"]["rollout engine's weights (vLLM)"] == 4 * _shape().params
    assert cpu["parts"]["rollout engine's KV cache (vLLM)"] == 4 * 8192 * _shape().kv_bytes_per_token
    assert cpu["parts"]["rollout engine's runtime (vLLM)"] == VLLM_RUNTIME_BYTES
    assert not any(name.startswith(("rollout prefill", "rollout decoding", "eval prefill")) for name in cpu["phases"])
    cuda = plan("cuda", "rollout.vllm_memory_share=0.25")
    assert cuda["phases"]["rollout (vLLM)"] == int(0.25 * 80 * GiB)
    assert not any(name.startswith("rollout engine's") for name in cuda["parts"])  # nothing resident


def test_the_plan_is_refused_for_an_unreadable_model(tmp_path):
    from trainer.plan import read_shape

    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="memory plan: cannot read the model config"):
        read_shape(tmp_path)


def test_dtype_auto_is_bfloat16_on_cuda_only():
    import torch

    from trainer.models import autocast_dtype, resolve_dtype

    assert resolve_dtype("auto", torch.device("cpu")) == "float32"
    assert resolve_dtype("bfloat16", torch.device("cpu")) == "bfloat16"
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        assert resolve_dtype("auto", torch.device("cuda")) == "bfloat16"
    assert autocast_dtype(load_config(None, ["dtype=bfloat16"])) is torch.bfloat16
    with pytest.raises(ValueError, match="resolved when a run starts"):
        autocast_dtype(load_config(None, []))
