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
`<out>.md` (docs/results.md), its images linked from the folder. Every finished run is
kept at once in `results.partial.json`, under a key made of the settings that decide its outcome (method,
seed, student, budget, toy world; not the code nor the trainer's defaults: after a change to either, run
again without `--resume`); `--resume` reuses the runs whose key matches, so a long benchmark can stop and go
on, and a run that two parts of the report share (the sweep's own student) is trained once. Runs of earlier reports that
the present one does not include are carried along (`other_runs`), so a report of a few methods does not
lose the others. `--jobs N` trains N runs at a time in separate processes, each with an equal share of the
cores.
"""

from __future__ import annotations

import collections
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

from tropd.machine import usable_cores

ARMS: dict[str, list[str]] = {
    "opd": ["loss.method=opd"],
    "tropd": [],
    "tropd-no-guidance": ["guidance.enabled=false"],
    "tropd-outlier-mask": ["loss.outlier=mask"],
    "tropd-outlier-clip": ["loss.outlier=clip"],
    "tropd-rule-threshold": ["loss.rule=threshold"],
    "tropd-rule-adaptive": ["loss.rule=adaptive"],
    "eopd": ["loss.method=eopd"],
    "reopold": ["loss.method=reopold"],
    "gkd": ["loss.method=gkd"],
    "sft": ["loss.method=sft"],
}
SWEEP_ARMS = ("opd", "tropd")
# Students for the mismatch sweep: the toy student, then that student after N steps of SFT on teacher-style
# answers (nearer the teacher).
SWEEP_SFT_STEPS = {"full": (0, 100), "quick": (0, 10)}
EVAL_TASKS = ("math", "code")


def settings(quick: bool, steps: int | None, seeds: int | None) -> dict:
    if quick:
        steps = steps or 6
        return {"steps": steps, "seeds": seeds or 1, "eval_every": max(1, steps // 2), "eval_n": 20, "kl_prompts": 16,
                "prompts_per_step": 8, "samples_per_prompt": 1, "max_new_tokens": 32}  # fmt: skip
    steps = steps or 600
    return {"steps": steps, "seeds": seeds or 3, "eval_every": max(1, steps // 4), "eval_n": 200, "kl_prompts": 64,
            "prompts_per_step": 64, "samples_per_prompt": 1, "max_new_tokens": 40}  # fmt: skip


def overrides(s: dict, student: Path, teacher: Path, engine: str, out: Path, seed: int) -> list[str]:
    return [
        f"student={student}", f"out={out}", f"seed={seed}", f"steps={s['steps']}", "teacher.api=inprocess",
        f"teacher.model={teacher}", f"teacher.engine={engine}", f"eval.every={s['eval_every']}",
        f"eval.n={s['eval_n']}", f"eval.kl_prompts={s['kl_prompts']}", f"eval.tasks=[{','.join(EVAL_TASKS)}]",
        f"rollout.prompts_per_step={s['prompts_per_step']}", f"rollout.samples_per_prompt={s['samples_per_prompt']}",
        f"rollout.max_new_tokens={s['max_new_tokens']}", "tensorboard=false", "plot=false", "checkpoint_every=0",
        "keep_checkpoints=1",
    ]  # fmt: skip


def run_key(arm: str, base: list[str], toy_build: dict | None) -> str:
    """What decides a run's outcome: its method, its overrides (all but the output directory) and the toy."""
    what = {"arm": arm, "extra": ARMS[arm], "overrides": [o for o in base if not o.startswith("out=")],
            "toy": toy_build}  # fmt: skip
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def _work(job: tuple[str, str, list[str], int]) -> tuple[str, dict]:
    """One run in a worker process (`--jobs`), with its share of the cores."""
    key, arm, base, threads = job
    return key, run_one(arm, [*ARMS[arm], f"threads={threads}"], base)


def run_one(arm: str, extra: list[str], base: list[str]) -> dict:
    """Train one arm; returns its curves and the numbers of the report."""
    import torch

    from trainer.config import load_config
    from trainer.train import train

    config = load_config(None, [*base, *extra])
    shutil.rmtree(config.out, ignore_errors=True)  # a run trained again starts afresh (the bench owns runs/)
    t0 = time.monotonic()
    summary = train(config, log=lambda *_: None)
    wall = time.monotonic() - t0
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
    }


