"""The methods benchmark's plots: accuracy and reverse KL per method over steps, and the mismatch sweep."""

from __future__ import annotations

import statistics
from pathlib import Path

from trainer.bench.report import EVAL_TASKS, SWEEP_ARMS


def plot_methods(report: dict, out: Path) -> None:
    """accuracy.png and reverse_kl.png (mean curve per method over seeds) and sweep.png of a methods report."""
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
