"""`tropd bench methods`: TrOPD, its ablations and the baselines on the toy world, side by side.

Every arm trains the same mismatched student from the same init with the same rollout budget (prompts per
step x samples per prompt x steps, up to `max_new_tokens` each; the report gives the response tokens each
arm really used), for several seeds, against one teacher. A mismatch sweep then runs `opd` and `tropd` from
students warm-started at several distances from the teacher (reverse KL at init on the x-axis).

Collapse is defined before any run: a run collapses when its loss or gradient is non-finite on more than
10% of steps, or when its mean accuracy over the evaluated tasks is below the init's by more than 5 points
at each of its last two evaluations. A grad-norm spike is a step whose gradient norm (before clipping) is
above 10 x the run's median.

Writes `results.json` and PNG plots to `--out` (default: docs/results) and the report beside that folder,
`<out>.md` (docs/results.md), its images linked from the folder. Every finished run is kept at once in
`results.partial.json`, under a key made of the settings that decide its outcome (method, seed, student, budget,
toy world; not the code nor the trainer's defaults: after a change to either, run again without `--resume`);
`--resume` reuses the runs whose key matches, so a long benchmark can stop and go on, and a run that two parts of
the report share (the sweep's own student) is trained once. Runs of earlier reports that the present one does
not include are carried along (`other_runs`) when they were made in the same toy world, so a report of a few
methods does not lose the others. `--jobs N` trains N runs at a time in separate processes, each with an equal
share of the cores.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

from trainer.bench.probe import probe
from trainer.bench.report import (
    EVAL_TASKS,
    SWEEP_ARMS,
    markdown,
    report_path,
    sweep_table,
    table,
    tuning_table,
)
from tropd.machine import usable_cores

ARMS: dict[str, list[str]] = {
    "opd": ["loss.method=opd"],
    "tropd": [],
    "tropd-no-guidance": ["guidance.enabled=false"],
    "tropd-outlier-mask": ["loss.outlier=mask"],
    "tropd-outlier-clip": ["loss.outlier=clip"],
    "tropd-rule-threshold": ["loss.rule=threshold"],
    "tropd-rule-adaptive": ["loss.rule=adaptive"],
    # the guidance as the TrOPD paper is reported to run it: cosine-annealed prefix length, sampled-token FKL, 0.001
    "tropd-guidance-paper": [
        "guidance.schedule=length",
        "guidance.prefix_loss=sampled_fkl",
        "loss.lambda_prefix=0.001",
    ],  # fmt: skip
    "eopd": ["loss.method=eopd"],
    # the floor named, so that no report's run of the earlier `reopold` (now `topd`) is reused under this name
    "reopold": ["loss.method=reopold", "loss.floor_lambda=0.2"],
    "topd": ["loss.method=topd"],
    "gkd": ["loss.method=gkd"],
    "sft": ["loss.method=sft"],
}
# Students for the mismatch sweep: the toy student, then that student after N steps of SFT on teacher-style
# answers (nearer the teacher).
SWEEP_SFT_STEPS = {"full": (0, 100), "quick": (0, 10)}


def settings(quick: bool, steps: int | None, seeds: int | None) -> dict:
    if quick:
        steps = steps or 6
        return {"steps": steps, "seeds": seeds or 1, "eval_every": max(1, steps // 2), "eval_n": 20, "kl_prompts": 16,
                "prompts_per_step": 8, "samples_per_prompt": 1, "max_new_tokens": 32, "warmup_steps": 1}  # fmt: skip
    steps = steps or 600
    return {"steps": steps, "seeds": seeds or 3, "eval_every": max(1, steps // 4), "eval_n": 200, "kl_prompts": 64,
            "prompts_per_step": 64, "samples_per_prompt": 1, "max_new_tokens": 40}  # fmt: skip


def lr_grid(default: float) -> list[float]:
    """The learning rates `--tune` tries: the default first (it wins ties), then 3x down and 3x up."""
    return [default, round(default / 3, 12), round(default * 3, 12)]


def overrides(s: dict, student: Path, teacher: Path, engine: str, out: Path, seed: int,
              lr: float | None = None) -> list[str]:  # fmt: skip
    """The run's settings; `optim.lr` only when it is not the default, so that an untuned run keeps its key."""
    return [
        f"student={student}", f"out={out}", f"seed={seed}", f"steps={s['steps']}", "teacher.api=inprocess",
        f"teacher.model={teacher}", f"teacher.engine={engine}", f"eval.every={s['eval_every']}",
        f"eval.n={s['eval_n']}", f"eval.kl_prompts={s['kl_prompts']}", f"eval.tasks=[{','.join(EVAL_TASKS)}]",
        f"rollout.prompts_per_step={s['prompts_per_step']}", f"rollout.samples_per_prompt={s['samples_per_prompt']}",
        f"rollout.max_new_tokens={s['max_new_tokens']}", "tensorboard=false", "plot=false", "checkpoint_every=0",
        "keep_checkpoints=1", *([f"optim.lr={lr!r}"] if lr is not None and lr != s.get("lr") else []),
        # a smoke run's few steps would all sit in the default warmup; a full run keeps the default (and its key)
        *([f"optim.warmup_steps={s['warmup_steps']}"] if "warmup_steps" in s else []),
    ]  # fmt: skip


