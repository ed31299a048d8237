"""The report of `tropd bench methods`: tables and verdict prose computed from the runs, and the markdown page.

Every sentence of the verdict is chosen by a comparison of numbers in the tables; nothing is written by hand.
"""

from __future__ import annotations

import collections
import statistics
from pathlib import Path

EVAL_TASKS = ("math", "code")
SWEEP_ARMS = ("opd", "tropd")


def _toy_models(build: dict | None) -> str:
    """The toy models a report was made with, e.g. ` (teacher 128x4, student 96x3, student drills 0.8)`."""
    if not isinstance(build, dict) or not all(isinstance(build.get(r), dict) for r in ("teacher", "student")):
        return ""
    shapes = [f"{role} {build[role].get('hidden')}x{build[role].get('layers')}" for role in ("teacher", "student")]
    drills = ((build.get("recipe") or {}).get("student") or {}).get("drills", 0.0)
    return f" ({', '.join(shapes)}, student drills {drills})"


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def table(runs: list[dict]) -> list[dict]:
    """One row per arm: means and standard deviations over seeds."""
    rows = []
    for arm in dict.fromkeys(r["arm"] for r in runs):
        mine = [r for r in runs if r["arm"] == arm]
        row = {"arm": arm, "seeds": len(mine), "lr": mine[0].get("lr")}
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
        *tuning_markdown(report.get("tuning_table") or []),
        "## Methods (mean ± sd over seeds; accuracy in %)",
        "",
        "| method | lr | math init | math final | math best | code init | code final | code best | reverse KL init "
        "-> final | collapsed | grad spikes | tokens/run | wall s/run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["table"]:
        lines.append(
            f"| {r['arm']} | {_lr(r.get('lr'))} | {_pm(r['init_math'])} | {_pm(r['final_math'])} | "
            f"{_pm(r['best_math'])} | "
            f"{_pm(r['init_code'])} | {_pm(r['final_code'])} | {_pm(r['best_code'])} | "
            f"{_pm(r['init_kl'], 1, 2)} -> {_pm(r['final_kl'], 1, 2)} | {r['collapsed']}/{r['seeds']} | "
            f"{r['grad_spikes']} | {r['response_tokens']:.0f} | {r['wall_time_s']:.0f} |"
        )
    lines += ["", f"![accuracy curves]({images}/accuracy.png)", "", f"![reverse KL curves]({images}/reverse_kl.png)",
              ""]  # fmt: skip
    lines += verdict(report["table"], report.get("tuning_table") or [], s.get("lr"))
    lines += ["", *probe_markdown(report["runs"], report["table"])]
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
    every = [*report.get("tuning", []), *report["runs"], *report["sweep"]]
    runs = list({r.get("key", id(r)): r for r in every}.values())
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


def verdict(rows: list[dict], tuning: list[dict] | None = None, default_lr: float | None = None) -> list[str]:
    """Plain statements computed from the table: where TrOPD wins, ties or loses, what its parts do, and (with
    tuning) whether OPD still collapses at its own best learning rate."""
    by = {r["arm"]: r for r in rows}
    if "tropd" not in by:
        return []
    me = by["tropd"]
    out = ["## What the numbers say (computed from the table)", ""]
    if tuning:
        rates = ", ".join(f"{t['arm']} {_lr(t['best_lr'])}" for t in tuning if t["arm"] in by)
        out += [f"Every method is compared at its own best learning rate (tuned on seed 0): {rates}.", ""]
    elif default_lr is not None:
        out += [
            f"Every method ran at the default learning rate {_lr(default_lr)}, not tuned (`--tune` tunes each).",
            "",
        ]

    def word(other: dict, task: str) -> str:
        gap, noise = _gap(me, other, task)
        return "wins" if gap > noise else "loses" if gap < -noise else "ties"

    def compare(other: dict, task: str) -> str:
        gap, noise = _gap(me, other, task)
        return f"{word(other, task)} ({100 * gap:+.1f} points, sd up to {100 * noise:.1f})"

    for arm, r in by.items():
        if arm == "tropd":
            continue
        role = "ablation" if arm.startswith("tropd-") else "baseline"
        out.append(
            f"- tropd vs {arm} ({role}): math {compare(r, 'math')}; code {compare(r, 'code')}; "
            f"collapsed runs {me['collapsed']}/{me['seeds']} vs {r['collapsed']}/{r['seeds']}"
        )
    out.append("")
    if tuning and "opd" in by:
        opd = by["opd"]
        at = f"its best rate, {_lr(opd.get('lr'))}"
        if opd["collapsed"]:
            out.append(f"OPD still collapses at {at}: {opd['collapsed']}/{opd['seeds']} runs collapsed.")
        else:
            words = {t: word(opd, t) for t in EVAL_TASKS}
            wins = [t for t in EVAL_TASKS if words[t] == "wins"]
            rest = " and ".join(f"{words[t].removesuffix('s')} on {t}" for t in EVAL_TASKS if words[t] != "wins")
            where = (
                f"TrOPD still wins on {' and '.join(wins)}" + (f" (it does {rest})" if rest else "")
                if wins
                else (f"TrOPD wins on neither math nor code there (it does {rest})")
            )
            out.append(f"OPD does not collapse at {at} (0/{opd['seeds']} runs collapsed); {where}.")
        out.append("")
    edge = [t["arm"] for t in tuning or [] if t["best_lr"] in (min(t["lrs"]), max(t["lrs"]))]
    if edge:
        out += [f"The best rate is at the edge of the grid for {', '.join(edge)}: a wider grid might do better.", ""]
    out.append(
        "A 'win' or 'loss' here means the difference of the means exceeds the larger standard deviation over seeds; "
        "otherwise it is a tie. For an ablation, a tropd win means the part it removes or replaces helps."
    )
    return out


