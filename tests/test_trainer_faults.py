"""Faults during training, and bad trainer input: the trainer as a subprocess against real teacher services.

- the teacher is SIGKILLed mid-run and started again: the trainer retries with back-off and loses no step;
- the trainer is SIGKILLed at random moments and mid-checkpoint: --resume gives the uninterrupted weights;
- a flaky, slow teacher (503 on a share of requests, added latency) gives the healthy teacher's result;
- a teacher gone for good, bad configs, bad student directories, a teacher with another tokenizer, bad
  teacher URLs: a one-line error and exit status 2, no traceback.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

from services.teacher.launch import launch
from tests.helpers import free_port, teacher, tropd_here

pytestmark = pytest.mark.reliability

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "toy-tropd.yaml"
STEPS, PROMPTS = 10, 8
RUN = [
    f"steps={STEPS}",
    f"rollout.prompts_per_step={PROMPTS}",
    "rollout.samples_per_prompt=2",
    "rollout.max_new_tokens=32",
    "guidance.decay_steps=8",  # teacher drafts (/v1/continue) on most steps, scoring on every step
    "eval.before_after=false",
    "eval.every=0",
    "checkpoint_every=0",
    "tensorboard=false",
    "plot=false",
    "threads=1",
]
# one torch thread per process: on 2 shared cores, OpenMP threads that spin against other processes slow
# every forward pass by an order of magnitude. `tropd teacher serve` sets its torch threads itself (every core
# unless --threads says otherwise): the teachers started here with `launch` get --threads 1 (tests.helpers gives
# those it starts half the cores)
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
SERVE = ("--threads", "1")


def trainer_args(toy_quick: Path, url: str, out: Path, *extra: str, resume: bool = False) -> list[str]:
    return [sys.executable, "-m", "tropd", "train", "--config", str(CONFIG), *(["--resume"] if resume else []),
            f"student={toy_quick / 'student'}", f"out={out}", f"teacher.url={url}", *RUN, *extra]  # fmt: skip


def start_trainer(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        args, stdout=log.open("a"), stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **ONE_THREAD}
    )


def run_trainer(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env={**os.environ, **ONE_THREAD}
    )


def run_here(args: list[str]) -> subprocess.CompletedProcess:
    """`trainer_args(...)` run in this process: for refusals at start, which need no process of their own."""
    assert args[1:3] == ["-m", "tropd"], args
    return tropd_here(*args[3:])


def step_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.is_file() else []  # whole lines only: it may be mid-write
    return [r for r in map(json.loads, filter(None, lines)) if "loss" in r]


def check_run(run_dir: Path) -> list[dict]:
    """Every step once, in order, with a continuous data cursor and a finite loss; nothing skipped."""
    steps = step_records(run_dir)
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert [r["cursor"] for r in steps] == [PROMPTS * s for s in range(1, STEPS + 1)]
    assert all(math.isfinite(r["loss"]) for r in steps)
    assert steps[-1]["skipped_steps"] == 0
    return steps


def assert_same_weights(run_a: Path, run_b: Path) -> None:
    a = load_file(run_a / "student" / "model.safetensors")
    b = load_file(run_b / "student" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), key


def wait_for(condition, process: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the trainer exited early ({process.returncode}):\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out:\n{log.read_text()[-3000:]}"
        time.sleep(0.02)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def healthy(toy_quick, tmp_path_factory):
    with teacher(toy_quick / "teacher", "hf", tmp_path_factory.mktemp("logs"), env=ONE_THREAD) as svc:
        yield svc


@pytest.fixture(scope="module")
def baseline(toy_quick, healthy, tmp_path_factory) -> Path:
    """An uninterrupted run against a healthy teacher: the reference for every fault below."""
    out = tmp_path_factory.mktemp("baseline") / "run"
    result = run_trainer(trainer_args(toy_quick, healthy.url, out))
    assert result.returncode == 0, result.stderr[-3000:]
    check_run(out)
    return out


def test_teacher_killed_mid_run_and_restarted(toy_quick, baseline, tmp_path):
    port, log = free_port(), tmp_path / "trainer.log"
    service = launch(
        toy_quick / "teacher", "hf", tmp_path / "teacher-1.log", *SERVE, port=port, env=ONE_THREAD, timeout=240
    )
    trainer = start_trainer(trainer_args(toy_quick, service.url, tmp_path / "run"), log)
    try:
        wait_for(lambda: len(step_records(tmp_path / "run")) >= 3, trainer, 240, log)
        service.process.kill()  # SIGKILL: no graceful shutdown, in-flight requests are cut
        service.process.wait()
        killed_after = len(step_records(tmp_path / "run"))
        time.sleep(3)
        restarted = time.monotonic()
        service = launch(toy_quick / "teacher", "hf", tmp_path / "teacher-2.log", *SERVE, port=port, env=ONE_THREAD,
                         timeout=240)  # fmt: skip
        outage_s = time.monotonic() - restarted + 3
        assert trainer.wait(timeout=240) == 0, log.read_text()[-3000:]
    finally:
        stop(trainer)
        service.stop()
    assert killed_after < STEPS
    steps = check_run(tmp_path / "run")
    # the step that met the outage waited it out (retries with back-off), and nothing was lost or run twice
    longest = max(r["step_s"] for r in steps)
    assert longest >= outage_s / 2, (outage_s, [r["step_s"] for r in steps])
    print(f"teacher SIGKILLed after step {killed_after}, back after {outage_s:.1f}s; longest step {longest:.1f}s; "
          f"steps 1-{STEPS} each once, weights equal to the uninterrupted run")  # fmt: skip
    assert "Traceback" not in log.read_text()
    assert_same_weights(baseline, tmp_path / "run")


def _checkpoint_steps(run_dir: Path, written: bool = False) -> list[int]:
    """Steps of the checkpoint directories, complete ones and (unless `written`) temporary ones."""
    root = run_dir / "checkpoints"
    names = [p.name for p in root.iterdir()] if root.is_dir() else []
    if not written:
        names = [n.removeprefix(".tmp-") for n in names]
    return [int(n.removeprefix("step-")) for n in names if n.startswith("step-")]


def test_trainer_killed_at_random_moments_and_mid_checkpoint(toy_quick, healthy, baseline, tmp_path):
    """SIGKILL at a random moment of start-up, right inside a checkpoint write, at a random moment of a step
    (computing, waiting for the teacher, or writing), and inside a write again; --resume after each, and
    to the end after the last. Checkpoints every step, so that writes are frequent."""
    run, log, rng = tmp_path / "run", tmp_path / "trainer.log", random.Random(11)
    extra = ("checkpoint_every=1", "keep_checkpoints=2")
    kills = []
    for moment in ("start-up", "checkpoint", "step", "checkpoint"):
        trainer = start_trainer(trainer_args(toy_quick, healthy.url, run, *extra, resume=bool(kills)), log)
        try:
            if moment == "checkpoint":
                moment = _kill_inside_a_checkpoint_write(trainer, run, log)
            else:
                if moment == "start-up":
                    time.sleep(rng.uniform(0.2, 2.0))
                else:  # once the resumed run has written a checkpoint, somewhere in the next step
                    written = max(_checkpoint_steps(run, written=True), default=0)
                    wait_for((run / "checkpoints" / f"step-{written + 1:06d}").exists, trainer, 240, log)
                    time.sleep(rng.uniform(0.0, 0.3))
                assert trainer.poll() is None, f"the run ended before the kill:\n{log.read_text()[-3000:]}"
        finally:
            stop(trainer)
        kills.append(f"{moment} (last complete: {max(_checkpoint_steps(run, written=True), default=0)})")
    result = run_trainer(trainer_args(toy_quick, healthy.url, run, *extra, resume=True))
    assert result.returncode == 0, result.stderr[-3000:]
    print("trainer SIGKILLed:", "; ".join(kills))
    assert any(k.startswith("mid-checkpoint") for k in kills), kills  # a write was really cut short
    assert "Traceback" not in log.read_text() + result.stderr
    check_run(run)
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")]  # rewritten in place
    assert_same_weights(baseline, run)


def _kill_inside_a_checkpoint_write(trainer: subprocess.Popen, run: Path, log: Path) -> str:
    """Wait (sleeping) for the checkpoint before the next one, then spin until the next one's temporary
    directory appears and SIGKILL at once. A write is a few milliseconds: when the spinning process was
    off the CPU for all of it, try the one after."""
    target = max(_checkpoint_steps(run), default=0) + 1
    previous = run / "checkpoints" / f"step-{target - 1:06d}" if target > 1 else run / "metrics.jsonl"
    wait_for(previous.exists, trainer, 240, log)
    deadline = time.monotonic() + 120
    while trainer.poll() is None and time.monotonic() < deadline:
        tmp = run / "checkpoints" / f".tmp-step-{target:06d}"
        if tmp.exists():
            trainer.kill()
            trainer.wait()
            return f"mid-checkpoint {target}" if tmp.exists() else f"just after checkpoint {target}"
        if (run / "checkpoints" / f"step-{target:06d}").exists():
            target += 1
    return "none (the run ended)"


def test_flaky_slow_teacher_gives_the_healthy_result(toy_quick, baseline, tmp_path):
    args = ("--fail-rate", "0.4", "--simulate-latency-ms", "20")
    with teacher(toy_quick / "teacher", "hf", tmp_path, *args, env=ONE_THREAD) as flaky:
        result = run_trainer(trainer_args(toy_quick, flaky.url, tmp_path / "run"))
        metrics = httpx.get(f"{flaky.url}/metrics").text
    assert result.returncode == 0, result.stderr[-3000:]
    failed = [line for line in metrics.splitlines() if line.startswith('tropd_errors_total{kind="overloaded"}')]
    assert failed and float(failed[0].split()[-1]) >= 1, failed  # the trainer did meet (and retry) 503s
    answered = sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("tropd_requests_total{"))
    print(f"flaky teacher: {failed[0].split()[-1]} of {answered:.0f} requests answered 503, all retried")
    steps, healthy_steps = check_run(tmp_path / "run"), check_run(baseline)
    assert [r["loss"] for r in steps] == pytest.approx([r["loss"] for r in healthy_steps], rel=1e-5, abs=1e-6)
    assert_same_weights(baseline, tmp_path / "run")


def test_teacher_gone_for_good_is_a_clear_error(toy_quick, tmp_path):
    log = tmp_path / "trainer.log"
    service = launch(toy_quick / "teacher", "hf", tmp_path / "teacher.log", *SERVE, env=ONE_THREAD, timeout=240)
    trainer = start_trainer(trainer_args(toy_quick, service.url, tmp_path / "run", "checkpoint_every=1",
                                         "teacher.retries=2"), log)  # fmt: skip
    try:
        wait_for(lambda: len(step_records(tmp_path / "run")) >= 2, trainer, 240, log)
        service.process.kill()
        service.process.wait()
        assert trainer.wait(timeout=120) == 2, log.read_text()[-3000:]
    finally:
        stop(trainer)
        service.stop()
    text = log.read_text()
    print("teacher gone:", next((line for line in text.splitlines() if line.startswith("tropd: error:")), ""))
    assert "Traceback" not in text
    assert "unavailable after 3 attempts" in text and "continue the run with --resume" in text, text[-2000:]


# ---- bad trainer input ----------------------------------------------------------------------------------


def _one_line_error(result: subprocess.CompletedProcess, needle: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("tropd: error:")]
    assert len(lines) == 1 and needle in lines[0], result.stderr[-3000:]


@pytest.mark.parametrize(
    "text,needle",
    [
        ("steps: [1, 2\n", "not valid YAML"),
        ("- steps\n- 3\n", "must hold a mapping"),
        ("stepz: 3\n", "stepz"),
        ("rollout: {max_new_tokens: -3}\n", "rollout.max_new_tokens"),
        ("loss: {tau: .nan}\n", "loss.tau"),
        ("teacher: {top_k: 1e9}\n", "teacher.top_k"),
        ("loss: 3\n", "loss"),
        ("optim: {lr: fast}\n", "optim.lr"),
    ],
)
def test_bad_config_file_is_a_one_line_error(toy_quick, tmp_path, text, needle):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    result = run_trainer([sys.executable, "-m", "tropd", "train", "--config", str(config), f"out={tmp_path / 'r'}",
                          f"student={toy_quick / 'student'}"], timeout=120)  # fmt: skip
    _one_line_error(result, needle)


def _broken_student(toy_quick: Path, where: Path, kind: str) -> Path:
    student = where / kind
    shutil.copytree(toy_quick / "student", student)
    if kind == "no-weights":
        (student / "model.safetensors").unlink()
    elif kind == "truncated-weights":
        data = (student / "model.safetensors").read_bytes()
        (student / "model.safetensors").write_bytes(data[:1000])
    elif kind == "no-tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (student / name).unlink(missing_ok=True)
    elif kind == "other-tokenizer":
        from trainer.toy.tokenizer import build_hf_tokenizer

        tok = build_hf_tokenizer()
        tok.add_tokens(["X"])
        tok.save_pretrained(student)
    return student


@pytest.mark.parametrize(
    "kind,needle",
    [
        ("no-weights", "has no weights"),
        ("truncated-weights", "model.safetensors is damaged"),
        ("no-tokenizer", "has no tokenizer"),
        ("other-tokenizer", "tokenizer differs"),
    ],
)
def test_bad_student_is_a_one_line_error(toy_quick, healthy, tmp_path, kind, needle):
    student = _broken_student(toy_quick, tmp_path, kind)
    args = trainer_args(toy_quick, healthy.url, tmp_path / "run", f"student={student}")
    _one_line_error(run_here(args), needle)


@pytest.mark.parametrize(
    "url,needle",
    [
        ("not-a-url", "must be an http:// or https:// URL"),
        ("ftp://127.0.0.1:8000", "must be an http:// or https:// URL"),
        ("http://[::1", "is not a valid URL"),
        ("http://127.0.0.1:{port}/not/the/service", "HTTP 404"),
    ],
)
def test_bad_teacher_url_is_a_one_line_error_at_once(toy_quick, healthy, tmp_path, url, needle):
    port = healthy.url.rsplit(":", 1)[1]
    start = time.monotonic()
    result = run_here(trainer_args(toy_quick, url.format(port=port), tmp_path / "run"))
    _one_line_error(result, needle)
    assert time.monotonic() - start < 60  # refused, not retried with back-off


def test_two_replicas_share_the_load_and_one_killed_changes_nothing(toy_quick, healthy, baseline, tmp_path):
    """teacher.url lists two replicas: both serve; one SIGKILLed mid-run is taken out, its requests go to the
    other at once, it is started again meanwhile, and the weights equal the single-teacher run's."""
    log, port = tmp_path / "trainer.log", free_port()
    other = launch(
        toy_quick / "teacher", "hf", tmp_path / "replica.log", *SERVE, port=port, env=ONE_THREAD, timeout=240
    )
    urls = f"[{healthy.url},{other.url}]"
    trainer = start_trainer(trainer_args(toy_quick, urls, tmp_path / "run"), log)
    try:
        wait_for(lambda: len(step_records(tmp_path / "run")) >= 3, trainer, 240, log)
        served_before = _scored(other.url)
        other.process.kill()
        other.process.wait()
        other = launch(toy_quick / "teacher", "hf", tmp_path / "replica-2.log", *SERVE, port=port, env=ONE_THREAD,
                       timeout=240)  # fmt: skip
        assert trainer.wait(timeout=240) == 0, log.read_text()[-3000:]
    finally:
        stop(trainer)
        other.stop()
    assert served_before > 0  # the second replica took its share before it died
    check_run(tmp_path / "run")
    requests = json.loads((tmp_path / "run" / "summary.json").read_text())["teacher_requests"]
    assert set(requests) == {healthy.url, other.url} and all(n > 0 for n in requests.values()), requests
    assert "Traceback" not in log.read_text()
    assert_same_weights(baseline, tmp_path / "run")


