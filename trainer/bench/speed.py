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
from trainer.config import load_config
from trainer.run import train
from trainer.toy import world


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
        f"rollout.prompts_per_step={prompts}", "rollout.samples_per_prompt=1", "data.toy={math: 0.7, code: 0.3}",
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


def format_extra(r: dict) -> str:
    """Sections (c) decoders and (d) peak memory of the report."""
    d, m = r["decoders"], r["memory"]
    ds = d["settings"]
    lines = ["", f"(c) decoders ({ds['prompts']} prompts x {ds['new_tokens']} new tokens, {ds['threads']} thread(s), "
             "CPU) | hand-written tok/s | library tok/s | rule picks"]  # fmt: skip
    for name, x in d["shapes"].items():
        lines.append(f"    {name:<12} ({x['params'] / 1e6:.2f}M) | {x['tokens_per_s_fast']:18.0f} | "
                     f"{x['tokens_per_s_library']:13.0f} | {x['rule_picks']}")  # fmt: skip
    settings = m["settings"]
    lines += ["", f"(d) peak memory of one tropd step, vocabulary {settings.get('vocab_size')}, "
              f"{settings.get('sequences')} x {settings.get('response_tokens')} response tokens (MB)"]  # fmt: skip
    lines += [f"    {name:<14} | {mb:8.0f}" for name, mb in m["peak_memory_mb"].items()]
    rs = r["rollout"]["settings"]
    lines += ["", f"(e) rollouts ({rs['rows']} rows x up to {rs['new_tokens']} new tokens, a stop id in every "
              f"{rs['stop_every']} ids, {rs['threads']} thread(s), CPU) | generated tok/s | mean length"]  # fmt: skip
    for name, x in r["rollout"]["shapes"].items():
        lines.append(f"    {name:<16} ({x['params'] / 1e6:.1f}M, V={x['vocab']}) | {x['tokens_per_s']:10.0f} | "
                     f"{x['mean_length']:.1f}")  # fmt: skip
    return "\n".join(lines)


def main(args) -> int:
    if args.build:
        world.build(args.toy, quick=args.quick, log=_stderr)
    steps = args.steps or (6 if args.quick else 30)
    prompts = 16 if args.quick else 64
    threads = args.threads or half_the_cores()
    report = run_bench(args.toy, args.engine, steps, args.latency_ms, prompts, threads, progress=_stderr)
    _stderr("[bench] (c) the student's decoders: hand-written Llama decoder vs the library's cache path")
    report["decoders"] = decoder_speed(args.quick, threads=max(threads, 1))
    _stderr("[bench] (d) peak memory of a step at a 151,936-token vocabulary: whole-batch logits vs chunks")
    from trainer.bench.memory import peak_memory

    report["memory"] = peak_memory(args.quick)
    report["peak_memory_mb"] = report["memory"]["peak_memory_mb"]
    _stderr("[bench] (e) rollouts: the sampler's tokens/s with rows that stop at different lengths")
    report["rollout"] = rollout_speed(args.quick, threads=max(threads, 1))
    from trainer.rollout.vllm_engine import vllm_installed

    text = format_report(report) + "\n" + format_extra(report)
    if vllm_installed():
        _stderr("[bench] (f) rollout engines: torch vs vllm, and one weight sync")
        report["engines"] = engine_speed(args.quick, threads=max(threads, 1))
        text += "\n" + format_engines(report["engines"])
    else:
        text += "\n\n(f) rollout engines: vLLM is not installed, so only the torch loop was measured (e)"
    print(json.dumps(report) if args.json else text)
    return 0


def _stderr(message: str) -> None:
    import sys

    print(message, file=sys.stderr)


# (c) the student's decoders: sampling throughput of the hand-written Llama decoder and of the library's own
# forward and cache, at the toy student's shape and at a 29M-parameter Llama (random weights: speed does not
# depend on them), and which one `decoder_for`'s size rule picks. The rule in trainer/rollout/decode.py cites these.
DECODER_SHAPES = {
    "toy_student": world.STUDENT,
    "llama_29m": world.ModelSpec(hidden=512, layers=8, heads=8, intermediate=1664),
}


