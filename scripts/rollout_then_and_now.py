"""The rollout loop of commit 68fb292 against today's, side by side in one process, on the workloads of `tropd bench
trainer`'s section (e): the toy student, a 29M Llama and a Qwen3 with Qwen's 151,936-token vocabulary.

The loop of 68fb292 carried finished rows to the end of the longest one, asked the host every token whether all
had finished, and computed every prompt position's logits in the prefill. Its two files (`trainer/sampling.py`,
`trainer/decode.py`) are read from git into a temporary package, so this needs the repository's history (a clone).
Both loops draw each token from the same uniforms, so they give the same tokens except where a draw falls within
float rounding of a boundary of the inverse CDF (checked on every row that differs, against a float64 forward).

    python scripts/rollout_then_and_now.py [--quick] [--threads 2] [--json out.json]

Prints generated tokens/s of each loop, best of 3 taken in turn (then, now, then, now, ...) after a warm-up of each.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

THEN = "68fb292"


def then_sample():
    """`sample` of commit THEN, imported from a temporary package built from git."""
    package = Path(tempfile.mkdtemp(prefix="rollout-then-")) / "rollout_then"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("sampling", "decode"):
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{THEN}:trainer/{name}.py"], check=True,
                              capture_output=True, text=True).stdout  # fmt: skip
        text = text.replace("from trainer.decode import", "from rollout_then.decode import")
        (package / f"{name}.py").write_text(text)
    sys.path.insert(0, str(package.parent))
    return importlib.import_module("rollout_then.sampling").sample


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 rows x up to 32 tokens (else 64 x up to 128)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    import torch

    from trainer.bench.speed import STOP_EVERY, rollout_workloads
    from trainer.rollout.sampling import sample as now

    then = then_sample()
    torch.set_num_threads(args.threads)
    rows, new_tokens, reps = (16, 32, 3) if args.quick else (64, 128, 3)
    print(f"rollouts, {rows} rows x up to {new_tokens} new tokens, a stop id every {STOP_EVERY} ids, temperature 1, "
          f"float32, {args.threads} threads; tokens/s, best of {reps} in turn", flush=True)  # fmt: skip
    print(
        f"{'student':<18} {'params':>7} {THEN + ' (then)':>15} {'now':>9} {'now/then':>9}  the same tokens", flush=True
    )
    results = {}
    for name, model, prompts, stops in rollout_workloads(rows):
        uniforms = torch.rand((rows, new_tokens), generator=torch.Generator().manual_seed(0))
        best = {"then": 0.0, "now": 0.0}
        tokens = {}
        for rep in range(reps + 1):
            for label, sample in (("then", then), ("now", now)):
                start = time.perf_counter()
                roll = sample(model, prompts, max_new_tokens=new_tokens, pad_id=0, stop_ids=stops,
                              uniforms_B_T=uniforms)  # fmt: skip
                seconds = time.perf_counter() - start
                tokens[label] = roll.responses()
                if rep:  # the first of each is the warm-up
                    best[label] = max(best[label], int(roll.lengths_B.sum()) / seconds)
        same = tokens["then"] == tokens["now"]
        differing = [b for b in range(rows) if tokens["then"][b] != tokens["now"][b]]
        exact = copy.deepcopy(model).double() if differing else None  # the float64 reference of tie_gap
        gap = max((tie_gap(exact, prompts[b], tokens["then"][b], tokens["now"][b], uniforms[b]) for b in differing),
                  default=0.0)  # fmt: skip
        params = sum(p.numel() for p in model.parameters())
        results[name] = {"params": params, "then_tokens_per_s": best["then"], "now_tokens_per_s": best["now"],
                         "now_over_then": best["now"] / best["then"], "same_tokens": same,
                         "mean_length": sum(map(len, tokens["now"])) / rows, "rows_differing": len(differing),
                         "largest_tie_gap": gap}  # fmt: skip
        print(f"{name:<18} {params / 1e6:>6.1f}M {best['then']:>15,.0f} {best['now']:>9,.0f} "
              f"{best['now'] / best['then']:>9.2f}  {rows - len(differing)}/{rows} rows"
              + (f" (the others part at a tie: the draw within {gap:.1e} of a CDF boundary)" if differing else ""),
              flush=True)  # fmt: skip
    if args.json:
        settings = {"rows": rows, "new_tokens": new_tokens, "threads": args.threads, "then": THEN, "best_of": reps}
        Path(args.json).write_text(json.dumps({"settings": settings, "shapes": results}, indent=2))
    return 0 if all(r["largest_tie_gap"] < TIE for r in results.values()) else 1


# Two rows may part where the draw falls within float32 rounding of a boundary of the inverse CDF (151,936 nearly
# equal probabilities of a random model sum with errors of about 1e-6): there either token is the right one.
TIE = 1e-4


def tie_gap(exact, prompt: list[int], then: list[int], now: list[int], uniforms_T) -> float:
    """Where the two responses first part: how far the draw lies from the float64 inverse CDF's boundary between
    the two tokens (0: on it). `exact`, the model in float64, gives the CDF by a full forward over the common
    prefix."""
    import torch

    t = next(i for i in range(min(len(then), len(now)) + 1) if i == len(then) or i == len(now) or then[i] != now[i])
    if t == len(then) or t == len(now):
        return float("inf")  # one stopped where the other went on: not a tie of the draw
    with torch.no_grad():
        logits = exact(torch.tensor([prompt + then[:t]])).logits[0, -1]
    cdf = torch.softmax(logits, -1).cumsum(-1)
    lo, hi = sorted((then[t], now[t]))
    return float((cdf[lo:hi] - float(uniforms_T[t]) * float(cdf[-1])).abs().min())


if __name__ == "__main__":
    sys.exit(main())
