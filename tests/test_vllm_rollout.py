"""`rollout.engine: vllm`: the student sampled by a vLLM engine in the trainer's process, its weights synced in place.

vLLM changes process-wide state (thread binding, torch.distributed), so every engine here is built in a subprocess:
`python -m tests.test_vllm_rollout <student dir>...` runs `sync_check` and prints its findings as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import free_port, tropd_here

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_USE_AOT_COMPILE": "0"}


def sync_check(student_dir: str) -> dict:
    """Before and after one optimizer step of the trainer's model: the engine's log-probs of a fixed sequence against
    the model's, the sync's seconds, greedy continuations of both, and whether a row's sample depends on its batch."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.rollout.sampling import sample
    from trainer.rollout.vllm_engine import VLLMRollout

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    engine = VLLMRollout(student_dir, dtype="float32", max_model_len=128, cache_tokens=16384, seed=0)
    seq = [3, 7, 9, 11, 4, 5, 6, 8, 12, 13]

    def trainer_lp():
        logits = model(torch.tensor([seq])).logits[0, :-1].float()
        return torch.log_softmax(logits, -1).gather(-1, torch.tensor(seq[1:])[:, None])[:, 0]

    def engine_lp():
        params = engine._params(max_tokens=1, prompt_logprobs=0, detokenize=False)
        out = engine.llm.generate([engine._prompt(prompt_token_ids=seq)], params, use_tqdm=False)[0]
        return torch.tensor([step[t].logprob for step, t in zip(out.prompt_logprobs[1:], seq[1:], strict=True)])

    with torch.no_grad():
        before = (trainer_lp() - engine_lp()).abs().max()
    engine_before = engine_lp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    (-trainer_lp().sum()).backward()
    optimizer.step()
    with torch.no_grad():
        stale = (trainer_lp() - engine_lp()).abs().max()
        sync_s = engine.sync(model)
        after = (trainer_lp() - engine_lp()).abs().max()
        moved = (engine_lp() - engine_before).abs().max()
    prompts, stops = [[3, 7, 9], [4, 5, 6, 8], [12, 13]], [1, 2]
    greedy, _ = engine.sample(prompts, max_new_tokens=12, temperature=0.0, top_p=1.0, stop_ids=stops, seeds=[0, 0, 0])
    reference = sample(model.eval(), prompts, max_new_tokens=12, pad_id=0, stop_ids=stops, temperature=0.0)
    drawn, lps = engine.sample(prompts, max_new_tokens=12, temperature=1.0, top_p=1.0, stop_ids=stops, seeds=[1, 2, 3])
    alone, _ = engine.sample(prompts[1:2], max_new_tokens=12, temperature=1.0, top_p=1.0, stop_ids=stops, seeds=[2])
    # more prompt tokens than one engine step takes (8192): seeded rows whose prompts would have been split over
    # two steps (chunked prefill) made a CPU generator fail
    many, _ = engine.sample([[3] * 120] * 80, max_new_tokens=2, temperature=1.0, top_p=1.0, stop_ids=[],
                            seeds=range(80))  # fmt: skip
    engine.close()
    return {"before": float(before), "stale": float(stale), "after": float(after), "moved": float(moved),
            "sync_s": sync_s, "greedy": greedy, "reference": reference.responses(), "drawn": drawn,
            "alone": alone, "many": [len(t) for t in many],
            "lengths_match": [len(t) == len(lp) for t, lp in zip(drawn, lps, strict=True)]}  # fmt: skip