def _toy_prompts(n: int) -> list[list[int]]:
    """`n` toy prompts (8-16 tokens), the task families in turn."""
    from trainer.toy import tasks
    from trainer.toy.tokenizer import VOCAB

    families = ("math", "code", "general")
    per = [tasks.examples(f, "eval", -(-n // len(families))) for f in families]
    return [VOCAB.prompt_ids(per[i % len(families)][i // len(families)].prompt) for i in range(n)]


def _tokens_per_s(model, prompts: list[list[int]], new_tokens: int, prefer: str) -> float:
    """Generated tokens per second of one `sample` call with decoder `prefer`; no stop ids, so every row runs
    the whole budget."""
    import time

    import torch

    from trainer.rollout.sampling import sample
    from trainer.toy.tokenizer import VOCAB

    start = time.perf_counter()
    sample(model, prompts, max_new_tokens=new_tokens, pad_id=VOCAB.pad_id, decoder=prefer,
           generator=torch.Generator().manual_seed(0))  # fmt: skip
    return len(prompts) * new_tokens / (time.perf_counter() - start)


def decoder_speed(quick: bool, threads: int = 2) -> dict:
    """tok/s of `LlamaDecoder` ("fast") and `LibraryDecoder` ("library") on CPU for each of DECODER_SHAPES, with
    `threads` torch threads, and the decoder that `decoder_for(model)` picks. Quick: 16 prompts x 16 new tokens
    (well under 20 s on 2 cores); else 64 prompts x 48 new tokens. Each is the best of 3 runs, the two decoders
    in turn after a warm-up, so that a moment when other jobs hold the cores slows both alike and is dropped."""
    import torch

    from trainer.rollout.decode import decoder_for

    prompts_n, new_tokens, reps = (16, 16, 3) if quick else (64, 48, 3)
    prompts = _toy_prompts(prompts_n)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    shapes = {}
    try:
        for name, spec in DECODER_SHAPES.items():
            model = world.new_model(spec, seed=0).eval()
            speed = {"fast": 0.0, "library": 0.0}
            for prefer in speed:
                _tokens_per_s(model, prompts, 4, prefer)
            for _ in range(reps):
                for prefer in speed:
                    speed[prefer] = max(speed[prefer], _tokens_per_s(model, prompts, new_tokens, prefer))
            shapes[name] = {
                "hidden": spec.hidden, "layers": spec.layers, "intermediate": spec.intermediate,
                "params": sum(p.numel() for p in model.parameters()),
                "tokens_per_s_fast": speed["fast"], "tokens_per_s_library": speed["library"],
                "faster": max(speed, key=speed.get),
                "rule_picks": "fast" if type(decoder_for(model)).__name__ == "LlamaDecoder" else "library",
            }  # fmt: skip
    finally:
        torch.set_num_threads(before)
    settings = {"prompts": prompts_n, "new_tokens": new_tokens, "threads": threads, "device": "cpu", "best_of": reps}
    return {"settings": settings, "shapes": shapes}


# (e) rollouts as training makes them: rows that stop at different lengths (a stop id every STOP_EVERY ids of the
# vocabulary, so random weights stop after about that many tokens), at the toy student, a 29M Llama and a Qwen3 of
# Qwen's 151,936-token vocabulary (narrow layers: the head is what a real vocabulary costs), prompts of 8-16 tokens
# (toy) or 96 (the others).
STOP_EVERY = 24


def rollout_models() -> dict:
    """The three students of (e), random weights (speed does not depend on them), with their prompts."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    qwen = Qwen3ForCausalLM(Qwen3Config(vocab_size=151936, hidden_size=256, intermediate_size=768,
                                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                        head_dim=64, max_position_embeddings=1024))  # fmt: skip
    g = torch.Generator().manual_seed(0)
    return {
        "toy_student": (world.new_model(world.STUDENT, seed=0), None),
        "llama_29m": (world.new_model(DECODER_SHAPES["llama_29m"], seed=0), 96),
        "qwen3_real_vocab": (qwen, 96),
    } | {"_generator": g}


def rollout_workloads(rows: int):
    """(name, model in eval mode, `rows` prompts, stop ids) of each student of (e)."""
    import torch

    models = rollout_models()
    g = models.pop("_generator")
    for name, (model, prompt_len) in models.items():
        vocab = model.get_output_embeddings().weight.shape[0]
        prompts = (_toy_prompts(rows) if prompt_len is None
                   else torch.randint(1, vocab, (rows, prompt_len), generator=g).tolist())  # fmt: skip
        yield name, model.eval(), prompts, range(0, vocab, STOP_EVERY)


def rollout_speed(quick: bool, threads: int = 2) -> dict:
    """Generated tokens per second of `sample` at temperature 1 over rows that stop at different lengths, best of
    3 after a warm-up. Quick: 16 rows x up to 32 tokens; else 64 x up to 128."""
    import time

    import torch

    from trainer.rollout.sampling import sample

    rows, new_tokens, reps = (16, 32, 3) if quick else (64, 128, 3)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    shapes = {}
    try:
        for name, model, prompts, stops in rollout_workloads(rows):
            vocab = model.get_output_embeddings().weight.shape[0]
            best, lengths = 0.0, 0.0
            for rep in range(reps + 1):
                start = time.perf_counter()
                roll = sample(model, prompts, max_new_tokens=new_tokens, pad_id=0, stop_ids=stops,
                              generator=torch.Generator().manual_seed(rep))  # fmt: skip
                generated = int(roll.lengths_B.sum())
                if rep:  # the first is the warm-up
                    best = max(best, generated / (time.perf_counter() - start))
                    lengths = generated / rows
            shapes[name] = {"params": sum(p.numel() for p in model.parameters()), "vocab": vocab,
                            "tokens_per_s": best, "mean_length": lengths}  # fmt: skip
    finally:
        torch.set_num_threads(before)
    settings = {"rows": rows, "new_tokens": new_tokens, "stop_every": STOP_EVERY, "threads": threads, "best_of": reps}
    return {"settings": settings, "shapes": shapes}


def engine_speed(quick: bool, threads: int) -> dict:
    """Section (f): `trainer.bench.engines` run in a process of its own (vLLM binds threads process-wide)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # vLLM sizes its threads by it
    command = [sys.executable, "-m", "trainer.bench.engines", "--threads", str(threads), *(["--quick"] * quick)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"the engine bench failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def format_engines(r: dict) -> str:
    s = r["settings"]
    lines = ["", f"(f) rollout engines ({s['rows']} rows x up to {s['new_tokens']} new tokens, {s['threads']} "
             "thread(s), CPU) | torch tok/s | vllm tok/s | vllm / torch | one sync (ms)"]  # fmt: skip
    for name, x in r["shapes"].items():
        lines.append(f"    {name:<16} ({x['params'] / 1e6:.1f}M) | {x['torch_tokens_per_s']:11.0f} | "
                     f"{x['vllm_tokens_per_s']:10.0f} | {x['vllm_over_torch_rollout_tokens_per_s']:12.2f} | "
                     f"{x['sync_ms']:.1f}")  # fmt: skip
    return "\n".join(lines)