def test_a_replica_back_in_service_is_probed_and_used_again(toy_quick, healthy, tmp_path):
    from services.teacher.client import TeacherClient

    port = free_port()
    other = launch(
        toy_quick / "teacher", "hf", tmp_path / "replica-1.log", *SERVE, port=port, env=ONE_THREAD, timeout=240
    )
    sequences = [[1, 5, 6, 7, 8, 9]] * 4

    async def go():
        nonlocal other
        async with TeacherClient([healthy.url, other.url], retries=3) as client:
            client.expect(await client.info())
            a, b = client.replicas
            await asyncio.gather(*(client.score(sequences, 1, 2) for _ in range(8)))
            assert a.requests > 0 and b.requests > 0
            other.process.kill()
            other.process.wait()
            for _ in range(4):  # every request is answered: by the live replica, at once
                assert len(await client.score(sequences, 1, 2)) == 4
            assert not b.in_service
            other = launch(toy_quick / "teacher", "hf", tmp_path / "replica-2.log", *SERVE, port=port, env=ONE_THREAD,
                           timeout=240)  # fmt: skip
            served = b.requests
            deadline = time.monotonic() + 90
            while b.requests == served:  # probed with /readyz (1 s, then doubling), then in service again
                assert time.monotonic() < deadline, "the restarted replica was never used again"
                await client.score(sequences, 1, 2)
                await asyncio.sleep(0.2)
            assert b.in_service

    try:
        asyncio.run(go())
    finally:
        other.stop()


def test_replicas_of_different_models_are_refused(toy_quick, healthy, tmp_path):
    """Scores must not depend on which replica answers: a replica serving another model is refused at start."""
    with teacher(toy_quick / "student", "hf", tmp_path, env=ONE_THREAD) as other:
        result = run_here(trainer_args(toy_quick, f"[{healthy.url},{other.url}]", tmp_path / "run"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "differ in model" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("url", "needle"),
    [("[]", "empty list"), ("[http://127.0.0.1:1,http://127.0.0.1:1]", "twice")],
)
def test_bad_replica_lists_are_one_line_errors(toy_quick, tmp_path, url, needle):
    result = run_here(trainer_args(toy_quick, url, tmp_path / "run"))
    assert result.returncode == 2 and needle in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def _scored(url: str) -> float:
    """Scoring requests the service at `url` has answered (its Prometheus counter)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    lines = [line for line in text.splitlines() if line.startswith("tropd_requests_total") and "/v1/score" in line]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)