def run_key(arm: str, base: list[str], toy_build: dict | None) -> str:
    """What decides a run's outcome: its method, its overrides (all but the output directory) and the toy."""
    what = {"arm": arm, "extra": ARMS[arm], "overrides": [o for o in base if not o.startswith("out=")],
            "toy": toy_build}  # fmt: skip
    return _digest(what, 16)


def world_id(toy_build: dict | None) -> str:
    """A short name of the toy world a run was made in (its build settings)."""
    return _digest(toy_build, 12)


def _digest(what, n: int) -> str:
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:n]


def _work(job: tuple[str, str, list[str], int]) -> tuple[str, dict]:
    """One run in a worker process (`--jobs`), with its share of the cores."""
    key, arm, base, threads = job
    return key, run_one(arm, [*ARMS[arm], f"threads={threads}"], base)


def run_one(arm: str, extra: list[str], base: list[str]) -> dict:
    """Train one arm; returns its curves and the numbers of the report."""
    import torch

    from trainer.config import load_config
    from trainer.run import train

    config = load_config(None, [*base, *extra])
    shutil.rmtree(config.out, ignore_errors=True)  # a run trained again starts afresh (the bench owns runs/)
    t0 = time.monotonic()
    summary = train(config, log=lambda *_: None)
    wall = time.monotonic() - t0
    answers = probe(str(Path(config.out) / "student"), config.teacher.model, EVAL_TASKS, config.eval.n)
    threads = torch.get_num_threads()  # what train() used
    records = [json.loads(line) for line in (Path(config.out) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    evals = [(0, summary["eval_before"])] + [(r["step"], r["eval"]) for r in records if "eval" in r]
    grad = [r["grad_norm"] for r in steps if math.isfinite(r["grad_norm"])]
    median = statistics.median(grad) if grad else math.nan
    bad = sum(1 for r in steps if not (math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])))
    init = _mean_acc(summary["eval_before"])
    tail = [_mean_acc(e) for _, e in evals[-2:]]
    return {
        "arm": arm,
        "seed": config.seed,
        "init": summary["eval_before"],
        "final": summary["eval_after"],
        "best_accuracy": {t: max(e["accuracy"][t] for _, e in evals) for t in EVAL_TASKS},
        "curve": [{"step": s, "accuracy": e["accuracy"], "reverse_kl": e["reverse_kl"]} for s, e in evals],
        "collapsed": bad > 0.1 * len(steps) or all(a < init - 0.05 for a in tail),
        "nonfinite_steps": bad,
        "grad_spikes": sum(1 for g in grad if g > 10 * median),
        "response_tokens": sum(r["response_tokens"] for r in steps),
        "wall_time_s": round(wall, 1),
        "threads": threads,
        "probe": answers,
    }


def _mean_acc(evaluation: dict) -> float:
    return statistics.mean(evaluation["accuracy"][t] for t in EVAL_TASKS)


def sweep_students(toy_dir: Path, build: dict | None, work: Path, sft_steps: tuple[int, ...], seed: int,
                   log) -> list[Path]:  # fmt: skip
    """The toy student, and copies of it moved nearer the teacher by short SFT on teacher-style answers."""
    from trainer.toy import world

    out = []
    for n in sft_steps:
        if n == 0:
            out.append(toy_dir / "student")
            continue
        path = work / f"student-sft{n}"
        # kept only when made the same way from the same toy world
        spec = world.SftSpec("teacher", n, 64, 3e-3, warmup=min(10, n))
        made = {"toy": build, "seed": seed, "sft": asdict(spec)}
        stamp = path / "tropd-sweep-student.json"
        if not (path / "config.json").is_file() or not stamp.is_file() or json.loads(stamp.read_text()) != made:
            log(f"[bench] warm-starting a nearer student: {n} SFT steps on teacher-style answers")
            model = world.load_model(toy_dir / "student")
            world.sft(model, spec, seed, f"sweep{n}", log=log)
            world.save_model(model, path)
            stamp.write_text(json.dumps(made))
        out.append(path)
    return out


