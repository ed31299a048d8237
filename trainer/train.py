"""The training loop: rollouts in flight, a trust-region loss, checkpoints, metrics, eval, summary.

for step in 1..steps:
    keep up to max_staleness + 1 batches sampled and sent to the teacher
    batch = oldest batch, with its teacher scores
    loss = losses.<method>(student logits on the batch, teacher scores)   # skipped if non-finite
    optimizer step; metrics; eval every K steps; checkpoint every C steps
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections import deque
from pathlib import Path

import torch

from services.teacher.client import TeacherError
from trainer import checkpoint, losses, toy
from trainer.config import TrainConfig, dump_config
from trainer.pipeline import Batch, Rollouts, k1_estimate
from trainer.rollout import response_logprobs, sample
from trainer.tasks import examples
from trainer.teacher_link import TeacherLink
from trainer.tokenizer import VOCAB
from tropd.errors import UserError, first_line
from tropd.modeldir import check_model_dir
from tropd.paths import directory_path

EVAL_SEED = 1234


def compute_loss(config: TrainConfig, batch: Batch, logits_B_T_V, step: int, uniform_B_T=None):
    c, ids, mask = config.loss, batch.ids_B_T, batch.mask_B_T
    t_lp, top_ids, top_lp, old = batch.teacher_lp_B_T, batch.teacher_top_ids_B_T_K, batch.teacher_top_lp_B_T_K, None
    if config.max_staleness > 0 and batch.source == "student":
        old = batch.old_lp_B_T
    if c.method == "opd":
        return losses.opd(logits_B_T_V, ids, t_lp, mask, old_lp_B_T=old, ratio_eps=c.ratio_eps, discount=c.discount)
    if c.method == "tropd":
        return losses.tropd(
            logits_B_T_V, ids, t_lp, top_ids, top_lp, mask,
            prefix_mask_B_T=batch.prefix_mask_B_T, rule=c.rule, tau=c.tau, quantile=c.quantile,
            outlier=c.outlier, clip_c=c.clip_c, lambda_out=c.lambda_out, lambda_prefix=c.lambda_prefix,
            old_lp_B_T=old, ratio_eps=c.ratio_eps, uniform_B_T=uniform_B_T,
        )  # fmt: skip
    if c.method == "eopd":
        return losses.eopd(
            logits_B_T_V, ids, t_lp, top_ids, top_lp, mask,
            entropy_threshold=c.entropy_threshold, lambda_fkl=c.lambda_fkl, old_lp_B_T=old, ratio_eps=c.ratio_eps,
        )  # fmt: skip
    if c.method == "reopold":
        refine = c.refine_after is not None and step > c.refine_after
        return losses.reopold(
            logits_B_T_V, ids, t_lp, mask, alpha=c.alpha, token_share=c.token_share, refine=refine,
            old_lp_B_T=old, ratio_eps=c.ratio_eps,
        )  # fmt: skip
    if c.method == "gkd":
        return losses.gkd(logits_B_T_V, top_ids, top_lp, mask, beta=c.beta)
    return losses.sft(logits_B_T_V, ids, mask)


def lr_lambda(config: TrainConfig):
    o = config.optim

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "cosine":
            frac = (step - o.warmup_steps) / max(1, config.steps - o.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        return 1.0

    return factor


@torch.no_grad()
def evaluate(model, link: TeacherLink, config: TrainConfig) -> dict:
    """Greedy accuracy per task, and the K1 reverse KL on student samples of held-out prompts."""
    model.eval()
    acc = {t: toy.accuracy(model, t, config.eval.n) for t in config.eval.tasks}
    per_task = max(1, config.eval.kl_prompts // len(config.eval.tasks))
    prompts = [VOCAB.prompt_ids(e.prompt) for t in config.eval.tasks for e in examples(t, "eval", per_task)]
    roll = sample(
        model, prompts, max_new_tokens=config.rollout.max_new_tokens, eos_id=VOCAB.eos_id, pad_id=VOCAB.pad_id,
        banned_ids=(VOCAB.pad_id, VOCAB.bos_id, VOCAB.sep_id), generator=torch.Generator().manual_seed(EVAL_SEED),
    )  # fmt: skip
    responses = roll.responses()
    s_lp, mask, _ = response_logprobs(model, prompts, responses, VOCAB.pad_id)
    scored = link.score([p + r for p, r in zip(prompts, responses, strict=True)], [len(p) for p in prompts], 0)
    t_lp = torch.zeros_like(s_lp)
    for i, r in enumerate(scored.result()):
        t_lp[i, : len(r.logprobs)] = torch.from_numpy(r.logprobs)
    model.train()
    return {"accuracy": acc, "reverse_kl": k1_estimate(s_lp, t_lp, mask)}


def _metrics_record(line: str) -> dict | None:
    """A metrics.jsonl line as a record with an integer step, or None."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


