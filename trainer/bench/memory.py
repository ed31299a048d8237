"""Peak memory of one tropd forward + backward of a large-vocabulary student: whole-batch logits vs chunks.

A random Llama with Qwen's vocabulary (151,936) and a tiny body (hidden 64, 2 layers), so that the output head's
logits dominate. Variants: `model_logits` (the plain path: `model(...).logits` at the response positions, then the
loss), `unchunked` (ScoringModule with chunk_tokens=0) and `chunk_<C>`. Each variant runs in a fresh process; the
figure is the peak above a baseline taken after the model exists and a warm-up step on a 1-token batch ran (so
that lazy initialisation is not counted; its gradients are freed, so the step's own gradients are counted): on CPU
the growth of the peak RSS (`VmHWM`) after resetting it to the current RSS (/proc/self/clear_refs),
on CUDA `torch.cuda.max_memory_allocated` minus the memory allocated then.

    python -m trainer.bench.memory [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

FULL = dict(sequences=8, response_tokens=256, chunks=(4096, 1024, 256))
QUICK = dict(sequences=2, response_tokens=128, chunks=(16,))


def _reset_peak_rss() -> bool:
    """Lower the process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _measure(settings: dict, variant: str) -> dict:
    """Run in a fresh process: the peak memory (MB) of one step of `variant` above the baseline."""
    import gc

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer import losses
    from trainer.student import ScoringModule, StudentStep, sequence_inputs

    torch.manual_seed(0)
    device, V, K = torch.device(settings["device"]), settings["vocab_size"], settings["top_k"]
    B, P, T = settings["sequences"], settings["prompt_tokens"], settings["response_tokens"]
    config = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=P + T)  # fmt: skip
    model = LlamaForCausalLM(config).to(device)

    def step(B: int, T: int) -> None:
        prompts, responses = torch.randint(1, V, (B, P)).tolist(), torch.randint(1, V, (B, T)).tolist()
        top_ids = torch.randint(V, (B, T, K), device=device)
        top_lp = torch.log_softmax(torch.randn(B, T, K + 1, device=device), -1)[..., :K]
        teacher_lp = -12.0 + 3 * torch.randn(B, T, device=device)
        if variant == "model_logits":
            input_ids, attention_mask, index, ids, mask = sequence_inputs(prompts, responses, 0, device)
            logits_B_L_V = model(input_ids=input_ids, attention_mask=attention_mask).logits  # as response_forward
            logits_B_T_V = logits_B_L_V.gather(1, index[:, :, None].expand(-1, -1, V)).float()
            loss, _ = losses.tropd(logits_B_T_V, ids, teacher_lp, top_ids, top_lp, mask)
            loss.backward()
        else:
            chunk = 0 if variant == "unchunked" else int(variant.removeprefix("chunk_"))
            student = StudentStep(ScoringModule(model, chunk), prompts, responses, 0, top_ids, device=device)
            loss, _ = losses.tropd(student.scores(), student.ids_B_T, teacher_lp, top_ids, top_lp, student.mask_B_T)
            student.backward(loss)

    step(1, 1)  # warm-up: lazy initialisation (kernels, thread pools, library pages) is not the step's cost
    model.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(B, T)
        torch.cuda.synchronize()
        return {"peak_mb": (torch.cuda.max_memory_allocated() - baseline) / 2**20, "peak_reset": True}
    reset = _reset_peak_rss()
    baseline = _peak_rss_kb()
    step(B, T)
    return {"peak_mb": (_peak_rss_kb() - baseline) / 2**10, "peak_reset": reset}


def _peak_rss_kb() -> int:
    """This process's peak RSS (kB): `VmHWM` of /proc/self/status, the figure that clear_refs resets. Not
    `ru_maxrss`, which is also at least the peak of the process that started this one (it is kept across exec), so
    that a step smaller than the parent's RSS would read as 0; `ru_maxrss` only where /proc is not there."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_memory(
    quick: bool = False, *, device: str = "cpu", sequences: int | None = None, response_tokens: int | None = None,
    chunks: tuple[int, ...] | None = None, prompt_tokens: int = 16, top_k: int = 20, vocab_size: int = 151936,
    model_logits: bool = True,
) -> dict:  # fmt: skip
    """{"peak_memory_mb": {"model_logits": x, "unchunked": y, "chunk_<C>": z, ...}, "settings": {...}}: the peak
    memory (MB) of one tropd forward + backward per variant, each in a fresh process (`quick`: a small batch)."""
    base = QUICK if quick else FULL
    settings = {
        "device": device, "vocab_size": vocab_size, "hidden_size": 64, "layers": 2, "top_k": top_k,
        "sequences": sequences or base["sequences"], "prompt_tokens": prompt_tokens,
        "response_tokens": response_tokens or base["response_tokens"], "chunks": list(chunks or base["chunks"]),
        "measure": "torch.cuda.max_memory_allocated" if device.startswith("cuda") else "peak RSS (VmHWM) growth",
        "baseline": "after the model, a warm-up step on a 1-token batch and freeing its gradients",
    }  # fmt: skip
    variants = (["model_logits"] if model_logits else []) + ["unchunked"] + [f"chunk_{c}" for c in settings["chunks"]]
    peaks = {}
    for variant in variants:
        cmd = [sys.executable, "-m", "trainer.bench.memory", "--one", variant, "--settings", json.dumps(settings)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"memory bench variant {variant} failed: {done.stderr.strip().splitlines()[-1:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        peaks[variant] = round(result["peak_mb"], 1)
        if not result["peak_reset"]:
            settings["measure"] = "peak RSS growth (peak not reset after the warm-up: an underestimate)"
    return {"peak_memory_mb": peaks, "settings": settings}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small batch (2 x 128 response tokens)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a single variant, in this process
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(_measure(json.loads(args.settings), args.one)))
    else:
        print(json.dumps(peak_memory(args.quick, device=args.device), indent=2))


if __name__ == "__main__":
    main()
