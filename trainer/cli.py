"""Subcommands of the trainer wing: `tropd toy ...`, `tropd demo`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tropd.argtypes import non_negative_int, positive_int
from tropd.errors import UserError

TASK_CHOICES = ("math", "code", "general")


def _model_dir(path: str, what: str = "model") -> str:
    from tropd.modeldir import check_model_dir

    if not (Path(path) / "config.json").is_file():
        raise UserError(f"{what} directory {path!r} not found (no config.json there); build it with `tropd toy build`")
    check_model_dir(path, what, tokenizer=False)
    return path


def add_toy(sub) -> None:
    toy = sub.add_parser("toy", help="the offline toy world: build the teacher and student, evaluate models")
    toy_sub = toy.add_subparsers(dest="toy", metavar="ACTION", parser_class=type(toy), required=True)

    build = toy_sub.add_parser(
        "build",
        help="train the toy teacher and student (cached)",
        description="Build the toy world: a character tokenizer, a Llama teacher (~1M parameters) trained by SFT "
        "on scratchpad answers, and a smaller student (~0.45M) warm-started on answer-only responses plus single steps "
        "drilled in the teacher's style, so that the two disagree. "
        "Deterministic for a seed; a second run with the same settings is instant.",
    )
    build.add_argument("--out", help="output directory (default: artifacts/toy; artifacts/toy-quick with --quick)")
    build.add_argument("--quick", action="store_true", help="a tiny build for tests (under a minute on 2 cores)")
    build.add_argument(
        "--force", action="store_true", help="replace a world of the other kind (quick or full) in --out"
    )
    build.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default: 0)")
    build.set_defaults(run=run_toy_build)

    ev = toy_sub.add_parser(
        "eval",
        help="greedy accuracy of a model on a task's eval split",
        description="Greedy-decode accuracy on the eval split; with --teacher also the mean per-token reverse KL "
        "(K1 on the model's own samples) and the share of tokens with p_T < 0.01 p_S.",
    )
    ev.add_argument("--model", required=True, help="model directory (Hugging Face layout)")
    ev.add_argument("--task", required=True, choices=TASK_CHOICES + ("all",), help="task family, or all")
    ev.add_argument("--n", type=positive_int, default=500, help="number of eval prompts (default: 500)")
    ev.add_argument("--teacher", help="teacher model directory: also report reverse KL and outlier share")
    ev.add_argument(
        "--seed",
        type=non_negative_int,
        default=0,
        help="picks the eval prompts (the same seed, the same prompts) and, with --teacher, seeds the samples the "
        "reverse KL is measured on; accuracy is greedy (default: 0)",
    )
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(run=run_toy_eval)


def run_toy_build(args) -> int:
    from trainer.toy import world

    out = args.out or ("artifacts/toy-quick" if args.quick else "artifacts/toy")
    world.build(out, seed=args.seed, quick=args.quick, force=args.force)
    return 0


def run_toy_eval(args) -> int:
    from trainer.toy import world

    _model_dir(args.model)
    if args.teacher is not None:
        _model_dir(args.teacher, "teacher")
    names = TASK_CHOICES if args.task == "all" else (args.task,)
    results = [world.task_report(args.model, t, args.n, args.teacher, args.seed) for t in names]
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else {"results": results}))
    else:
        for r in results:
            print(_format_eval(r))
    return 0


def _format_eval(r: dict) -> str:
    line = f"{r['task']:<8} accuracy {100 * r['accuracy']:5.1f}%  (n={r['n']})"
    if "reverse_kl" in r:
        line += f"  reverse KL {r['reverse_kl']:.3f} nats/token  outlier share {100 * r['outlier_share']:.1f}%"
    return line


def add_train(sub) -> None:
    train = sub.add_parser(
        "train",
        help="train a student against a teacher (a service, a stock vLLM server, or in-process)",
        description="Train the student with TrOPD or a baseline (opd, eopd, reopold, topd, gkd, sft) against a "
        "teacher: a running teacher service (default), a stock vLLM OpenAI server (teacher.api=vllm-openai), or the "
        "teacher model in this process (teacher.api=inprocess teacher.model=DIR). The config is a YAML file (see "
        "configs/) with key=value overrides, e.g. "
        "`tropd train --config configs/toy-tropd.yaml steps=50 loss.outlier=mask teacher.url=http://host:8000`. "
        "Prompts come from the toy world (data.source=toy) or your own files (data.source=files "
        "data.train=[prompts.jsonl]: chats in `messages` or text in `prompt`); the student is any Hugging Face "
        "causal LM directory (student=DIR), on CUDA when there is one (device, dtype=bfloat16, parallel=ddp|fsdp "
        "under torchrun). README's 'Your own models' and configs/qwen3-8b-to-0.6b.yaml show a real setup.",
    )
    train.add_argument("--config", help="YAML config file (default: built-in defaults)")
    train.add_argument("--resume", action="store_true", help="continue the run in `out` from its last checkpoint")
    train.add_argument(
        "--plan",
        action="store_true",
        help="print the memory plan (each part's predicted peak per device) and exit without training",
    )
    train.add_argument("--json", action="store_true", help="with --plan: one JSON object (peak_bytes, parts)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (dotted keys)")
    train.set_defaults(run=run_train)


def run_train(args) -> int:
    from trainer.config import load_config

    config = load_config(args.config, args.overrides)
    if args.json and not args.plan:
        raise UserError("--json goes with --plan")
    if args.plan:
        from trainer.run import plan
        from tropd.modeldir import check_model_dir

        check_model_dir(config.student, "student")
        result = plan(config, log=lambda *a: print(*a, file=sys.stderr))
        print(json.dumps(result.as_json(), indent=2) if args.json else result.table())
        return 0
    from trainer.run import train

    summary = train(config, resume=args.resume)
    if summary is not None:  # rank 0
        _print_summary(summary)
    return 0


def _print_summary(summary: dict) -> None:
    before, after = summary["eval_before"], summary["eval_after"]
    print(f"[train] {summary['steps']} steps in {summary['wall_time_s']:.0f}s, {summary['skipped_steps']} skipped")
    if before is None or after is None:
        print(f"  run directory: {summary['run_dir']}")
        return
    width = max([8, *map(len, after["accuracy"])])
    for task, acc in after["accuracy"].items():
        print(f"  {task:<{width}} accuracy {100 * before['accuracy'][task]:5.1f}% -> {100 * acc:5.1f}%")
    print(f"  reverse KL {before['reverse_kl']:.3f} -> {after['reverse_kl']:.3f} nats/token")
    for name, kl in after.get("reverse_kl_by_teacher", {}).items():
        was = before.get("reverse_kl_by_teacher", {}).get(name, float("nan"))
        print(f"  reverse KL, teacher {name}: {was:.3f} -> {kl:.3f} nats/token")
    print(f"  run directory: {summary['run_dir']}")


def add_bench(sub) -> None:
    bench = sub.add_parser(
        "trainer",
        help="async pipeline vs strict on-policy; teacher service vs in-process",
        description="Measure, side by side in one run: (a) mean step time with the async pipeline "
        "(max_staleness 1) over strict on-policy, against a teacher slowed by an injected latency; (b) trainer "
        "throughput with the teacher as a service over the same teacher loaded in the trainer's process.",
    )
    bench.add_argument("--toy", help="toy world directory (default: artifacts/toy; artifacts/toy-quick with --quick)")
    bench.add_argument("--engine", choices=("hf", "vllm"), default="hf", help="teacher engine, both arms (hf)")
    bench.add_argument("--steps", type=positive_int, help="steps per arm (default: 30; 6 with --quick)")
    bench.add_argument("--latency-ms", type=float, help="injected teacher latency (default: the measured step time)")
    bench.add_argument(
        "--threads",
        type=positive_int,
        help="torch threads of the trainer and of the teacher, each (default: half the cores, at least 1): the "
        "two sides then share the machine the same way in every arm, in-process or as a service",
    )
    bench.add_argument("--quick", action="store_true", help="a short smoke run (small batches, few steps)")
    bench.add_argument("--no-build", dest="build", action="store_false", help="do not build the toy world")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.set_defaults(run=run_bench)


def add_bench_methods(sub) -> None:
    bench = sub.add_parser(
        "methods",
        help="TrOPD, its ablations and the baselines on the toy world; writes a markdown report and plots",
        description="Train the mismatched toy student with every method (opd, tropd and its ablations, eopd, "
        "reopold, topd, gkd, sft) under the same rollout budget, for several seeds, then opd and tropd from students "
        "at several distances from the teacher (the mismatch sweep). Writes results.json and PNG "
        "plots to --out, and the report to <out>.md beside it (docs/results.md). The teacher runs in the "
        "trainer's process. Full run: hours on 2 CPU cores; --quick: minutes.",
    )
    bench.add_argument("--out", help="folder of the results, runs and plots; the report is <out>.md beside it "
                       "(default: docs/results, report docs/results.md; with --quick runs/methods-quick, so that a "
                       "smoke run never replaces the published report)")  # fmt: skip
    bench.add_argument("--toy", help="an existing toy world (default: artifacts/toy, built if missing; "
                       "artifacts/toy-quick with --quick)")  # fmt: skip
    bench.add_argument("--engine", choices=("hf", "vllm"), default="hf", help="teacher engine (hf)")
    bench.add_argument("--steps", type=positive_int, help="steps per run (default: 600; 6 with --quick)")
    bench.add_argument("--seeds", type=positive_int, help="seeds per method (default: 3; 1 with --quick)")
    bench.add_argument("--methods", type=_names, help="comma-separated subset of the methods (default: all)")
    bench.add_argument("--no-sweep", action="store_true", help="skip the mismatch sweep")
    bench.add_argument("--quick", action="store_true", help="a smoke run: tiny batches and few steps (minutes)")
    bench.add_argument("--jobs", type=positive_int, default=1, help="runs trained at a time (default: 1, in "
                       "this process with the trainer's default threads: the usable cores, at most 8); above 1, each "
                       "in its own process with an equal share of the usable cores")  # fmt: skip
    bench.add_argument("--resume", action="store_true", help="reuse the runs of an earlier report in --out "
                       "(results.json or results.partial.json) whose method, seed, student, budget and toy world "
                       "match, and train only the rest; the key holds settings, not code: after a change to the "
                       "trainer, run without it")  # fmt: skip
    bench.add_argument("--tune", action="store_true", help="first train each method at the default learning rate "
                       "and 3x up and down on seed 0, then its seeds at its best rate (final math + code accuracy); "
                       "the report shows the tuning table and compares methods at their own best rates")  # fmt: skip
    bench.add_argument("--json", action="store_true", help="print the tables as one JSON object")
    bench.set_defaults(run=run_bench_methods)


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one method name")
    return names


def methods_out(args) -> str:
    """The report folder: --out, else the published one (docs/results) for a full run and runs/methods-quick for
    --quick."""
    return args.out or ("runs/methods-quick" if args.quick else "docs/results")


def run_bench_methods(args) -> int:
    from trainer.bench.methods import main

    args.out = methods_out(args)
    return main(args)


def run_bench(args) -> int:
    import math

    from tropd.paths import directory_path

    if args.latency_ms is not None and not (math.isfinite(args.latency_ms) and args.latency_ms >= 0):
        raise UserError(f"--latency-ms must be a number >= 0, got {args.latency_ms}")
    if args.steps is not None and args.steps < 3:
        raise UserError(f"--steps must be >= 3 (the first two steps of each arm are warm-up), got {args.steps}")
    args.toy = args.toy or ("artifacts/toy-quick" if args.quick else "artifacts/toy")
    directory_path(args.toy, "--toy")
    if not args.build:
        _model_dir(str(Path(args.toy) / "teacher"), "teacher")
    from trainer.bench.speed import main

    return main(args)


# `tropd demo` without --config: the built-in defaults (the toy TrOPD settings, also written out in
# configs/toy-tropd.yaml), shortened to fit a few minutes on 2 CPU cores
DEMO_SETTINGS = ("steps=600", "eval.every=100", "checkpoint_every=200")


def add_demo(sub) -> None:
    demo = sub.add_parser(
        "demo",
        help="the whole method on the toy world: build, serve the teacher, train with TrOPD, evaluate",
        description="Build the toy world if it is not cached, start the teacher service as a subprocess (the vllm "
        "engine where it installs, else hf), train the mismatched student with TrOPD, and evaluate before and "
        "after. Prints where the run directory, the plot and the TensorBoard logs are. The teacher is stopped on "
        "exit and on Ctrl-C.",
    )
    demo.add_argument("--out", help="run directory (default: runs/demo-<date>-<time>)")
    demo.add_argument(
        "--toy",
        default="artifacts/toy",
        help="toy world directory, built there if missing or out of date; a quick build (`tropd toy build "
        "--quick`) stays quick (default: artifacts/toy)",
    )
    demo.add_argument("--engine", choices=("auto", "vllm", "hf"), default="auto", help="teacher engine (auto)")
    demo.add_argument("--steps", type=positive_int, help="training steps (default: 600; with --config, the config's)")
    demo.add_argument(
        "--config",
        help="YAML config (default: the built-in defaults, which are the toy TrOPD settings that "
        "configs/toy-tropd.yaml also holds, with 600 steps, eval every 100, a checkpoint every 200; the file itself "
        "is not read)",
    )
    demo.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, as for `tropd train`")
    demo.set_defaults(run=run_demo)


def demo_overrides(args, out: Path) -> list[str]:
    """Config overrides of `tropd demo`: the short demo settings unless --config is given, then the toy
    world's student and the run directory, then the user's overrides, then --steps."""
    short = [] if args.config else list(DEMO_SETTINGS)
    overrides = [*short, f"student={Path(args.toy) / 'student'}", f"out={out}", *args.overrides]
    if args.steps:
        overrides.append(f"steps={args.steps}")
    return overrides


def _interrupt(*_args) -> None:
    raise KeyboardInterrupt


def run_demo(args) -> int:
    import signal
    import time

    from services.teacher.launch import launch
    from trainer.config import load_config
    from trainer.rundir import check_run_dir
    from trainer.toy import world

    if any(item.split("=", 1)[0].strip() == "out" for item in args.overrides):
        raise UserError("tropd demo: give the run directory with --out DIR, not out=DIR")
    out = Path(args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    config = load_config(args.config, demo_overrides(args, out))  # validate before any work
    if config.teachers:
        raise UserError("tropd demo serves one teacher, the toy's: leave out `teachers` (tropd train takes them)")
    check_run_dir(out, Path(config.student))
    if (out / "metrics.jsonl").is_file():
        raise UserError(f"run directory {out} already holds a run: choose another --out")
    seed, quick = world.built_kind(args.toy)
    world.build(args.toy, seed=seed, quick=quick)
    engine = args.engine
    if engine == "auto":
        from tropd.machine import vllm_available

        engine = "vllm" if vllm_available() else "hf"
    print(f"[demo] starting the teacher service ({engine} engine) on {Path(args.toy) / 'teacher'}")
    # SIGTERM (kill, docker stop) ends the demo like Ctrl-C does, so the teacher below is stopped too
    signal.signal(signal.SIGTERM, _interrupt)
    teacher = launch(Path(args.toy) / "teacher", engine, out / "teacher.log")
    try:
        print(f"[demo] teacher ready at {teacher.url}; training the student with {config.loss.method}")
        config.teacher.url = teacher.url
        from trainer.run import train

        summary = train(config)
    finally:
        status = teacher.stop()
        print(f"[demo] teacher stopped (exit status {status}); its log: {out / 'teacher.log'}")
    _print_summary(summary)
    print(f"[demo] plot: {out / 'curves.png'}")
    print(f"[demo] TensorBoard: .venv/bin/tensorboard --logdir {out / 'tensorboard'}")
    return 0