def _gap(me: dict, other: dict, task: str) -> tuple[float, float]:
    a, b = me[f"final_{task}"], other[f"final_{task}"]
    return a["mean"] - b["mean"], max(a["sd"], b["sd"], 0.01)


def _lr(lr: float | None) -> str:
    return "default" if lr is None else f"{lr:g}"


def tuning_table(runs: list[dict], lrs: list[float]) -> list[dict]:
    """One row per arm: the seed-0 run at each learning rate and the best rate, the highest final math + code
    accuracy (ties: the first of `lrs`, which starts with the default)."""
    rows = []
    for arm in dict.fromkeys(r["arm"] for r in runs):
        by_lr = {r["lr"]: r for r in runs if r["arm"] == arm}
        tried = [lr for lr in lrs if lr in by_lr]
        best = max(tried, key=lambda lr: score(by_lr[lr]))
        cells = {f"{lr:g}": {**{t: by_lr[lr]["final"]["accuracy"][t] for t in EVAL_TASKS},
                             "collapsed": by_lr[lr]["collapsed"]} for lr in tried}  # fmt: skip
        rows.append({"arm": arm, "lrs": tried, "best_lr": best, "runs": cells})
    return rows


def score(run: dict) -> float:
    """What tuning maximises: final math + code accuracy."""
    return sum(run["final"]["accuracy"][t] for t in EVAL_TASKS)


def tuning_markdown(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lrs = sorted({lr for r in rows for lr in r["lrs"]})
    lines = [
        "## Learning-rate tuning (seed 0; final math / code accuracy in %, C = collapsed)",
        "",
        "Each method ran at the default learning rate and at 3x up and down; the best (highest final math + code) "
        "is the rate of the methods table below.",
        "",
        "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best lr |",
        "|---|" + "---|" * (len(lrs) + 1),
    ]
    for r in rows:
        cells = []
        for lr in lrs:
            c = r["runs"].get(f"{lr:g}")
            text = (
                "-"
                if c is None
                else f"{100 * c['math']:.1f} / {100 * c['code']:.1f}" + (" C" if c["collapsed"] else "")
            )
            cells.append(f"**{text}**" if lr == r["best_lr"] else text)
        lines.append(f"| {r['arm']} | " + " | ".join(cells) + f" | {r['best_lr']:g} |")
    return [*lines, ""]


def agreement_table(runs: list[dict]) -> list[dict]:
    """One row per arm with a probe: its students' wrong greedy answers and the teacher's agreement with them,
    summed over seeds, per task (trainer/bench/probe.py defines the measure)."""
    rows = []
    for arm in dict.fromkeys(r["arm"] for r in runs if r.get("probe")):
        probes = [r["probe"]["agreement"] for r in runs if r["arm"] == arm and r.get("probe")]
        row: dict = {"arm": arm, "seeds": len(probes)}
        for t in EVAL_TASKS:
            cells = [p[t] for p in probes if t in p]
            gaps = [c["median_gap"] for c in cells if c.get("median_gap") is not None]
            row[t] = {
                **{k: sum(c[k] for c in cells) for k in ("n", "wrong", "with_answer", "teacher_prefers_wrong")},
                "median_gap": statistics.median(gaps) if gaps else None,
            }
        rows.append(row)
    return rows


def _share(cell: dict) -> str:
    if not cell["with_answer"]:
        return "-"
    k, n = cell["teacher_prefers_wrong"], cell["with_answer"]
    return f"{k}/{n} ({100 * k / n:.0f}%)"


def _answer(text: str, correct: bool | None = None) -> str:
    mark = "" if correct is None else (" ✓" if correct else " ✗")
    return f"`{text}`{mark}" if text else f"(empty){mark}"


def probe_markdown(runs: list[dict], rows: list[dict]) -> list[str]:
    """The section on what the final students write: greedy answers beside the teacher's (seed 0 of each method,
    the same prompts for all), the teacher's agreement with wrong answers, and what the numbers say."""
    agree = agreement_table(runs)
    first = {}
    for r in runs:
        if r.get("probe") and r["arm"] not in first:
            first[r["arm"]] = r["probe"]["examples"]
    if not agree or not first:
        return []
    lines = [
        "## What the final students write, and whether the teacher backs their errors",
        "",
        "Greedy answers of each method's final student (its first seed) to the first held-out prompts of each task, "
        "beside the teacher's and the right final answer (✓ right, ✗ wrong).",
        "",
    ]
    for t in EVAL_TASKS:
        shown = [e for e in next(iter(first.values())) if e["task"] == t]
        if not shown:
            continue
        lines += [f"| {t} | " + " | ".join(f"`{e['prompt']}`" for e in shown) + " |",
                  "|---|" + "---|" * len(shown),
                  "| right answer | " + " | ".join(_answer(e["right"]) for e in shown) + " |",
                  "| teacher | " + " | ".join(_answer(e["teacher"]) for e in shown) + " |"]  # fmt: skip
        for arm, examples in first.items():
            mine = {e["prompt"]: e for e in examples if e["task"] == t}
            cells = [_answer(mine[e["prompt"]]["student"], mine[e["prompt"]]["correct"]) if e["prompt"] in mine
                     else "-" for e in shown]  # fmt: skip
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "Teacher agreement with wrong answers: over each method's wrong greedy answers on the held-out prompts "
        "(all seeds) that end in a final answer, a response `c#a` (scratchpad c, final answer a) against the right "
        "final answer a*, the share where the teacher prefers the wrong answer at the student's own place, "
        "`log p_T(a <eos> | x, c#) > log p_T(a* <eos> | x, c#)`, and the median of that difference (nats; "
        "above 0: the teacher backs the error).",
        "",
        "| method | "
        + " | ".join(f"{t} wrong | {t}: teacher prefers the wrong answer | {t} median gap" for t in EVAL_TASKS)
        + " |",  # fmt: skip
        "|---|" + "---|---|---|" * len(EVAL_TASKS),
    ]
    for a in agree:
        cells = [f"{a[t]['wrong']}/{a[t]['n']} | {_share(a[t])} | " + ("-" if a[t]["median_gap"] is None else
                 f"{a[t]['median_gap']:+.2f}") for t in EVAL_TASKS]  # fmt: skip
        lines.append(f"| {a['arm']} | " + " | ".join(cells) + " |")
    return [*lines, "", *why_opd_fails(agree, rows)]