@pytest.mark.slow  # a vLLM engine in a subprocess: about 10 s on 2 cores
def test_a_synced_engine_samples_from_the_trainers_weights(toy_quick):
    """After one optimizer step the engine is stale until `sync`; then its log-probs of a fixed sequence equal the
    trainer model's within 1e-4 and differ from the step before (the toy Llama here; the real-shaped Qwen3, whose
    embedding is tied to its head, in the run below, whose synced steps hold its log-probs to the trainer's);
    greedy continuations equal the trainer's own decoding token for token; a row's sample does not depend on the
    other rows of its batch (its own seed). `python -m tests.test_vllm_rollout DIR...` runs it on any student."""
    command = [sys.executable, "-m", "tests.test_vllm_rollout", str(toy_quick / "student")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for name, r in zip(("toy",), results, strict=True):
        assert r["before"] < 1e-4 and r["after"] < 1e-4, (name, r)
        assert r["stale"] > 1e-2 and r["moved"] > 1e-2, (name, r)  # the step moved the weights, the sync took them
        assert r["greedy"] == r["reference"], (name, r)
        assert r["alone"] == r["drawn"][1:2] and all(r["lengths_match"]), (name, r)
        assert r["many"] == [2] * 80, (name, r["many"])


@pytest.mark.slow  # 48 short steps and a vLLM engine: about 20 s on 2 cores
@pytest.mark.vllm
def test_the_real_shaped_world_trains_over_http_with_vllm_rollouts(realworld, realworld_vllm_teacher, tmp_path):
    """The Qwen3 student of the real-shaped world (tied embedding, a table larger than its BPE tokenizer, ChatML
    prompts) samples on vLLM while the vLLM teacher service scores over HTTP, its weights synced every other step
    (`rollout.sync_every=2`): the held-out reverse KL falls; on synced steps the engine's log-probs are the
    trainer's to rounding, on the others (one step stale, corrected by the clipped surrogate against the engine's
    log-probs) the mismatch metric shows it and the warning fires; metrics.jsonl holds the mismatch, the truncated
    importance weight and the sync time, and the run ends with its student and plot."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "tropd", "train", f"student={realworld / 'student'}", f"out={out}",
               "data.source=files", f"data.train=[{realworld / 'train-chat.jsonl'}]",
               f"data.eval=[{realworld / 'eval-chat.jsonl'}]", f"teacher.url={realworld_vllm_teacher.get().url}",
               "rollout.engine=vllm", "rollout.sync_every=2", "rollout.mismatch_warn=0.001", "steps=48",
               "rollout.prompts_per_step=8", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=16", "eval.n=8",
               "eval.kl_prompts=32", "eval.every=0", "optim.lr=1e-2", "optim.warmup_steps=10",
               "optim.schedule=constant", "checkpoint_every=0", "tensorboard=false", "threads=1"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rollouts on vLLM" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["eval_before"]["reverse_kl"], summary["eval_after"]["reverse_kl"]
    assert after < 0.8 * before, (before, after)
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 49))
    synced, stale = steps[0::2], steps[1::2]  # synced before steps 1, 3, 5, ...
    assert max(abs(r["rollout_mismatch_k1"]) for r in synced) < 1e-4 and min(r["rollout_sync_s"] for r in synced) > 0
    assert all(r["rollout_sync_s"] == 0 for r in stale) and max(r["rollout_mismatch_k1"] for r in stale) > 0.001
    assert all(0 < r["rollout_is_weight_mean"] <= 2 for r in steps)
    assert "the rollout engine's log-probs exceed the trainer's" in done.stdout + done.stderr
    assert (out / "student" / "model.safetensors").is_file() and (out / "curves.png").is_file()


@pytest.mark.slow  # three short toy runs with vLLM engines, two of them over 2 processes: about 80 s on 2 cores
@pytest.mark.vllm
def test_fsdp_then_ddp_ranks_sample_on_vllm_like_one_straight_process(toy_quick, tmp_path):
    """Two FSDP processes, each with its own engine synced from parameters gathered one at a time from the shards,
    train 2 steps and checkpoint (sharded); two DDP processes, each engine synced from its rank's whole copy, resume
    to step 3. The student equals one straight process's of 3 steps (weights within 1e-5): every rank's engine
    sampled from the trained weights (the mismatch stays at rounding), a row's sample did not depend on the rank
    that drew it, and --resume took the same prompts and row seeds."""
    args = [f"student={toy_quick / 'student'}", "teacher.api=inprocess", f"teacher.model={toy_quick / 'teacher'}",
            "rollout.engine=vllm", "checkpoint_every=2", "rollout.prompts_per_step=8", "rollout.max_new_tokens=12",
            "eval.n=4", "eval.kl_prompts=8", "tensorboard=false", "plot=false", "threads=1", "device=cpu",
            "optim.warmup_steps=10", "optim.schedule=constant"]  # fmt: skip
    one = subprocess.run([sys.executable, "-m", "tropd", "train", *args, "steps=3", f"out={tmp_path / 'one'}"],
                         capture_output=True, text=True, timeout=600, env=ENV)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    out = tmp_path / "fsdp-then-ddp"
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(free_port()), "-m", "tropd", "train", *args, "steps=2", "parallel=fsdp", f"out={out}"],
                         capture_output=True, text=True, timeout=600, env=ENV)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert (out / "checkpoints" / "step-000002" / "dcp" / ".metadata").is_file()
    sharded = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    sharded = [r for r in sharded if "loss" in r]
    assert len(sharded) == 2 and all(abs(r["rollout_mismatch_k1"]) < 1e-4 and r["rollout_sync_s"] > 0 for r in sharded)
    rest = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(free_port()), "-m", "tropd", "train", *args, "steps=3", "parallel=ddp", f"out={out}",
                           "--resume"], capture_output=True, text=True, timeout=600, env=ENV)  # fmt: skip
    assert rest.returncode == 0, rest.stderr[-3000:]
    resumed = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert abs(resumed[-2]["rollout_mismatch_k1"]) < 1e-4 and resumed[-2]["step"] == 3  # then the final eval
    a = load_file(tmp_path / "one" / "student" / "model.safetensors")
    b = load_file(out / "student" / "model.safetensors")
    init = load_file(toy_quick / "student" / "model.safetensors")
    assert any(not torch.allclose(a[k], init[k], atol=1e-4) for k in a)  # training moved the weights
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), (key, (a[key] - b[key]).abs().max())


def test_vllm_rollouts_refuse_what_they_cannot_do(toy_quick, tmp_path):
    base = [f"student={toy_quick / 'student'}", f"out={tmp_path / 'run'}", "teacher.api=inprocess",
            f"teacher.model={toy_quick / 'teacher'}", "rollout.engine=vllm"]  # fmt: skip
    for extra, message in (
        (["rollout.temperature=3"], "rollout.temperature=3.0: vLLM samples at temperatures up to 2"),
        (["teacher.engine=vllm"], "beside an in-process vLLM teacher"),
    ):
        done = tropd_here("train", *base, *extra)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, (extra, done)
    assert not (tmp_path / "run").exists()
    # `auto` on CPU is torch, under either data parallelism; `vllm` is taken under both (FSDP's sync gathers each
    # parameter in turn: the run below)
    from trainer.config import load_config
    from trainer.rollout.vllm_engine import resolve_engine

    for parallel in ("ddp", "fsdp"):
        assert resolve_engine(load_config(None, [f"parallel={parallel}"]), torch.device("cpu"), world=2) == "torch"
        vllm = load_config(None, ["rollout.engine=vllm", f"parallel={parallel}"])
        assert resolve_engine(vllm, torch.device("cpu"), world=2) == "vllm"


if __name__ == "__main__":
    print(json.dumps([sync_check(path) for path in sys.argv[1:]]))