class RunLog:
    """metrics.jsonl, TensorBoard, and the console."""

    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int):
        self.path = run_dir / "metrics.jsonl"
        if resume_step and self.path.is_file():  # drop steps after the checkpoint: they will run again
            kept = []
            for number, line in enumerate(self.path.read_text().splitlines(), 1):
                record = _metrics_record(line)
                if record is None:
                    if line.strip():
                        print(f"[train] {self.path} line {number} is not a metrics record: dropped", file=sys.stderr)
                elif record["step"] <= resume_step and not record.get("final"):
                    kept.append(json.dumps(record))
            self.path.write_text("".join(line + "\n" for line in kept))
        elif not resume_step:
            self.path.write_text("")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in _flatten(record).items():
                if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _flatten(record: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


class DataParallel:
    """torchrun: one process per rank, DDP over gloo (CPU) or NCCL (GPU); a no-op in a single process.

    Each rank trains on its slice of the global batch; the loss is scaled so that DDP's gradient average
    equals the gradient of the mean over all ranks' tokens, as one process with the global batch would get.
    """

    def __init__(self, config: TrainConfig):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = 0
        if self.world > 1:
            n = config.rollout.prompts_per_step * config.rollout.samples_per_prompt
            if n % self.world:
                raise UserError(f"prompts_per_step x samples_per_prompt = {n} must divide by the {self.world} ranks")
            import torch.distributed as dist

            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
            self.rank = dist.get_rank()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, model):
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)

    def total(self, value: float) -> float:
        if self.world == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t)

    def all_ok(self, ok: bool) -> bool:
        return self.total(0.0 if ok else 1.0) == 0.0

    def uniforms(self, generator: torch.Generator, rows: int, width: int) -> torch.Tensor:
        """This rank's U(0, 1) draws for a `rows` x `width` batch: every rank draws the whole global batch's
        (all ranks' rows, at the widest rank's width) and keeps its slice, so that the stochastic trust rule
        marks the same tokens as one process with the global batch would."""
        if self.world == 1:
            return torch.rand((rows, width), generator=generator)
        import torch.distributed as dist

        widest = torch.tensor([width], dtype=torch.int64)
        dist.all_reduce(widest, op=dist.ReduceOp.MAX)
        draws = torch.rand((rows * self.world, int(widest)), generator=generator)
        return draws[self.rank * rows : (self.rank + 1) * rows, :width]

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def train(config: TrainConfig, resume: bool = False, log=print) -> dict | None:
    """Run (or resume) training; returns the summary (on rank 0; None on other ranks)."""
    from tqdm import tqdm

    run_dir = Path(config.out)
    student_dir = Path(config.student)
    check_model_dir(student_dir, "student")
    check_run_dir(run_dir, student_dir)
    if config.teacher.api == "inprocess":
        check_model_dir(config.teacher.model, "teacher.model")
    ckpt = checkpoint.latest(run_dir) if resume else None
    if not resume and (run_dir / "metrics.jsonl").is_file():
        raise UserError(f"run directory {run_dir} already holds a run: pass --resume, or choose another `out`")
    if resume and ckpt is None and (run_dir / "summary.json").is_file():
        raise UserError(f"run directory {run_dir} holds a finished run without checkpoints: nothing to resume from "
                        "(starting again would overwrite it); choose another `out`")  # fmt: skip
    if ckpt is not None:
        _check_resumed_settings(run_dir, config)
    if ckpt is not None and checkpoint.step_of(ckpt) > config.steps:
        raise UserError(f"--resume: the last checkpoint of {run_dir} is at step {checkpoint.step_of(ckpt)}, past "
                        f"steps={config.steps}: give steps >= {checkpoint.step_of(ckpt)}")  # fmt: skip
    dp = DataParallel(config)
    torch.set_num_threads(config.threads or max(1, min(os.cpu_count() or 1, 8) // dp.world))
    torch.manual_seed(config.seed)
    toy.quiet_transformers()
    if not dp.main:
        log = _silent

    link = TeacherLink(config.teacher)
    try:
        info = link.check(str(student_dir), config.teacher.top_k)
        if dp.main:  # a teacher refused above leaves no run directory behind
            run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(config, run_dir / "config.yaml")
        model = _load_student(ckpt / "student" if ckpt else student_dir).train()
        trained = dp.wrap(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
        rollouts = Rollouts(config, model, link, rank=dp.rank, world=dp.world)
        loss_gen = torch.Generator().manual_seed(config.seed + 1)
        done, skipped, cursor = 0, 0, 0
        if ckpt is not None:
            blob, state = checkpoint.load_state(ckpt)  # a damaged checkpoint is a UserError naming it
            optimizer.load_state_dict(blob["optimizer"])
            scheduler.load_state_dict(blob["scheduler"])
            rollouts.load_state(blob["cursor"]["rollouts"])
            loss_gen.set_state(blob["cursor"]["loss_gen"])
            done, skipped, cursor = state["step"], state["skipped_steps"], state["cursor"]
            log(f"[train] resuming {run_dir} from {ckpt.name} (step {done})")
        elif resume:
            log(f"[train] no checkpoint in {run_dir}: starting from step 0")
        if dp.main and config.eval.before_after and (done == 0 or not (run_dir / "eval_before.json").is_file()):
            log("[train] evaluating the student before training")
            (run_dir / "eval_before.json").write_text(json.dumps(evaluate(model, link, config)))
        runlog = RunLog(run_dir, config.tensorboard, done) if dp.main else None
        start_time = time.monotonic()
        inflight: deque = deque()
        next_sample = done + 1
        steps = range(done + 1, config.steps + 1)
        bar = tqdm(steps, desc=f"{config.loss.method}", unit="step", dynamic_ncols=True, mininterval=1.0,
                   disable=not dp.main)  # fmt: skip
        last_eval = None
        for step in bar:
            t0 = time.perf_counter()
            while len(inflight) < config.max_staleness + 1 and next_sample <= config.steps:
                inflight.append(rollouts.make(next_sample))
                next_sample += 1
                cursor += config.rollout.prompts_per_step
            t_sampled = time.perf_counter()
            batch = inflight.popleft().resolve()
            t_scored = time.perf_counter()
            model.train()
            _, mask, logits = response_logprobs(trained, batch.prompts, batch.responses, VOCAB.pad_id)
            record = {"step": step, "cursor": cursor - config.max_staleness * config.rollout.prompts_per_step}
            finite_teacher = batch.teacher_lp_B_T is None or bool(torch.isfinite(batch.teacher_lp_B_T[mask]).all())
            uniform = None
            if config.loss.method == "tropd" and config.loss.rule == "stochastic":  # drawn on every rank, every step
                uniform = dp.uniforms(loss_gen, *mask.shape)
            loss, metrics = compute_loss(config, batch, logits, step, uniform) if finite_teacher else (None, {})
            ok = loss is not None and bool(torch.isfinite(loss))
            grad_norm = math.nan
            optimizer.zero_grad(set_to_none=True)
            if dp.world > 1:  # every rank must run backward (DDP reduces there); a bad rank contributes zero
                share = batch.tokens * dp.world / max(1.0, dp.total(batch.tokens))
                loss = loss * share if ok else logits.sum() * 0.0
                ok = dp.all_ok(ok)
            if ok or dp.world > 1:
                loss.backward()
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip))
                ok = ok and math.isfinite(grad_norm)
            if ok:
                optimizer.step()
            else:
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                tqdm.write(f"[train] step {step}: non-finite teacher value, loss or gradient; step skipped")
            scheduler.step()
            t_done = time.perf_counter()
            latencies, link.latencies[:] = list(link.latencies), []
            record.update({k: float(v) for k, v in metrics.items()})
            record.update(
                {
                    "source": batch.source,
                    "prefix_share": float(batch.prefix_mask_B_T.sum()) / max(1, batch.tokens),
                    "response_tokens": batch.tokens,
                    "grad_norm": grad_norm,
                    "lr": scheduler.get_last_lr()[0],
                    "skipped_steps": skipped,
                    "teacher_latency_s": sum(latencies) / len(latencies) if latencies else 0.0,
                    "sample_s": t_sampled - t0,
                    "wait_teacher_s": t_scored - t_sampled,
                    "step_s": t_done - t0,
                    "tokens_per_s": batch.tokens / max(1e-9, t_done - t0),
                }
            )
            if not dp.main:
                continue
            if config.eval.every and step % config.eval.every == 0 and step < config.steps:
                last_eval = evaluate(model, link, config)
                record["eval"] = last_eval
            runlog.write(record)
            bar.set_postfix(_postfix(record, last_eval), refresh=False)
            if step == config.steps or (config.checkpoint_every and step % config.checkpoint_every == 0):
                checkpoint.save(
                    run_dir, step, model, optimizer, scheduler,
                    {"rollouts": rollouts.state(), "loss_gen": loss_gen.get_state()},
                    {"skipped_steps": skipped, "cursor": cursor}, config.keep_checkpoints, student_dir,
                )  # fmt: skip
        bar.close()
        if not dp.main:
            return None
        eval_before = eval_after = None
        if config.eval.before_after:
            eval_before = json.loads((run_dir / "eval_before.json").read_text())
            log("[train] evaluating the student after training")
            eval_after = evaluate(model, link, config)
            runlog.write({"step": config.steps, "eval": eval_after, "final": True})
        runlog.close()
        final_dir = run_dir / "student"
        shutil.rmtree(final_dir, ignore_errors=True)
        shutil.copytree(checkpoint.latest(run_dir) / "student", final_dir)
        summary = {
            "config": config.model_dump(mode="json"),
            "teacher": {k: info.get(k) for k in ("model", "engine", "dtype", "tokenizer_sha256")},
            "eval_before": eval_before,
            "eval_after": eval_after,
            "steps": config.steps,
            "skipped_steps": skipped,
            "wall_time_s": round(time.monotonic() - start_time, 1),
            "run_dir": str(run_dir),
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if config.plot:
            from trainer.plot import plot_run

            plot_run(run_dir)
        return summary
    except TeacherError as exc:
        if exc.status is not None:  # a refused request is a bug here, not an outage
            raise
        # the teacher stayed away longer than the retries with back-off
        done = checkpoint.latest(run_dir)
        kept = f"the last checkpoint is {done.name}" if done else "no checkpoint was written yet"
        raise UserError(f"{exc}; {kept}: continue the run with --resume once the teacher is back") from None
    finally:
        link.close()
        dp.close()


# settings a resumed run may change: how long it runs, where its teacher is reached, what it logs; every
# other setting decides what the steps compute, and must stay as the run began
RESUME_FREE = ("steps", "out", "student", "threads", "checkpoint_every", "keep_checkpoints", "tensorboard", "plot",
               "eval.", "teacher.url", "teacher.api", "teacher.model", "teacher.engine", "teacher.api_key_env",
               "teacher.timeout_s", "teacher.retries", "teacher.max_concurrency", "teacher.request_sequences",
               "teacher.client_id")  # fmt: skip


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "tasks":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _check_resumed_settings(run_dir: Path, config: TrainConfig) -> None:
    """Refuse to resume with settings that change what the steps compute (loss, data, optimizer, ...)."""
    import yaml

    try:
        before = _flat(yaml.safe_load((run_dir / "config.yaml").read_text()) or {})
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return  # no readable record of the run's settings: nothing to compare with
    now = _flat(config.model_dump(mode="json"))
    changed = [key for key in now if key in before and before[key] != now[key] and not key.startswith(RESUME_FREE)]
    if changed:
        shown = ", ".join(f"{key}: {before[key]!r} -> {now[key]!r}" for key in changed[:4])
        raise UserError(f"--resume with settings that differ from the run's config.yaml ({shown}): resume with the "
                        "run's settings, or start a new run in another `out`")  # fmt: skip


def check_run_dir(run_dir: Path, student_dir: Path) -> None:
    """Refuse an `out` that is a file, lies under a file, or holds a model or a toy world (the run would
    write its `student/` over what is there)."""
    directory_path(run_dir, "out")
    if (run_dir / "student").resolve() == student_dir.resolve() or run_dir.resolve() == student_dir.resolve():
        raise UserError(f"out {str(run_dir)!r} would overwrite the student it trains ({student_dir}): choose another")
    for marker, what in (("build.json", "a toy world"), ("config.json", "a model")):
        if (run_dir / marker).is_file():
            raise UserError(f"out {str(run_dir)!r} holds {what} ({marker}), not a run: choose another directory")


def _load_student(path: Path):
    try:
        return toy.load_model(path)
    except Exception as exc:  # transformers and safetensors raise many kinds; each means "no loadable model here"
        raise UserError(f"cannot load the student model from {path}: {first_line(exc)}") from None


def _silent(*_args) -> None:
    return None


def _postfix(record: dict, last_eval: dict | None) -> dict:
    out = {"loss": f"{record.get('loss', float('nan')):.3f}"}
    if "k1" in record:
        out["k1"] = f"{record['k1']:.2f}"
    if "trust_share" in record:
        out["trust"] = f"{record['trust_share']:.2f}"
    if last_eval:
        out["acc"] = "/".join(f"{100 * a:.0f}" for a in last_eval["accuracy"].values())
    return out
