"""`tropd bench trainer`: what the asynchronous pipeline and the service cost or save, measured side by side.

(a) async vs strict on-policy: the same run with `max_staleness` 1 and 0 against a teacher slowed by an
    injected latency (`--simulate-latency-ms`, by default the measured step time without it); the ratio
    is the mean step time async / sync (target <= 0.6).
(b) service vs in-process: trainer throughput (response tokens per second of step time) with the teacher
    as a service vs the same teacher model loaded in the trainer's process (target >= 0.85).
Guidance prefixes are off here, so that both arms make the same teacher calls (scoring only). The trainer
and the teacher get the same number of torch threads each (`--threads`, default half the cores), in the
trainer's process or in the service's, so that the arms differ only in what they measure.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

from services.teacher.launch import half_the_cores, serving
from trainer import toy
from trainer.config import load_config
from trainer.train import train


def _run(name: str, base: list[str], extra: list[str], work: Path) -> list[dict]:
    config = load_config(None, [*base, f"out={work / name}", *extra])
    train(config, log=lambda *_: None)
    records = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]


def _steady(records: list[dict], key: str, skip: int = 2) -> float:
    values = [r[key] for r in records[skip:]] or [r[key] for r in records]
    return statistics.mean(values)


def run_bench(toy_dir: str, engine: str, steps: int, latency_ms: float | None, prompts: int, threads: int,
              progress=print) -> dict:  # fmt: skip
    teacher_dir = Path(toy_dir) / "teacher"
    serve_threads = ("--threads", str(threads))
    base = [
        f"student={Path(toy_dir) / 'student'}", f"steps={steps}", "eval.before_after=false", "eval.every=0",
        f"threads={threads}",
        "tensorboard=false", "plot=false", "checkpoint_every=0", "guidance.enabled=false",
        f"rollout.prompts_per_step={prompts}", "rollout.samples_per_prompt=1", "tasks={math: 0.7, code: 0.3}",
    ]  # fmt: skip
    report: dict = {
        "settings": {"toy": toy_dir, "engine": engine, "steps": steps, "prompts_per_step": prompts, "threads": threads}
    }
    with tempfile.TemporaryDirectory(prefix="tropd-bench-") as tmp:
        work = Path(tmp)
        progress("[bench] (b) teacher as a service vs in the trainer's process")
        with serving(teacher_dir, engine, work / "teacher.log", *serve_threads) as svc:
            service = _run("service", base, [f"teacher.url={svc.url}"], work)
        inproc = _run("inprocess", base, ["teacher.api=inprocess", f"teacher.model={teacher_dir}",
                                          f"teacher.engine={engine}"], work)  # fmt: skip
        tps = {
            name: sum(r["response_tokens"] for r in recs[2:]) / sum(r["step_s"] for r in recs[2:])
            for name, recs in (("service", service), ("inprocess", inproc))
        }
        own_step = _steady(service, "step_s") - _steady(service, "wait_teacher_s")
        latency = latency_ms if latency_ms is not None else round(1000 * own_step, 1)
        progress(f"[bench] (a) async vs strict on-policy, teacher latency {latency:.0f} ms")
        slow = ("--simulate-latency-ms", str(latency), *serve_threads)
        with serving(teacher_dir, engine, work / "teacher-slow.log", *slow) as svc:
            sync = _run("sync", base, [f"teacher.url={svc.url}", "max_staleness=0"], work)
            async_ = _run("async", base, [f"teacher.url={svc.url}", "max_staleness=1"], work)
    report["service_vs_inprocess"] = {
        "tokens_per_s_service": tps["service"],
        "tokens_per_s_inprocess": tps["inprocess"],
    }
    report["async_vs_sync"] = {
        "injected_latency_ms": latency,
        "trainer_step_s_without_teacher_wait": own_step,
        "step_s_sync": _steady(sync, "step_s"),
        "step_s_async": _steady(async_, "step_s"),
        "wait_teacher_s_sync": _steady(sync, "wait_teacher_s"),
        "wait_teacher_s_async": _steady(async_, "wait_teacher_s"),
    }
    report["async_over_sync"] = report["async_vs_sync"]["step_s_async"] / report["async_vs_sync"]["step_s_sync"]
    report["service_over_inprocess"] = tps["service"] / tps["inprocess"]
    return report


def format_report(r: dict) -> str:
    a, b = r["async_vs_sync"], r["service_vs_inprocess"]
    s = r["settings"]
    return "\n".join(
        [
            f"tropd bench trainer  (toy {s['toy']}, {s['engine']} engine, {s['steps']} steps, "
            f"{s['prompts_per_step']} prompts/step, {s['threads']} torch thread(s) each for trainer and teacher; "
            "means over steps 3..)",
            "",
            "(a) pipeline       | step time (s) | waiting for the teacher (s)",
            f"    strict (sync)  | {a['step_s_sync']:13.3f} | {a['wait_teacher_s_sync']:.3f}",
            f"    async (stale 1)| {a['step_s_async']:13.3f} | {a['wait_teacher_s_async']:.3f}",
            f"    injected teacher latency {a['injected_latency_ms']:.0f} ms; trainer's own step "
            f"{a['trainer_step_s_without_teacher_wait']:.3f} s",
            f"    async_over_sync = {r['async_over_sync']:.2f}   (target <= 0.6)",
            "",
            "(b) teacher        | trainer tokens/s",
            f"    service (HTTP) | {b['tokens_per_s_service']:.0f}",
            f"    in-process     | {b['tokens_per_s_inprocess']:.0f}",
            f"    service_over_inprocess = {r['service_over_inprocess']:.2f}   (target >= 0.85)",
        ]
    )


def main(args) -> int:
    if args.build:
        toy.build(args.toy, quick=args.quick, log=_stderr)
    steps = args.steps or (6 if args.quick else 30)
    prompts = 16 if args.quick else 64
    threads = args.threads or half_the_cores()
    report = run_bench(args.toy, args.engine, steps, args.latency_ms, prompts, threads, progress=_stderr)
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def _stderr(message: str) -> None:
    import sys

    print(message, file=sys.stderr)