def why_opd_fails(agree: list[dict], rows: list[dict]) -> list[str]:
    """Sentences chosen by the numbers: does the teacher back OPD's errors more often than TrOPD's, with OPD's
    reverse KL low."""
    by, kl = {a["arm"]: a for a in agree}, {r["arm"]: r["final_kl"]["mean"] for r in rows}
    if "opd" not in by or "tropd" not in by:
        return []

    def pooled(a: dict) -> tuple[int, int]:
        return sum(a[t]["teacher_prefers_wrong"] for t in EVAL_TASKS), sum(a[t]["with_answer"] for t in EVAL_TASKS)

    (k_o, n_o), (k_t, n_t) = pooled(by["opd"]), pooled(by["tropd"])
    if not n_o:
        return ["OPD's students gave no wrong answer with a final answer: the measure has nothing to say here.", ""]
    share_o = k_o / n_o
    than = f"{100 * k_t / n_t:.0f}% ({k_t}/{n_t}) of TrOPD's" if n_t else "TrOPD's students, which had none"
    more = "more often than" if not n_t or share_o > k_t / n_t else "no more often than"
    kl_text = ""
    if {"opd", "tropd"} <= kl.keys():
        kl_text = f" (final reverse KL: opd {kl['opd']:.2f}, tropd {kl['tropd']:.2f} nats/token)"
    wrong = {arm: sum(by[arm][t]["wrong"] for t in EVAL_TASKS) for arm in ("opd", "tropd")}
    asked = {arm: sum(by[arm][t]["n"] for t in EVAL_TASKS) for arm in ("opd", "tropd")}
    fewer = "fewer" if wrong["tropd"] / asked["tropd"] < wrong["opd"] / asked["opd"] else "no fewer"
    errors = f"{wrong['tropd']}/{asked['tropd']} wrong answers against OPD's {wrong['opd']}/{asked['opd']}"
    return [
        f"The teacher prefers the student's wrong final answer in {100 * share_o:.0f}% ({k_o}/{n_o}) of OPD's wrong "
        f"answers, {more} in {than}{kl_text}; TrOPD's students made {fewer} errors ({errors}). "
        "How OPD fails, when it does: its student writes the teacher's scratchpad but miscopies a number (an "
        "operand, a partial result), and on that prefix, which it never saw in training, the teacher confidently "
        "continues the wrong chain; reverse KL on the student's own samples then rewards the wrong answer, and can "
        "fall near 0 while accuracy falls. A teacher that backs the error cannot correct it after the fact: what can "
        "is keeping the student from drifting there. That is what TrOPD's trust region is meant to do: tokens where "
        "the student and the teacher disagree strongly get a bounded signal instead of the full log-ratio, and "
        "teacher-written prefixes keep the student on paths the teacher knows.",
        "",
    ]
