"""The trainer end to end against a live teacher service (transformers engine, quick toy world)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from pydantic import BaseModel
from safetensors.torch import load_file

from services.teacher.launch import half_the_cores
from tests.helpers import free_port, teacher, tropd_here
from trainer import checkpoint
from trainer.config import TrainConfig, load_config
from trainer.run import train
from tropd.errors import UserError

# The teacher and the trainer get half the cores each, as `tropd demo` gives them: with every core each, their OpenMP
# threads spin against each other (and against any other load), which made a step of the toy student 10-50 times
# slower on 2 cores (0.15 s alone, 2-8 s beside other jobs).
THREADS = half_the_cores()
SMALL = [
    "rollout.prompts_per_step=8",
    "rollout.samples_per_prompt=2",
    "rollout.max_new_tokens=32",
    "eval.n=4",
    "eval.kl_prompts=8",
    "eval.every=0",
    "tensorboard=false",
    "plot=false",
    f"threads={THREADS}",
]


@pytest.fixture(scope="module")
def service(toy_quick, tmp_path_factory):
    with teacher(toy_quick / "teacher", "hf", tmp_path_factory.mktemp("logs"), "--threads", str(THREADS)) as svc:
        yield svc


def config(toy_quick, service, out, *extra):
    return load_config(
        "configs/toy-tropd.yaml",
        [f"student={toy_quick / 'student'}", f"out={out}", f"teacher.url={service.url}", *SMALL, *extra],
    )


def test_tropd_trains_and_reverse_kl_falls(toy_quick, service, tmp_path):
    # a few dozen steps; the reverse-KL estimate on 256 held-out prompts (student samples, same seed before and
    # after; on 64 the estimate's noise is as large as what 24 steps of 16 samples move it)
    cfg = config(toy_quick, service, tmp_path / "run", "steps=48", "checkpoint_every=24", "eval.every=24", "plot=true",
                 "tensorboard=true", "optim.lr=2e-3", "optim.warmup_steps=5", "eval.kl_prompts=256")  # fmt: skip
    summary = train(cfg, log=lambda _: None)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 49))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    for key in ("k1", "trust_share", "outlier_share", "prefix_share", "teacher_latency_s", "tokens_per_s", "grad_norm"):
        assert key in steps[0], key
    assert summary["skipped_steps"] == 0
    assert summary["eval_after"]["reverse_kl"] < summary["eval_before"]["reverse_kl"]
    for name in ("summary.json", "curves.png", "config.yaml", "student/config.json"):
        assert (tmp_path / "run" / name).is_file(), name
    assert any((tmp_path / "run" / "tensorboard").iterdir())
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000024", "step-000048"]


def test_resume_gives_the_same_weights(toy_quick, service, tmp_path):
    common = ["checkpoint_every=3", "loss.rule=stochastic", "guidance.decay_steps=4"]
    train(config(toy_quick, service, tmp_path / "a", "steps=6", *common), log=lambda _: None)
    train(config(toy_quick, service, tmp_path / "b", "steps=3", *common), log=lambda _: None)
    train(config(toy_quick, service, tmp_path / "b", "steps=6", *common), resume=True, log=lambda _: None)
    a = load_file(tmp_path / "a" / "student" / "model.safetensors")
    b = load_file(tmp_path / "b" / "student" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), key
    records = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]


class Stopped(Exception):
    """The run stops right after a checkpoint, as a killed trainer would."""


def test_resume_with_batches_sampled_ahead_gives_the_same_weights(toy_quick, service, tmp_path, monkeypatch):
    # max_staleness=1: at the step-3 checkpoint, batch 4 is already sampled (by the weights of step 2) and sent to
    # the teacher; the checkpoint keeps it, so the resumed run trains on the very batch the uninterrupted one did
    common = ["steps=6", "checkpoint_every=3", "max_staleness=1", "loss.rule=stochastic", "guidance.decay_steps=4"]
    train(config(toy_quick, service, tmp_path / "a", *common), log=lambda _: None)
    save = checkpoint.save

    def save_then_stop(run_dir, step, *args, **kwargs):
        path = save(run_dir, step, *args, **kwargs)
        if step == 3:
            raise Stopped
        return path

    monkeypatch.setattr(checkpoint, "save", save_then_stop)
    with pytest.raises(Stopped):
        train(config(toy_quick, service, tmp_path / "b", *common), log=lambda _: None)
    monkeypatch.setattr(checkpoint, "save", save)
    ahead = torch.load(tmp_path / "b" / "checkpoints" / "step-000003" / "trainer_state.pt", weights_only=False)
    assert [batch["step"] for batch in ahead["cursor"]["inflight"][0]] == [4]
    train(config(toy_quick, service, tmp_path / "b", *common), resume=True, log=lambda _: None)
    a = load_file(tmp_path / "a" / "student" / "model.safetensors")
    b = load_file(tmp_path / "b" / "student" / "model.safetensors")
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), key
    records = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    "method",
    [
        "opd",
        "eopd",
        "reopold",
        "topd",
        "gkd",
        "sft",
        "tropd-mask",
        "tropd-clip",
        "tropd-adaptive",
        "tropd-stale",
        "tropd-guidance-paper",
    ],
)
def test_every_method_runs(toy_quick, service, tmp_path, method):
    extra = {
        "tropd-mask": ["loss.outlier=mask"],
        "tropd-clip": ["loss.outlier=clip"],
        "tropd-adaptive": ["loss.rule=adaptive", "guidance.enabled=false"],
        "tropd-stale": ["max_staleness=1"],
        "reopold": ["loss.method=reopold", "loss.refine_after=1"],
        "tropd-guidance-paper": [
            "guidance.schedule=length",
            "guidance.prefix_loss=sampled_fkl",
            "loss.lambda_prefix=0.001",
        ],
        "gkd": ["loss.method=gkd", "loss.on_policy_share=0.5"],
    }.get(method, [f"loss.method={method}"])
    summary = train(config(toy_quick, service, tmp_path / "run", "steps=3", *extra), log=lambda _: None)
    assert summary["steps"] == 3 and summary["skipped_steps"] == 0


def test_tokenizer_mismatch_is_refused(toy_quick, service, tmp_path):
    from trainer.toy.tokenizer import build_hf_tokenizer

    student = tmp_path / "student"
    shutil.copytree(toy_quick / "student", student)
    tok = build_hf_tokenizer()
    tok.add_tokens(["X"])
    tok.save_pretrained(student)
    with pytest.raises(UserError, match="tokenizer differs") as info:
        train(config(toy_quick, service, tmp_path / "run", "steps=1", f"student={student}"), log=lambda _: None)
    assert "teacher" in str(info.value) and "student" in str(info.value)
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_top_k_over_the_teachers_limit_is_refused(toy_quick, service, tmp_path):
    with pytest.raises(UserError, match="at most top-k 20"):
        train(config(toy_quick, service, tmp_path / "run", "steps=1", "teacher.top_k=50"), log=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_existing_run_directory_is_not_overwritten(toy_quick, service, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    with pytest.raises(UserError, match="already holds a run"):
        train(config(toy_quick, service, tmp_path / "run", "steps=1"), log=lambda _: None)


def _cli(*args):
    return tropd_here("train", *args)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--config", "configs/toy-tropd.yaml", "loss.taux=0.1"], "loss.taux"),
        (["--config", "configs/toy-tropd.yaml", "loss.tau=2"], "loss.tau"),
        (["--config", "configs/toy-tropd.yaml", "loss.method=magic"], "loss.method"),
        (["--config", "configs/toy-tropd.yaml", "steps=zero"], "steps"),
        (["--config", "configs/toy-tropd.yaml", "nonsense"], "key=value"),
        (["--config", "no/such.yaml"], "not found"),
        (["--config", "configs/toy-tropd.yaml", "student=/no/such/dir"], "not found"),
        (["--config", "configs/toy-tropd.yaml", "teacher.api=vllm-openai"], "guidance.enabled=false"),
        (["--config", "configs/toy-tropd.yaml", "optim.lr=inf"], "optim.lr: Input should be a finite number"),
        (["--config", "configs/toy-tropd.yaml", "data.toy={math: .nan}"], "data.toy.math"),
        (["--config", "configs/toy-tropd.yaml", "eval.tasks=[]"], "eval.tasks"),
        (["--config", "configs/toy-tropd.yaml", "=5"], "the key is empty"),
        (["--config", "configs"], "is a directory"),
        # the proximal-teacher reward this project once called reopold is TOP-D's: an old config is pointed there
        (["--config", "configs/toy-reopold.yaml", "loss.alpha=0.5"], "use loss.method=topd"),
        (["--config", "configs/toy-tropd.yaml", "guidance.schedule=cosine"], "guidance.schedule"),
        (["--config", "configs/toy-tropd.yaml", "guidance.prefix_loss=kl"], "guidance.prefix_loss"),
        (["--config", "configs/toy-tropd.yaml", "rollout.sample_batch_sequences=8"], "rollout.sample_batch_tokens"),
        (["--config", "configs/toy-tropd.yaml", "dtype=float16"], "dtype"),
    ],
)
def test_bad_config_is_a_one_line_error(args, needle):
    result = _cli(*args)
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_config_file_that_is_not_text_is_a_one_line_error(tmp_path):
    (tmp_path / "bin.yaml").write_bytes(bytes(range(128, 256)))
    result = _cli("--config", str(tmp_path / "bin.yaml"))
    assert result.returncode == 2 and "is not UTF-8 text" in result.stderr and "Traceback" not in result.stderr


def test_overrides_may_follow_options():
    from tropd.cli import build_parser

    args, extra = build_parser().parse_known_args(["train", "steps=3", "--resume", "loss.tau=0.2", "--config", "c"])
    assert (args.overrides, extra, args.resume, args.config) == (["steps=3"], ["loss.tau=0.2"], True, "c")
    result = _cli("steps=3", "--config", "configs/toy-tropd.yaml", "loss.tau=2")  # reaches the validation
    assert result.returncode == 2 and "loss.tau" in result.stderr, result.stderr
    result = _cli("steps=3", "--resume", "--bogus")
    assert result.returncode == 2 and "unrecognized arguments: --bogus" in result.stderr


def test_dotted_override_changes_one_entry_of_a_default_mapping():
    config = load_config(None, ["data.toy.math=0.5", "out=123"])
    assert config.data.toy == {"math": 0.5, "code": 0.25, "general": 0.3}
    assert config.out == "123"  # a string key given a number-like value keeps it as text


def _inprocess(toy_quick, out, *extra):
    return [f"student={toy_quick / 'student'}", "teacher.api=inprocess", f"teacher.model={toy_quick / 'teacher'}",
            f"out={out}", *SMALL, "steps=2", "checkpoint_every=1", "eval.n=2", "eval.kl_prompts=2", *extra]  # fmt: skip


def test_out_that_holds_a_model_or_is_a_file_is_refused(toy_quick, tmp_path):
    world = tmp_path / "world"
    shutil.copytree(toy_quick, world)
    weights = (world / "student" / "model.safetensors").read_bytes()
    (tmp_path / "afile").write_text("")
    for out, student, needle in [
        (world, world / "student", "would overwrite the student it trains"),
        (world, toy_quick / "student", "holds a toy world"),
        (world / "teacher", toy_quick / "student", "holds a model"),
        (tmp_path / "afile" / "run", toy_quick / "student", "afile' is a file"),
        (tmp_path / "run", toy_quick / "student", "teacher.model directory '/no/such/dir' not found"),
    ]:
        args = _inprocess(toy_quick, out, f"student={student}")
        if "teacher.model" in needle:
            args.append("teacher.model=/no/such/dir")
        result = subprocess.run([sys.executable, "-m", "tropd", "train", *args], capture_output=True, text=True)
        assert result.returncode == 2 and needle in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert (world / "student" / "model.safetensors").read_bytes() == weights


def test_resume_refuses_what_it_cannot_continue_and_loses_nothing(toy_quick, tmp_path):
    run_dir = tmp_path / "run"
    first = _cli(*_inprocess(toy_quick, run_dir))
    assert first.returncode == 0, first.stderr[-2000:]
    summary = (run_dir / "summary.json").read_text()

    def resume(*extra):
        return _cli(*_inprocess(toy_quick, run_dir, *extra), "--resume")

    result = resume("steps=1")  # the last checkpoint is at step 2
    assert result.returncode == 2 and "give steps >= 2" in result.stderr, result.stderr[-2000:]
    result = resume("steps=3", "optim.lr=0.1")
    assert result.returncode == 2 and "differ from the run's config.yaml (optim.lr: 0.003 -> 0.1)" in result.stderr
    (run_dir / "checkpoints" / "step-000002" / "trainer_state.pt").write_bytes(b"garbage")
    result = resume("steps=3")
    assert result.returncode == 2 and "step-000002 is damaged" in result.stderr, result.stderr[-2000:]
    shutil.rmtree(run_dir / "checkpoints")
    result = resume("steps=3")
    assert result.returncode == 2 and "finished run without checkpoints" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert (run_dir / "summary.json").read_text() == summary


def test_unreachable_teacher_is_a_clear_error(toy_quick, tmp_path):
    result = _cli("--config", "configs/toy-tropd.yaml", f"student={toy_quick / 'student'}", f"out={tmp_path / 'r'}",
                  "teacher.url=http://127.0.0.1:9", "teacher.retries=1")  # fmt: skip
    assert result.returncode == 2
    assert "cannot reach the teacher" in result.stderr and "Traceback" not in result.stderr


def test_torchrun_two_processes_match_one(toy_quick, service, tmp_path):
    # the stochastic trust rule (the default): the ranks' random trust masks must be the one process's
    args = [f"student={toy_quick / 'student'}", f"teacher.url={service.url}", *SMALL, "steps=3", "loss.rule=stochastic"]
    single = _cli("--config", "configs/toy-tropd.yaml", f"out={tmp_path / 'one'}", *args, "threads=1")
    assert single.returncode == 0, single.stderr[-2000:]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), "-m", "tropd", "train", "--config", "configs/toy-tropd.yaml",
               f"out={tmp_path / 'two'}", *args, "threads=1"]  # fmt: skip
    double = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, double.stderr[-3000:]
    a = load_file(tmp_path / "one" / "student" / "model.safetensors")
    b = load_file(tmp_path / "two" / "student" / "model.safetensors")
    init = load_file(toy_quick / "student" / "model.safetensors")
    assert any(not torch.allclose(a[key], init[key], atol=1e-4) for key in a)  # training moved the weights
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), key


def test_inprocess_teacher(toy_quick, tmp_path):
    cfg = load_config(
        "configs/toy-tropd.yaml",
        [f"student={toy_quick / 'student'}", f"out={tmp_path / 'run'}", *SMALL, "steps=2", "teacher.api=inprocess",
         f"teacher.model={toy_quick / 'teacher'}"],
    )  # fmt: skip
    summary = train(cfg, log=lambda _: None)
    assert summary["teacher"]["engine"] == "hf" and summary["skipped_steps"] == 0


def test_teacher_temperature_is_the_temperature_of_the_scores(toy_quick, reference):
    """teacher.temperature: the trainer's scores are log-softmax(logits / T) of the teacher (here in process)."""
    from trainer.config import TeacherConfig
    from trainer.teacher_link import TeacherLink
    from trainer.toy.tokenizer import VOCAB

    seq = VOCAB.prompt_ids("12+30=") + VOCAB.encode("42") + [VOCAB.eos_id]
    link = TeacherLink(TeacherConfig(api="inprocess", model=str(toy_quick / "teacher"), temperature=0.5))
    try:
        link.check(str(toy_quick / "student"), top_k=3)
        (result,) = link.score([seq], [4], 3).result()
    finally:
        link.close()
    chosen, top_ids, top_lp = reference(seq, 4, 3, temperature=0.5)
    assert result.logprobs.tolist() == pytest.approx(chosen.tolist(), abs=1e-5)
    assert result.top_logprobs.ravel().tolist() == pytest.approx(top_lp.ravel().tolist(), abs=1e-5)
    assert result.top_ids.tolist() == top_ids.tolist()


