"""A run's PNG: its curves (loss terms, reverse KL, trust share, eval accuracy) from its metrics.jsonl."""

from __future__ import annotations

import json
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
    # named teachers: each one's K1 on its rows and reverse KL on its held-out prompts
    for name in steps[0].get("by_teacher", {}) if steps else ():
        mine = [(r["step"], r.get("by_teacher", {}).get(name, {})) for r in steps]
        shown = [(step, entry["k1"]) for step, entry in mine if "k1" in entry]
        if shown:
            axes[1].plot(*zip(*shown, strict=True), label=f"K1, teacher {name}", alpha=0.6)
    for name in evals[-1][1].get("reverse_kl_by_teacher", {}) if evals else ():
        shown = [(s, e["reverse_kl_by_teacher"][name]) for s, e in evals if name in e.get("reverse_kl_by_teacher", {})]
        axes[1].plot(*zip(*shown, strict=True), "s--", label=f"reverse KL, teacher {name}")
    if steps and "rollout_mismatch_k1" in steps[0]:
        axes[1].plot(x, [r["rollout_mismatch_k1"] for r in steps], label="rollout engine - trainer (K1)")
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