def _mean_acc(evaluation: dict) -> float:
    return statistics.mean(evaluation["accuracy"][t] for t in EVAL_TASKS)


def sweep_students(toy_dir: Path, build: dict | None, work: Path, sft_steps: tuple[int, ...], seed: int,
                   log) -> list[Path]:  # fmt: skip
    """The toy student, and copies of it moved nearer the teacher by short SFT on teacher-style answers."""
    from trainer import toy

    out = []
    for n in sft_steps:
        if n == 0:
            out.append(toy_dir / "student")
            continue
        path = work / f"student-sft{n}"
        # kept only when made the same way from the same toy world
        spec = toy.SftSpec("teacher", n, 64, 3e-3, warmup=min(10, n))
        made = {"toy": build, "seed": seed, "sft": asdict(spec)}
        stamp = path / "tropd-sweep-student.json"
        if not (path / "config.json").is_file() or not stamp.is_file() or json.loads(stamp.read_text()) != made:
            log(f"[bench] warm-starting a nearer student: {n} SFT steps on teacher-style answers")
            model = toy.load_model(toy_dir / "student")
            toy.sft(model, spec, seed, f"sweep{n}", log=log)
            toy.save_model(model, path)
            stamp.write_text(json.dumps(made))
        out.append(path)
    return out


def _toy_models(build: dict | None) -> str:
    """The toy models a report was made with, e.g. ` (teacher 128x4, student 96x3, student drills 0.8)`."""
    if not isinstance(build, dict) or not all(isinstance(build.get(r), dict) for r in ("teacher", "student")):
        return ""
    shapes = [f"{role} {build[role].get('hidden')}x{build[role].get('layers')}" for role in ("teacher", "student")]
    drills = ((build.get("recipe") or {}).get("student") or {}).get("drills", 0.0)
    return f" ({', '.join(shapes)}, student drills {drills})"


def run_bench(toy_dir: str, out: str, engine: str, quick: bool, steps: int | None, seeds: int | None,
              arms: list[str] | None, sweep: bool, jobs: int = 1, resume: bool = False, log=print) -> dict:  # fmt: skip
    from trainer import toy

    toy_dir, out = Path(toy_dir), Path(out)
    s = settings(quick, steps, seeds)
    chosen = arms or list(ARMS)
    work = out / "runs"
    work.mkdir(parents=True, exist_ok=True)
    teacher = toy_dir / "teacher"
    build = json.loads((toy_dir / "build.json").read_text()).get("settings")
    report: dict = {
        "command": "tropd bench methods " + " ".join(sys.argv[3:]) if sys.argv[1:3] == ["bench", "methods"] else "",
        "settings": {**s, "toy": str(toy_dir), "engine": engine, "quick": quick, "jobs": jobs},
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": usable_cores()},
        "toy_build": build,
        "runs": [],
        "sweep": [],
    }
    # every run of the report: (section, arm, seed, student); then train those not already done
    plan = [("runs", arm, seed, toy_dir / "student") for arm in chosen for seed in range(s["seeds"])]
    if sweep:
        students = sweep_students(toy_dir, build, work, SWEEP_SFT_STEPS["quick" if quick else "full"], 0, log)
        plan += [("sweep", arm, seed, st) for st in students for arm in SWEEP_ARMS for seed in range(s["seeds"])]
    earlier = _earlier_runs(out, log)
    done = dict(earlier) if resume else {}
    todo: dict[str, tuple[str, int, list[str]]] = {}
    keys = []
    for section, arm, seed, student in plan:
        name = f"{arm}-s{seed}" if section == "runs" else f"sweep-{student.name}-{arm}-s{seed}"
        base = overrides(s, student, teacher, engine, work / name, seed)
        key = run_key(arm, base, build)
        keys.append(key)
        if key not in done and key not in todo:
            todo[key] = (arm, seed, base)
    log(f"[bench] {len(plan)} runs in the report, {len(set(keys))} distinct, {len(todo)} to train"
        + (f", {jobs} at a time" if jobs > 1 else ""))  # fmt: skip

    def finished(key: str, result: dict) -> None:
        done[key] = {**result, "key": key}
        _fill(report, plan, keys, done, earlier)
        _save_partial(report, out)
        log(f"[bench] ({len(done.keys() & set(keys))}/{len(set(keys))}) {result['arm']}, seed {result['seed']}: "
            f"{_line(result)}")  # fmt: skip

    t0 = time.monotonic()
    if jobs == 1:
        for key, (arm, seed, base) in todo.items():
            log(f"[bench] training {arm}, seed {seed}")
            finished(key, run_one(arm, ARMS[arm], base))
    elif todo:
        _run_parallel(todo, jobs, finished, log)
    _fill(report, plan, keys, done, earlier)
    report["wall_time_s"] = round(time.monotonic() - t0, 1)
    report["trained_now"] = len(todo)
    report["train_time_s"] = round(sum(done[k]["wall_time_s"] for k in set(keys)), 1)
    report["table"] = table(report["runs"])
    report["sweep_table"] = sweep_table(report["sweep"])
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "results.partial.json").unlink(missing_ok=True)
    plots(report, out)
    report_path(out).write_text(markdown(report, images=out.resolve().name))
    toy.quiet_transformers()
    return report