def run_bench(toy_dir: str, out: str, engine: str, quick: bool, steps: int | None, seeds: int | None,
              arms: list[str] | None, sweep: bool, jobs: int = 1, resume: bool = False, tune: bool = False,
              log=print) -> dict:  # fmt: skip
    """Train the report's runs (those not reused) and write results.json, the plots and the markdown report. With
    `tune`, first every method at each rate of `lr_grid` on seed 0, then its seeds at its best rate."""
    from trainer.bench.plots import plot_methods
    from trainer.config import TrainConfig
    from trainer.toy import world

    toy_dir, out = Path(toy_dir), Path(out)
    s = {**settings(quick, steps, seeds), "lr": TrainConfig().optim.lr}
    chosen = arms or list(ARMS)
    work = out / "runs"
    work.mkdir(parents=True, exist_ok=True)
    teacher = toy_dir / "teacher"
    build = json.loads((toy_dir / "build.json").read_text()).get("settings")
    report: dict = {
        "command": "tropd bench methods " + " ".join(sys.argv[3:]) if sys.argv[1:3] == ["bench", "methods"] else "",
        "settings": {**s, "toy": str(toy_dir), "engine": engine, "quick": quick, "jobs": jobs, "tune": tune},
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": usable_cores()},
        "toy_build": build,
        "tuning": [],
        "runs": [],
        "sweep": [],
    }
    earlier, world_name = _earlier_runs(out, log), world_id(build)
    done = dict(earlier) if resume else {}
    plan: list[tuple] = []  # every run of the report: (section, arm, seed, student, lr)
    keys: list[str] = []
    trained = 0

    def train_plan(phase: list[tuple], label: str) -> None:
        nonlocal trained
        todo: dict[str, tuple[str, int, list[str]]] = {}
        phase_keys = []
        for section, arm, seed, student, lr in phase:
            name = f"{arm}-s{seed}" if section == "runs" else f"sweep-{student.name}-{arm}-s{seed}"
            name = f"tune-{arm}-lr{lr:g}" if section == "tuning" else name
            base = overrides(s, student, teacher, engine, work / name, seed, lr)
            key = run_key(arm, base, build)
            phase_keys.append(key)
            if key not in done and key not in todo:
                todo[key] = (arm, seed, base)
        plan.extend(phase)
        keys.extend(phase_keys)
        log(f"[bench] {label}{len(phase)} runs in the report, {len(set(phase_keys))} distinct, {len(todo)} to train"
            + (f", {jobs} at a time" if jobs > 1 else ""))  # fmt: skip

        def finished(key: str, result: dict) -> None:
            done[key] = {**result, "key": key, "world": world_name}
            _fill(report, plan, keys, done, earlier)
            _save_partial(report, out)
            log(f"[bench] ({len(done.keys() & set(keys))}/{len(set(keys))}) {result['arm']}, seed {result['seed']}: "
                f"{_line(result)}")  # fmt: skip

        if jobs == 1:
            for key, (arm, seed, base) in todo.items():
                log(f"[bench] training {arm}, seed {seed}")
                finished(key, run_one(arm, ARMS[arm], base))
        elif todo:
            _run_parallel(todo, jobs, finished, log)
        trained += len(todo)
        _fill(report, plan, keys, done, earlier)

    t0 = time.monotonic()
    best = dict.fromkeys(chosen, s["lr"])
    if tune:
        lrs = lr_grid(s["lr"])
        train_plan([("tuning", arm, 0, toy_dir / "student", lr) for arm in chosen for lr in lrs], "tuning: ")
        report["tuning_table"] = tuning_table(report["tuning"], lrs)
        best = {r["arm"]: r["best_lr"] for r in report["tuning_table"]}
    phase = [("runs", arm, seed, toy_dir / "student", best[arm]) for arm in chosen for seed in range(s["seeds"])]
    if sweep:
        students = sweep_students(toy_dir, build, work, SWEEP_SFT_STEPS["quick" if quick else "full"], 0, log)
        phase += [("sweep", arm, seed, st, best.get(arm, s["lr"])) for st in students for arm in SWEEP_ARMS
                  for seed in range(s["seeds"])]  # fmt: skip
    train_plan(phase, "")
    report["wall_time_s"] = round(time.monotonic() - t0, 1)
    report["trained_now"] = trained
    report["train_time_s"] = round(sum(done[k]["wall_time_s"] for k in set(keys)), 1)
    report["table"] = table(report["runs"])
    report["sweep_table"] = sweep_table(report["sweep"])
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "results.partial.json").unlink(missing_ok=True)
    plot_methods(report, out)
    report_path(out).write_text(markdown(report, images=out.resolve().name))
    world.quiet_transformers()
    return report