@pytest.mark.parametrize("path", sorted(str(p) for p in Path("configs").glob("*.yaml")))
def test_example_configs_load(path):
    config = load_config(path)
    if config.data.source == "toy":
        assert Path(path).stem == f"toy-{config.loss.method}"
    else:
        assert config.data.train and config.device == "auto" and config.dtype == "bfloat16"


def test_every_config_key_is_described():
    """README and the example configs point at trainer/config.py for what each key means."""

    def undescribed(model, prefix=""):
        for name, field in model.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                yield from undescribed(field.annotation, f"{prefix}{name}.")
            elif not field.description:
                yield prefix + name

    assert list(undescribed(TrainConfig)) == []


def test_demo_settings_and_their_precedence(tmp_path):
    from types import SimpleNamespace

    from trainer.cli import demo_overrides

    def demo(config=None, steps=None, overrides=()):
        args = SimpleNamespace(config=config, toy="artifacts/toy", steps=steps, overrides=list(overrides))
        return load_config(config, demo_overrides(args, tmp_path / "run"))

    built_in = demo()
    assert (built_in.steps, built_in.eval.every, built_in.checkpoint_every) == (600, 100, 200)
    assert built_in.student == str(Path("artifacts/toy") / "student") and built_in.out == str(tmp_path / "run")
    assert demo(overrides=["steps=30"]).steps == 30
    assert demo(steps=50, overrides=["steps=30"]).steps == 50
    assert demo(config="configs/toy-tropd.yaml").steps == 1000  # a config file is taken as it is


