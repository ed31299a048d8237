"""The offline toy world: a character tokenizer, a Llama teacher trained by SFT on scratchpad answers,
and a smaller student warm-started on answer-only responses plus single steps drilled in the teacher's
style (it can do each step, never chained), so that the two disagree.

`build(out)` makes `out/teacher` and `out/student` (Hugging Face model directories with tokenizer files)
deterministically for a seed, and caches them: a second call with the same settings returns at once.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from trainer.models import load_causal_lm, quiet_transformers
from trainer.rollout.sampling import response_forward, sample
from trainer.toy import tasks
from trainer.toy.tasks import stack
from trainer.toy.tokenizer import VOCAB
from tropd.errors import UserError
from tropd.machine import torch_threads
from tropd.paths import directory_path

BUILD_VERSION = 1
OWN_FILES = {"build.json", "teacher", "student", "teacher.tmp", "student.tmp"}  # all that build() writes in `out`
MIX = {"math": 0.45, "code": 0.35, "general": 0.2}
MAX_NEW_TOKENS = 40


@dataclass(frozen=True)
class ModelSpec:
    hidden: int
    layers: int
    heads: int
    intermediate: int


@dataclass(frozen=True)
class SftSpec:
    style: str  # "teacher" or "student": which answer style to imitate
    steps: int
    batch: int
    lr: float
    warmup: int = 50
    drills: float = 0.0  # share of the DRILLED tasks' examples replaced by a single worked step (drill())


TEACHER = ModelSpec(hidden=128, layers=4, heads=4, intermediate=512)
STUDENT = ModelSpec(hidden=96, layers=3, heads=3, intermediate=384)
RECIPES = {
    False: {"teacher": SftSpec("teacher", 1100, 128, 2e-3), "student": SftSpec("student", 1500, 128, 3e-3, drills=0.8)},
    True: {
        "teacher": SftSpec("teacher", 160, 64, 3e-3, 20),
        "student": SftSpec("student", 60, 64, 3e-3, 10, drills=0.5),
    },
}


def set_threads() -> None:
    """Use the machine's cores, and keep transformers' per-file progress bars out of our progress output."""
    torch.set_num_threads(torch_threads())
    quiet_transformers()


def new_model(spec: ModelSpec, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB.size,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=VOCAB.bos_id,
        eos_token_id=VOCAB.eos_id,
        pad_token_id=VOCAB.pad_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def load_model(path: str | Path):
    """A causal LM from a model directory, float32, eval mode, on CPU (trainer.models.load_causal_lm)."""
    return load_causal_lm(path)


def drill(ex: tasks.Example, rng: random.Random) -> tuple[str, str]:
    """One step of an example posed as its own problem and worked in the teacher's style: math `97+57+60`
    (teacher `97+57=154;154+60=214;#214`) gives `97+57` -> `97+57=154;#154` or `154+60` -> `154+60=214;#214`;
    code `1 7 7 * +` (teacher `1 49;50;#50`) gives `7 7 *` -> `49;#49` or `1 49 +` -> `50;#50`. A student drilled
    so can do each step, but not chain them. `general` is one step (write the open brackets, then close them): its
    drill is the teacher's whole answer, `([]((` -> `(((;#)))`, so the student knows the teacher's format there
    and has no skill to lose by taking it on."""
    if ex.task == "general":
        return ex.prompt, ex.teacher
    if ex.task == "math":
        lhs, rhs = rng.choice(ex.teacher.split(";")[:-1]).split("=")
        return lhs, f"{lhs}={rhs};#{rhs}"
    if ex.task != "code":
        raise ValueError(f"no drills for task {ex.task!r}")
    left, right, op, after = rng.choice(stack.steps(ex.prompt.split()))
    return f"{left} {right} {op}", f"{after[-1]};#{after[-1]}"


DRILLED = ("math", "code", "general")


def mixed_batch(rng: random.Random, style: str, size: int, pools: dict[str, list[tasks.Example]], drills: float = 0.0):
    """`size` (prompt_ids, response_ids) pairs, tasks drawn by MIX, response in `style` plus eos; a share
    `drills` of the examples of the DRILLED tasks become single-step drills (drill())."""
    names, weights = zip(*MIX.items(), strict=True)
    out = []
    for name in rng.choices(names, weights, k=size):
        ex = rng.choice(pools[name])
        prompt, response = ex.prompt, ex.teacher if style == "teacher" else ex.student
        if name in DRILLED and drills and rng.random() < drills:
            prompt, response = drill(ex, rng)
        out.append((VOCAB.prompt_ids(prompt), VOCAB.encode(response) + [VOCAB.eos_id]))
    return out


def sft_loss(model, pairs: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """Mean cross-entropy of the response tokens (prompt tokens carry no loss)."""
    logprobs_B_T, mask_B_T, _ = response_forward(model, [p for p, _ in pairs], [r for _, r in pairs], VOCAB.pad_id)
    return -(logprobs_B_T.sum() / mask_B_T.sum())


def lr_at(step: int, spec: SftSpec) -> float:
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    frac = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.lr * 0.5 * (1 + math.cos(math.pi * frac))


def sft(model, spec: SftSpec, seed: int, label: str, pool_size: int = 20000, log=print):
    """Supervised fine-tuning on the mixed tasks in `spec.style`; prints progress every few seconds."""
    rng = random.Random(f"sft/{label}/{seed}")
    pools = {name: tasks.examples(name, "train", pool_size, seed) for name in MIX}
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.98))
    model.train()
    start = last = time.monotonic()
    for step in range(spec.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, spec)
        loss = sft_loss(model, mixed_batch(rng, spec.style, spec.batch, pools, spec.drills))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        now = time.monotonic()
        if now - last > 5 or step == spec.steps - 1:
            last = now
            left = (now - start) / (step + 1) * (spec.steps - step - 1)
            eta = f", about {left:.0f}s left" if step < spec.steps - 1 else ""
            log(f"  [{label}] step {step + 1}/{spec.steps}  loss {loss.item():.4f}  {now - start:.0f}s{eta}")
    model.eval()
    return model


def save_model(model, path: Path) -> None:
    """`save_pretrained` into a temporary directory, then rename: a reader never sees half a model."""
    from trainer.toy.tokenizer import build_hf_tokenizer

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    build_hf_tokenizer().save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def build_settings(seed: int, quick: bool) -> dict:
    return {
        "version": BUILD_VERSION,
        "drilled": list(DRILLED),
        "seed": seed,
        "quick": quick,
        "teacher": asdict(TEACHER),
        "student": asdict(STUDENT),
        "recipe": {k: asdict(v) for k, v in RECIPES[quick].items()},
    }


def role_settings(role: str, seed: int, quick: bool) -> dict:
    """What one model of the build depends on: a model whose settings are unchanged is kept on a rebuild."""
    spec = TEACHER if role == "teacher" else STUDENT
    # only the student is drilled: a change of the drilled tasks rebuilds it and keeps the teacher
    drilled = {"drilled": list(DRILLED)} if role == "student" else {}
    return {"version": BUILD_VERSION, "seed": seed, "quick": quick, "model": asdict(spec),
            "recipe": asdict(RECIPES[quick][role]), **drilled}  # fmt: skip


def read_record(out: Path) -> dict | None:
    try:
        return json.loads((out / "build.json").read_text())
    except (OSError, ValueError):
        return None


def built_kind(out: str | Path) -> tuple[int, bool]:
    """(seed, quick) of the build in `out`, or the full build's (0, False) where there is none: a rebuild then
    keeps the kind of toy world a directory holds."""
    settings = (read_record(Path(out)) or {}).get("settings") or {}
    seed, quick = settings.get("seed", 0), settings.get("quick", False)
    return (seed, quick) if isinstance(seed, int) and isinstance(quick, bool) else (0, False)


def is_built(out: Path, seed: int, quick: bool) -> bool:
    return _is_current(read_record(out), out, seed, quick)


def _is_current(record: dict | None, out: Path, seed: int, quick: bool) -> bool:
    if record is None or not (out / "teacher").is_dir() or not (out / "student").is_dir():
        return False
    return record.get("settings") == build_settings(seed, quick)


def foreign_files(out: Path) -> list[str]:
    """What `out` holds besides a build's own files: a volume's root may hold lost+found and hidden files,
    anything else someone else put there (a build would replace its teacher/ and student/)."""
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir()
                  if p.name not in OWN_FILES and p.name != "lost+found" and not p.name.startswith("."))  # fmt: skip


def build(
    out: str | Path = "artifacts/toy", seed: int = 0, quick: bool = False, log=print, force: bool = False
) -> dict:
    """Make (or reuse) the toy teacher and student under `out`; returns the build record.

    A model whose own settings (architecture, recipe, seed) did not change since the last build is kept. A build of
    the other kind (quick over full, full over quick) is refused unless `force`: it would replace the world in place
    (a quick build over artifacts/toy made `make demo` run on the quick world)."""
    out = directory_path(out, "toy world directory")
    foreign = foreign_files(out)
    if foreign:
        raise UserError(f"{out} holds files a toy build did not make ({', '.join(foreign[:4])}): a build would "
                        "replace its teacher/ and student/; choose a new or empty directory")  # fmt: skip
    old = read_record(out)
    was_quick = (old or {}).get("settings", {}).get("quick") if isinstance(old, dict) else None
    if was_quick is not None and bool(was_quick) != quick and not force:
        have, want = ("a quick", "full") if was_quick else ("a full", "quick")
        raise UserError(f"{out} holds {have} toy world: a {want} build would replace it; give another directory "
                        f"(e.g. artifacts/toy{'-quick' if quick else ''}), or --force to replace it")  # fmt: skip
    if _is_current(old, out, seed, quick):
        log(f"[toy] cached: {out} (seed {seed}{', quick' if quick else ''})")
        return old
    old = old or {}
    set_threads()
    out.mkdir(parents=True, exist_ok=True)
    (out / "build.json").unlink(missing_ok=True)
    recipe = RECIPES[quick]
    if not quick:
        log(f"[toy] building the toy world in {out} (a full build takes 7-14 minutes on 2 cores, once: it is cached)")
    start = time.monotonic()
    record: dict = {"settings": build_settings(seed, quick)}
    for role, spec in (("teacher", TEACHER), ("student", STUDENT)):
        settings = role_settings(role, seed, quick)
        kept = old.get(role, {})
        if kept.get("settings") == settings and (out / role / "config.json").is_file():
            log(f"[toy] keeping the {role} of the last build (its settings did not change)")
            record[role] = {"parameters": kept["parameters"], "path": str(out / role), "settings": settings}
            continue
        model = new_model(spec, seed)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"[toy] training the {role} ({n_params / 1e6:.2f}M parameters, {recipe[role].style}-style answers)")
        sft(model, recipe[role], seed, role, log=log)
        save_model(model, out / role)
        record[role] = {"parameters": n_params, "path": str(out / role), "settings": settings}
    n_eval = 100 if quick else 500
    for role in ("teacher", "student"):
        model = load_model(out / role)
        record[role]["accuracy"] = {t: accuracy(model, t, n_eval) for t in tasks.TASKS}
        log(f"[toy] {role} greedy accuracy (n={n_eval}): " + _fmt_acc(record[role]["accuracy"]))
    record["seconds"] = round(time.monotonic() - start, 1)
    (out / "build.json").write_text(json.dumps(record, indent=2))
    log(f"[toy] built {out} in {record['seconds']:.0f}s")
    return record


def _fmt_acc(acc: dict[str, float]) -> str:
    return "  ".join(f"{t} {100 * a:.1f}%" for t, a in acc.items())


BANNED = (VOCAB.pad_id, VOCAB.bos_id, VOCAB.sep_id)


def generate(model, prompts: list[str], temperature: float = 0.0, seed: int = 0, batch: int = 512):
    """Responses (text) of `model` to `prompts`; greedy when `temperature == 0`."""
    gen = torch.Generator().manual_seed(seed)
    texts = []
    for i in range(0, len(prompts), batch):
        ids = [VOCAB.prompt_ids(p) for p in prompts[i : i + batch]]
        roll = sample(
            model,
            ids,
            max_new_tokens=MAX_NEW_TOKENS,
            eos_id=VOCAB.eos_id,
            pad_id=VOCAB.pad_id,
            banned_ids=BANNED,
            temperature=temperature,
            generator=gen,
        )
        texts += [VOCAB.decode(r) for r in roll.responses()]
    return texts


def accuracy(model, task: str, n: int, seed: int = 0) -> float:
    exs = tasks.examples(task, "eval", n, seed)
    responses = generate(model, [e.prompt for e in exs])
    return sum(tasks.check(task, e.prompt, r) for e, r in zip(exs, responses, strict=True)) / n


@torch.no_grad()
def mismatch(student, teacher, task: str, n: int, seed: int = 0) -> dict[str, float]:
    """On student samples (T=1): mean per-token K1 reverse KL `log p_S - log p_T`, and the share of
    tokens where `p_T < 0.01 p_S`."""
    exs = tasks.examples(task, "eval", n, seed)
    prompts = [VOCAB.prompt_ids(e.prompt) for e in exs]
    roll = sample(
        student,
        prompts,
        max_new_tokens=MAX_NEW_TOKENS,
        eos_id=VOCAB.eos_id,
        pad_id=VOCAB.pad_id,
        banned_ids=BANNED,
        temperature=1.0,
        generator=torch.Generator().manual_seed(seed),
    )
    responses = roll.responses()
    s, mask, _ = response_forward(student, prompts, responses, VOCAB.pad_id)
    t, _, _ = response_forward(teacher, prompts, responses, VOCAB.pad_id)
    k1 = (s - t)[mask]
    outlier = (t < s + math.log(0.01))[mask]
    return {"reverse_kl": k1.mean().item(), "outlier_share": outlier.float().mean().item()}


def task_report(model_dir: str, task: str, n: int, teacher_dir: str | None = None, seed: int = 0) -> dict:
    """`tropd toy eval` for one task: the model's accuracy on `n` eval prompts, and with a teacher the mismatch."""
    set_threads()
    model = load_model(model_dir)
    result = {"model": str(model_dir), "task": task, "n": n, "accuracy": accuracy(model, task, n, seed)}
    if teacher_dir is not None:
        result.update(mismatch(model, load_model(teacher_dir), task, n, seed))
    return result