def _fill(report: dict, plan: list, keys: list[str], done: dict, earlier: dict) -> None:
    """The report's sections, in plan order, from the finished runs; and the earlier reports' other runs made in
    the same toy world (a run of another world is still reused by key, never carried into this report)."""
    report["tuning"], report["runs"], report["sweep"] = [], [], []
    for (section, _arm, _seed, student, lr), key in zip(plan, keys, strict=True):
        if key in done:
            run = {**{k: v for k, v in done[key].items() if k not in ("student", "world")}, "lr": lr}
            report[section].append({**run, "student": student.name} if section == "sweep" else run)
    mine, world = set(keys), world_id(report.get("toy_build"))
    report["other_runs"] = [r for k, r in earlier.items() if k not in mine and r.get("world") == world]


def _earlier_runs(out: Path, log) -> dict:
    """Finished runs of an earlier, stopped or finished, report in `out`, by key, each with the toy world it was
    made in (`world`): a run of the report's own sections is of the report's world; a carried run keeps its tag,
    and one carried without a tag (by an older version) is of an unknown world."""
    done: dict = {}
    for name in ("results.json", "results.partial.json"):  # the partial file is the newer when both exist
        path = out / name
        if not path.is_file():
            continue
        try:
            earlier = json.loads(path.read_text())
        except ValueError as e:
            log(f"[bench] warning: {path} is not readable JSON ({e}); its runs are not reused")
            continue
        world = world_id(earlier.get("toy_build"))
        for section in ("tuning", "runs", "sweep", "other_runs"):
            for r in earlier.get(section, []):
                if isinstance(r, dict) and isinstance(r.get("key"), str):
                    # a sweep run keeps its student's name: a run carried along says whose it is
                    done[r["key"]] = r if section == "other_runs" else {**r, "world": world}
    return done


def _run_parallel(todo: dict, jobs: int, finished, log) -> None:
    """Train the runs `jobs` at a time, each in its own process with an equal share of the cores. On an error
    or Ctrl-C the other runs are stopped at once (the finished ones are already saved)."""
    import multiprocessing

    jobs = min(jobs, len(todo))
    threads = max(1, usable_cores() // jobs)
    pool = multiprocessing.get_context("spawn").Pool(jobs)
    try:
        items = [(key, arm, base, threads) for key, (arm, _seed, base) in todo.items()]
        for key, result in pool.imap_unordered(_work, items):
            finished(key, result)
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def _save_partial(report: dict, out: Path) -> None:
    """Every finished run is kept at once (results.partial.json), so a long run that stops loses nothing;
    written beside and renamed, so a stop during the write leaves the last complete file."""
    tmp = out / "results.partial.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out / "results.partial.json")


def _line(r: dict) -> str:
    acc = " ".join(
        f"{t} {100 * r['init']['accuracy'][t]:.0f}->{100 * r['final']['accuracy'][t]:.0f}%" for t in EVAL_TASKS
    )
    return f"{acc}  KL {r['init']['reverse_kl']:.2f}->{r['final']['reverse_kl']:.2f}  " + (
        f"{'COLLAPSED  ' if r['collapsed'] else ''}{r['wall_time_s']:.0f}s"
    )


def main(args) -> int:
    from trainer.toy import world
    from tropd.errors import UserError
    from tropd.paths import directory_path

    directory_path(args.out, "--out")
    if args.methods:
        unknown = [m for m in args.methods if m not in ARMS]
        if unknown:
            raise UserError(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    if args.toy:
        toy_dir = args.toy
        if not (Path(toy_dir) / "build.json").is_file():
            raise UserError(f"--toy {toy_dir!r}: no toy world there (no build.json); build it with `tropd toy build`")
        record = world.read_record(Path(toy_dir))
        if not isinstance(record, dict) or not isinstance(record.get("settings"), dict):
            raise UserError(f"--toy {toy_dir!r}: its build.json is damaged; rebuild it with `tropd toy build`")
    else:
        toy_dir = "artifacts/toy-quick" if args.quick else "artifacts/toy"
        world.build(toy_dir, quick=args.quick, log=_stderr)
    report = run_bench(toy_dir, args.out, args.engine, args.quick, args.steps, args.seeds, args.methods,
                       not args.no_sweep, jobs=args.jobs, resume=args.resume, tune=args.tune,
                       log=_stderr)  # fmt: skip
    if args.json:
        tables = {"table": report["table"], "sweep_table": report["sweep_table"]}
        print(json.dumps({**tables, **({"tuning_table": report["tuning_table"]} if "tuning_table" in report else {})}))
    else:
        print(report_path(args.out).read_text())
    return 0


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
