"""The trainer on a real-shaped world (byte-level BPE with ChatML, Qwen3 teacher and student whose embedding tables are
larger than the tokenizer, JSONL prompt files): end to end over HTTP, checkpoints, exact resume, held-out reverse KL,
chunked and micro-batched steps equal to whole ones, and the start-up refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from services.teacher.launch import half_the_cores
from trainer.config import load_config
from trainer.run import train
from tropd.errors import UserError

# torch threads: half the cores, the other half left to a teacher service; with every core, the trainer's OpenMP
# threads spin against the service's (and any other load) and a step takes many times as long
SMALL = [
    "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=16", "eval.n=8",
    "eval.kl_prompts=8", "eval.every=0", "tensorboard=false", "plot=false", "teacher.top_k=8",
    f"threads={half_the_cores()}",
]  # fmt: skip


def _config(world, out, form: str, *extra: str):
    return load_config(None, [
        f"student={world / 'student'}", f"out={out}", "data.source=files",
        f"data.train=[{world / f'train-{form}.jsonl'}]", f"data.eval=[{world / f'eval-{form}.jsonl'}]", *SMALL, *extra,
    ])  # fmt: skip


def _weights(path):
    return load_file(path / "student" / "model.safetensors")


def _same(a, b, atol):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=atol, rtol=0), (key, (a[key] - b[key]).abs().max())


@pytest.mark.vllm
@pytest.mark.parametrize("form", ["chat", "text"])
def test_files_train_over_http_with_vllm_checkpoint_and_resume_exactly(realworld, realworld_vllm_teacher, tmp_path,
                                                                       form):  # fmt: skip
    # the vLLM teacher is the one tests/test_realworld.py sends its requests to (tests/conftest.py): one start-up
    url = f"teacher.url={realworld_vllm_teacher.get().url}"
    common = [url, "checkpoint_every=2", "guidance.decay_steps=3"]
    summary = train(_config(realworld, tmp_path / "a", form, "steps=4", *common), log=lambda *_: None)
    train(_config(realworld, tmp_path / "b", form, "steps=2", *common), log=lambda *_: None)
    train(_config(realworld, tmp_path / "b", form, "steps=4", *common), resume=True, log=lambda *_: None)
    _same(_weights(tmp_path / "a"), _weights(tmp_path / "b"), atol=1e-6)
    assert summary["skipped_steps"] == 0 and summary["teacher"]["engine"] == "vllm"
    for when in ("eval_before", "eval_after"):
        assert summary[when]["reverse_kl"] > 0  # held out, no verifier needed
        assert list(summary[when]["accuracy"]) == [f"eval-{form}"]  # records carry answers: the exact verifier
    records = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert any(r["prefix_share"] > 0 for r in records if "loss" in r)  # teacher drafts were used as prefixes
    # the saved student keeps the real tokenizer and its generation config (several stop ids)
    saved = tmp_path / "a" / "student"
    assert (
        json.loads((saved / "generation_config.json").read_text())["eos_token_id"]
        == json.loads((realworld / "student" / "generation_config.json").read_text())["eos_token_id"]
    )
    assert (saved / "tokenizer.json").read_bytes() == (realworld / "student" / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_reverse_kl_falls_on_a_qwen3_pair_with_the_teacher_in_process(realworld, tmp_path, dtype):
    """bfloat16: sampling and the training forward under the same autocast (float32 master weights)."""
    cfg = _config(realworld, tmp_path / "run", "chat", "steps=80", "teacher.api=inprocess",
                  f"teacher.model={realworld / 'teacher'}", "eval.kl_prompts=32", "optim.lr=1e-2",
                  "optim.warmup_steps=10", "optim.schedule=constant", "rollout.prompts_per_step=8",
                  "checkpoint_every=0", f"dtype={dtype}")  # fmt: skip
    summary = train(cfg, log=lambda *_: None)
    assert summary["skipped_steps"] == 0
    before, after = summary["eval_before"]["reverse_kl"], summary["eval_after"]["reverse_kl"]
    print(f"reverse KL {before:.2f} -> {after:.2f}")
    assert after < 0.8 * before, summary


@pytest.mark.parametrize("method", ["tropd-adaptive", "reopold", "gkd"])
def test_chunked_and_micro_batched_steps_train_like_whole_ones(realworld, tmp_path, method):
    extra = {
        "tropd-adaptive": ["loss.rule=adaptive", "max_staleness=1"],
        "reopold": ["loss.method=reopold"],
        "gkd": ["loss.method=gkd", "loss.on_policy_share=1"],
    }[method]
    common = ["steps=3", "teacher.api=inprocess", f"teacher.model={realworld / 'teacher'}", "eval.before_after=false",
              "checkpoint_every=0", "rollout.prompts_per_step=6", "optim.warmup_steps=10", "optim.schedule=constant",
              *extra]  # fmt: skip
    train(_config(realworld, tmp_path / "whole", "text", *common, "loss_chunk_tokens=0"), log=lambda *_: None)
    parts = ["loss_chunk_tokens=5", "rollout.micro_batch_sequences=5", "rollout.sample_batch_tokens=40"]
    train(_config(realworld, tmp_path / "parts", "text", *common, *parts), log=lambda *_: None)
    _same(_weights(tmp_path / "whole"), _weights(tmp_path / "parts"), atol=2e-5)


def test_a_teacher_with_another_chat_template_is_refused(realworld, tmp_path):
    other = tmp_path / "teacher"
    shutil.copytree(realworld / "teacher", other)
    config_path = other / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config["chat_template"] = tokenizer_config["chat_template"].replace("<|im_start|>", "<|im_start|> ")
    config_path.write_text(json.dumps(tokenizer_config))
    cfg = _config(realworld, tmp_path / "run", "chat", "steps=1", "teacher.api=inprocess", f"teacher.model={other}")
    with pytest.raises(UserError, match="chat template differs"):
        train(cfg, log=lambda *_: None)
    assert not (tmp_path / "run").exists()


def test_a_verifier_of_the_users_scores_eval_accuracy(realworld, tmp_path):
    module = tmp_path / "my_check.py"
    module.write_text("def ends_well(response, answer, record):\n    return float(len(record['messages']) > 0)\n")
    cfg = _config(realworld, tmp_path / "run", "chat", "steps=1", "teacher.api=inprocess",
                  f"teacher.model={realworld / 'teacher'}", f"eval.verifier={module}:ends_well")  # fmt: skip
    summary = train(cfg, log=lambda *_: None)
    assert summary["eval_before"]["accuracy"] == {"eval-chat": 1.0} == summary["eval_after"]["accuracy"]
    cfg = _config(realworld, tmp_path / "none", "chat", "steps=1", "teacher.api=inprocess",
                  f"teacher.model={realworld / 'teacher'}", "eval.verifier=none")  # fmt: skip
    summary = train(cfg, log=lambda *_: None)
    assert summary["eval_after"]["accuracy"] == {} and summary["eval_after"]["reverse_kl"] > 0
