"""PNGs: a run's curves (loss terms, reverse KL, trust share, eval accuracy) from its metrics.jsonl, and the plots of
a `tropd bench methods` report."""

from __future__ import annotations

import json
import statistics
from pathlib import Path


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "loss" in r]
    evals = [(r["step"], r["eval"]) for r in records if "eval" in r]
    before = (
        json.loads((run_dir / "eval_before.json").read_text()) if (run_dir / "eval_before.json").is_file() else None
    )
    if before is not None:
        evals = [(0, before), *evals]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    x = [r["step"] for r in steps]
    axes[0].plot(x, [r["loss"] for r in steps], label="loss")
    for key in ("opd_term", "outlier_term", "prefix_term"):
        if steps and key in steps[0]:
            axes[0].plot(x, [r[key] for r in steps], label=key, alpha=0.7)
    axes[0].set_title("loss")
    axes[0].legend()
    if steps and "k1" in steps[0]:
        axes[1].plot(x, [r["k1"] for r in steps], label="K1 (train samples)")
    if evals:
        axes[1].plot([s for s, _ in evals], [e["reverse_kl"] for _, e in evals], "o-", label="reverse KL (held out)")
    if steps and "trust_share" in steps[0]:
        axes[1].plot(x, [r["trust_share"] for r in steps], label="trust share")
    axes[1].set_title("mismatch to the teacher (nats/token)")
    axes[1].legend()
    for task in evals[0][1]["accuracy"] if evals else []:
        axes[2].plot([s for s, _ in evals], [100 * e["accuracy"][task] for _, e in evals], "o-", label=task)
    axes[2].set_title("greedy accuracy (%)")
    axes[2].set_ylim(0, 100)
    axes[2].legend()
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    out = out or run_dir / "curves.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def plot_methods(report: dict, out: Path) -> None:
    """accuracy.png and reverse_kl.png (mean curve per method over seeds) and sweep.png of a methods report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trainer.methods_report import EVAL_TASKS, SWEEP_ARMS

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