def _fill(report: dict, plan: list, keys: list[str], done: dict, earlier: dict) -> None:
    """The report's sections, in plan order, from the finished runs; and the earlier reports' other runs."""
    report["runs"], report["sweep"] = [], []
    for (section, _arm, _seed, student), key in zip(plan, keys, strict=True):
        if key in done:
            run = {k: v for k, v in done[key].items() if k != "student"}
            report[section].append(run if section == "runs" else {**run, "student": student.name})
    mine = set(keys)
    report["other_runs"] = [r for k, r in earlier.items() if k not in mine]


def _earlier_runs(out: Path, log) -> dict:
    """Finished runs of an earlier, stopped or finished, report in `out`, by key."""
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
        for r in [*earlier.get("runs", []), *earlier.get("sweep", []), *earlier.get("other_runs", [])]:
            if isinstance(r, dict) and isinstance(r.get("key"), str):
                done[r["key"]] = r  # a sweep run keeps its student's name: a run carried along says whose it is
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


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def table(runs: list[dict]) -> list[dict]:
    """One row per arm: means and standard deviations over seeds."""
    rows = []
    for arm in dict.fromkeys(r["arm"] for r in runs):
        mine = [r for r in runs if r["arm"] == arm]
        row = {"arm": arm, "seeds": len(mine)}
        for t in EVAL_TASKS:
            row[f"init_{t}"] = _stats([r["init"]["accuracy"][t] for r in mine])
            row[f"final_{t}"] = _stats([r["final"]["accuracy"][t] for r in mine])
            row[f"best_{t}"] = _stats([r["best_accuracy"][t] for r in mine])
        row["init_kl"] = _stats([r["init"]["reverse_kl"] for r in mine])
        row["final_kl"] = _stats([r["final"]["reverse_kl"] for r in mine])
        row["collapsed"] = sum(r["collapsed"] for r in mine)
        row["grad_spikes"] = sum(r["grad_spikes"] for r in mine)
        row["response_tokens"] = statistics.mean(r["response_tokens"] for r in mine)
        row["wall_time_s"] = statistics.mean(r["wall_time_s"] for r in mine)
        rows.append(row)
    return rows


def sweep_table(runs: list[dict]) -> list[dict]:
    rows = []
    for student in dict.fromkeys(r["student"] for r in runs):
        for arm in SWEEP_ARMS:
            mine = [r for r in runs if r["student"] == student and r["arm"] == arm]
            if not mine:
                continue
            rows.append(
                {
                    "student": student,
                    "arm": arm,
                    "init_kl": _stats([r["init"]["reverse_kl"] for r in mine]),
                    "final_kl": _stats([r["final"]["reverse_kl"] for r in mine]),
                    **{
                        f"gain_{t}": _stats([r["final"]["accuracy"][t] - r["init"]["accuracy"][t] for r in mine])
                        for t in EVAL_TASKS
                    },  # fmt: skip
                    "collapsed": sum(r["collapsed"] for r in mine),
                    "seeds": len(mine),
                }
            )
    return rows


def _pm(stat: dict, scale: float = 100.0, digits: int = 1) -> str:
    return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['sd']:.{digits}f}"