def test_demo_end_to_end_on_the_quick_toy(toy_quick, tmp_path):
    """`tropd demo` as a user runs it: the teacher service as a subprocess, TrOPD, eval, summary and plot,
    and the teacher stopped at the end. The quick toy world stays quick (no full rebuild)."""
    out = tmp_path / "demo"
    command = [
        sys.executable, "-m", "tropd", "demo", "--toy", str(toy_quick), "--engine", "hf", "--out", str(out),
        "--steps", "4", "eval.every=2", "eval.n=8", "eval.kl_prompts=6", "rollout.prompts_per_step=8",
        "checkpoint_every=2", "tensorboard=false",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "cached" in result.stdout and "teacher stopped (exit status 0)" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["skipped_steps"] == 0 and summary["teacher"]["engine"] == "hf"
    assert set(summary["eval_after"]["accuracy"]) == {"math", "code", "general"}
    assert (out / "curves.png").stat().st_size > 0 and (out / "student" / "config.json").is_file()
    assert summary["config"]["student"] == str(toy_quick / "student") and summary["run_dir"] == str(out)


def test_demo_stops_its_teacher_when_it_is_terminated(toy_quick, tmp_path):
    """SIGTERM (kill, docker stop) ends the demo like Ctrl-C: the teacher subprocess is stopped, not orphaned."""
    out = tmp_path / "demo"
    command = [
        sys.executable, "-u", "-m", "tropd", "demo", "--toy", str(toy_quick), "--engine", "hf", "--out", str(out),
        "--steps", "100000", "eval.n=8", "eval.kl_prompts=6", "rollout.prompts_per_step=8", "tensorboard=false",
    ]  # fmt: skip
    demo = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        for line in demo.stdout:
            seen.append(line)
            if "training the student" in line:
                break
        url = seen[-1].split("teacher ready at ")[1].split(";")[0]
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
        demo.send_signal(signal.SIGTERM)
        rest = demo.communicate(timeout=120)[0]
    finally:
        demo.kill()
    assert demo.returncode == 130, "".join(seen) + rest
    assert "teacher stopped (exit status 0)" in rest
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/healthz", timeout=5)


def test_resume_refuses_another_teacher_and_a_run_without_its_config(toy_quick, tmp_path):
    run_dir = tmp_path / "run"
    assert _cli(*_inprocess(toy_quick, run_dir)).returncode == 0
    assert json.loads((run_dir / "teacher.json").read_text())["model"] == "teacher"
    other = tmp_path / "other-teacher"
    shutil.copytree(toy_quick / "teacher", other)
    result = _cli(*_inprocess(toy_quick, run_dir, "steps=3", f"teacher.model={other}"), "--resume")
    assert result.returncode == 2 and "--resume against another teacher (model: 'teacher' -> 'other-teacher')" in (
        result.stderr
    ), result.stderr[-2000:]
    (run_dir / "config.yaml").unlink()
    result = _cli(*_inprocess(toy_quick, run_dir, "steps=3"), "--resume")
    assert result.returncode == 2 and "no readable config.yaml" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_a_teacher_refusal_mid_run_is_a_one_line_error_naming_the_checkpoint(toy_quick, tmp_path, monkeypatch):
    """A 4xx after the start-up check (a rotated key, a teacher restarted with lower limits) stops the run with the
    cause, the last checkpoint and --resume; the refusal is injected at the teacher link (a unit of the trainer)."""
    from concurrent.futures import Future

    from services.teacher.client import TeacherError
    from trainer.teacher_link import TeacherLink

    real_score, calls = TeacherLink.score, []

    def score(self, sequences, starts, top_k):
        calls.append(1)
        if len(calls) < 4:  # eval before, steps 1 and 2
            return real_score(self, sequences, starts, top_k)
        refused = Future()
        refused.set_exception(TeacherError("unauthorized: bad or missing API key", status=401, kind="unauthorized"))
        return refused

    monkeypatch.setattr(TeacherLink, "score", score)
    cfg = load_config("configs/toy-tropd.yaml", _inprocess(toy_quick, tmp_path / "run", "steps=4", "max_staleness=0"))
    with pytest.raises(UserError) as err:
        train(cfg, log=lambda *_: None)
    message = str(err.value)
    assert "the teacher refused a request (HTTP 401: unauthorized" in message and "step-000002" in message
    assert "--resume" in message and "\n" not in message