def report_path(out: str | Path) -> Path:
    """The markdown report of an `--out` folder: `<out>.md` beside it (docs/results -> docs/results.md)."""
    out = Path(out).resolve()
    return out.parent / f"{out.name}.md"


def markdown(report: dict, images: str) -> str:
    s = report["settings"]
    lines = [
        "# Results: TrOPD and the baselines on the toy world",
        "",
        "Written by `tropd bench methods`; every number below comes from that command's runs "
        f"(`{images}/results.json` holds them all, per seed).",
        "",
        f"- Command: `{report['command'] or 'tropd bench methods'}`",
        f"- Machine: {report['machine']['platform']}, {report['machine']['cpus']} CPU cores, Python "
        f"{report['machine']['python']}; {_times(report)}",
        f"- Toy world: `{s['toy']}`{_toy_models(report.get('toy_build'))}; teacher engine `{s['engine']}` in the "
        "trainer's process",
        f"- Budget per run: {s['steps']} steps x {s['prompts_per_step']} prompts x {s['samples_per_prompt']} "
        f"sample(s), up to {s['max_new_tokens']} tokens each; seeds 0..{s['seeds'] - 1}; eval every "
        f"{s['eval_every']} steps on {s['eval_n']} held-out prompts per task (greedy), reverse KL on "
        f"{s['kl_prompts']} held-out prompts",
        "- Collapse (defined before the runs): non-finite loss or gradient on more than 10% of steps, or mean "
        "accuracy over math and code more than 5 points below the init at each of the last two evals",
        "- Grad-norm spike: a step whose gradient norm is above 10 x the run's median",
        "",
        "## Methods (mean ± sd over seeds; accuracy in %)",
        "",
        "| method | math init | math final | math best | code init | code final | code best | reverse KL init "
        "-> final | collapsed | grad spikes | tokens/run | wall s/run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["table"]:
        lines.append(
            f"| {r['arm']} | {_pm(r['init_math'])} | {_pm(r['final_math'])} | {_pm(r['best_math'])} | "
            f"{_pm(r['init_code'])} | {_pm(r['final_code'])} | {_pm(r['best_code'])} | "
            f"{_pm(r['init_kl'], 1, 2)} -> {_pm(r['final_kl'], 1, 2)} | {r['collapsed']}/{r['seeds']} | "
            f"{r['grad_spikes']} | {r['response_tokens']:.0f} | {r['wall_time_s']:.0f} |"
        )
    lines += ["", f"![accuracy curves]({images}/accuracy.png)", "", f"![reverse KL curves]({images}/reverse_kl.png)",
              ""]  # fmt: skip
    lines += verdict(report["table"])
    if report["sweep_table"]:
        lines += [
            "",
            "## Mismatch sweep (opd vs tropd from students at several distances from the teacher)",
            "",
            "| student | method | reverse KL at init | final reverse KL | math gain (points) | code gain (points) "
            "| collapsed |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in report["sweep_table"]:
            lines.append(
                f"| {r['student']} | {r['arm']} | {_pm(r['init_kl'], 1, 2)} | {_pm(r['final_kl'], 1, 2)} | "
                f"{_pm(r['gain_math'])} | {_pm(r['gain_code'])} | {r['collapsed']}/{r['seeds']} |"
            )
        lines += ["", f"![mismatch sweep]({images}/sweep.png)", ""]
    return "\n".join(lines) + "\n"


def _times(report: dict) -> str:
    """How the cores were shared, from what each run recorded, and the time the report took."""
    runs = list({r.get("key", id(r)): r for r in [*report["runs"], *report["sweep"]]}.values())
    counts = collections.Counter(r.get("threads") for r in runs)
    known = ", ".join(f"{n} ({c} run{'s' * (c > 1)})" for n, c in sorted((n, c) for n, c in counts.items() if n))
    unknown = counts.get(None, 0)
    threads = "torch threads per run: " + ", ".join(
        ([known] if known else []) + ([f"not recorded ({unknown} runs)"] if unknown else [])
    )
    jobs, now = report["settings"].get("jobs", 1), report.get("trained_now", len(runs))
    train = report.get("train_time_s", report["wall_time_s"]) / 60
    return f"{threads}; training time summed over the runs {train:.0f} min; the last invocation trained {now} " + (
        f"of them ({jobs} at a time; the rest reused from earlier reports) in {report['wall_time_s'] / 60:.1f} min"
    )


def verdict(rows: list[dict]) -> list[str]:
    """Plain statements computed from the table: where TrOPD wins, ties or loses, and what its parts do."""
    by = {r["arm"]: r for r in rows}
    if "tropd" not in by:
        return []
    me = by["tropd"]
    out = ["## What the numbers say (computed from the table)", ""]

    def compare(other: dict, task: str) -> str:
        a, b = me[f"final_{task}"], other[f"final_{task}"]
        gap, noise = a["mean"] - b["mean"], max(a["sd"], b["sd"], 0.01)
        word = "wins" if gap > noise else "loses" if gap < -noise else "ties"
        return f"{word} ({100 * gap:+.1f} points, sd up to {100 * noise:.1f})"

    for arm, r in by.items():
        if arm == "tropd":
            continue
        role = "ablation" if arm.startswith("tropd-") else "baseline"
        out.append(
            f"- tropd vs {arm} ({role}): math {compare(r, 'math')}; code {compare(r, 'code')}; "
            f"collapsed runs {me['collapsed']}/{me['seeds']} vs {r['collapsed']}/{r['seeds']}"
        )
    out.append("")
    out.append(
        "A 'win' or 'loss' here means the difference of the means exceeds the larger standard deviation over seeds; "
        "otherwise it is a tie. For an ablation, a tropd win means the part it removes or replaces helps."
    )
    return out


def plots(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    palette = plt.get_cmap("tab20")  # eleven arms: the ten strong colours first, then the light ones
    for key, name, ylabel in (("accuracy", "accuracy.png", "greedy accuracy"), ("reverse_kl", "reverse_kl.png", "")):
        tasks = EVAL_TASKS if key == "accuracy" else ("",)
        fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), squeeze=False)
        for ax, task in zip(axes[0], tasks, strict=True):
            for color, arm in enumerate(arms):
                curves = [r["curve"] for r in runs if r["arm"] == arm]
                steps = [p["step"] for p in curves[0]]
                values = [
                    statistics.mean((c[i]["accuracy"][task] if task else c[i]["reverse_kl"]) for c in curves)
                    for i in range(len(steps))
                ]
                ax.plot(steps, values, marker="o", ms=3, label=arm, lw=2.2 if arm in ("tropd", "opd") else 1.0,
                        color=palette((2 * color) % 20 + (2 * color) // 20 % 2))  # fmt: skip
            ax.set_title(f"{task} accuracy" if task else "reverse KL to the teacher (student samples)")
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel or "nats per token")
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=7, loc="best")
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
    if report["sweep_table"]:
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for arm in SWEEP_ARMS:
            rows = [r for r in report["sweep_table"] if r["arm"] == arm]
            xs = [r["init_kl"]["mean"] for r in rows]
            ys = [100 * r["gain_math"]["mean"] for r in rows]
            ax.errorbar(xs, ys, yerr=[100 * r["gain_math"]["sd"] for r in rows], marker="o", capsize=3, label=arm)
        ax.set_xlabel("reverse KL to the teacher at init (nats per token)")
        ax.set_ylabel("math accuracy gain (points)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "sweep.png", dpi=110)
        plt.close(fig)


def main(args) -> int:
    from trainer import toy
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
        record = toy.read_record(Path(toy_dir))
        if not isinstance(record, dict) or not isinstance(record.get("settings"), dict):
            raise UserError(f"--toy {toy_dir!r}: its build.json is damaged; rebuild it with `tropd toy build`")
    else:
        toy_dir = "artifacts/toy-quick" if args.quick else "artifacts/toy"
        toy.build(toy_dir, quick=args.quick, log=_stderr)
    report = run_bench(toy_dir, args.out, args.engine, args.quick, args.steps, args.seeds, args.methods,
                       not args.no_sweep, jobs=args.jobs, resume=args.resume, log=_stderr)  # fmt: skip
    if args.json:
        print(json.dumps({"table": report["table"], "sweep_table": report["sweep_table"]}))
    else:
        print(report_path(args.out).read_text())
    return 0


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
