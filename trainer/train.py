"""The training loop: rollouts in flight, a trust-region loss, checkpoints, metrics, eval, summary.

`train()` is `Training(config)` (every refusal, the teacher checked, the student and optimizer ready, a checkpoint
restored), then `step()` per step, then `finish()` (eval, final student, summary). Each step:

for step in 1..steps:
    keep up to max_staleness + 1 batches sampled and sent to the teacher
    batch = oldest batch, with its teacher scores
    loss = the method's loss (trainer/methods.py) of the student's and teacher's scores   # skipped if non-finite
    optimizer step; metrics; eval every K steps; checkpoint every C steps

The student's scores come from `trainer.student.StudentStep`: chunks of positions through the output head, and
micro-batches with gradient accumulation, so that a large vocabulary's logits never exist for the whole batch.
"""

from __future__ import annotations

import gc
import json
import math
import shutil
import time
from collections import deque
from pathlib import Path

import torch

from services.teacher.client import TeacherError
from trainer import checkpoint
from trainer.config import TrainConfig, dump_config
from trainer.data.files import model_vocab_size
from trainer.data.source import PromptSource, SourceOpener
from trainer.evaluation import evaluate, pick_verifier
from trainer.methods import compute_loss, method_of
from trainer.models import (
    autocast_dtype,
    decoder_layers,
    empty_student,
    load_student,
    quiet_transformers,
    resolve_dtype,
)
from trainer.parallel import DataParallel, resolve_device
from trainer.pipeline import Batch, Pending, Rollouts
from trainer.plan import check_fits, chunk_tokens, plan_run
from trainer.rollout.decode import resolve_compile
from trainer.rollout.vllm_engine import VLLMRollout, resolve_engine
from trainer.rundir import SUMMARY_KEYS, check_resumed_models, check_start, teacher_identity
from trainer.runlog import RunLog
from trainer.student import LanguageModelView, ScoringModule, StudentStep
from trainer.teacher_link import Teachers
from tropd.errors import UserError, first_line
from tropd.machine import torch_threads


def restored_inflight(saved: list | None, dp: DataParallel, top_k: int, ckpt: Path) -> list[Pending]:
    """This rank's batches that were sampled ahead of the checkpoint (max_staleness > 0), so that a resumed run
    trains on exactly the batches the uninterrupted run would have; older checkpoints hold none."""
    if not saved or not any(saved):
        return []
    if len(saved) != dp.world:
        raise UserError(
            f"--resume: {ckpt} holds batches sampled ahead by {len(saved)} ranks; resume with {len(saved)} ranks "
            "(or from a run with max_staleness=0)"
        )
    return [Pending.restored(batch, top_k) for batch in saved[dp.rank]]


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


class Student:
    """The student model, its scoring module (wrapped for data parallelism) and how it runs a batch."""

    def __init__(self, config: TrainConfig, path: Path, source: PromptSource, dp: DataParallel):
        self.config, self.source, self.device = config, source, dp.device
        if dp.sharded and not dp.main:  # FSDP: rank 0 reads the weights, the others get their shards from it
            self.model = empty_student(path, config.gradient_checkpointing).train()
        else:
            self.model = load_student(path, dp.device, config.gradient_checkpointing).train()
        vocab = self.model.get_output_embeddings().weight.shape[0]
        self.chunk = chunk_tokens(config, vocab)
        self.scorer = ScoringModule(self.model, self.chunk, model_logits=self.chunk == 0)
        self.module = dp.wrap(self.scorer, decoder_layers(self.model))  # FSDP2 shards the scorer in place
        # under FSDP every forward gathers shards: the sampler runs through the sharded root, in lockstep
        self.sampler = LanguageModelView(self.module) if dp.sharded else self.model
        self.autocast = autocast_dtype(config)

    def step(self, batch: Batch, top_ids_B_T_K, **wants) -> StudentStep:
        return StudentStep(
            self.module, batch.prompts, batch.responses, self.source.pad_id, top_ids_B_T_K,
            micro_batch_sequences=self.config.rollout.micro_batch_sequences, device=self.device,
            autocast_dtype=self.autocast, **wants,
        )  # fmt: skip

    @torch.no_grad()
    def logprobs(self, prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
        """log p_S of each response token (B_T, CPU, 0 on padding), without gradient."""
        run = StudentStep(
            self.scorer, prompts, responses, self.source.pad_id, None,
            micro_batch_sequences=self.config.rollout.micro_batch_sequences or len(prompts), device=self.device,
            autocast_dtype=self.autocast,
        )  # fmt: skip
        return (run.scores().lp_B_T.detach() * run.mask_B_T).float().cpu()


def _on(device: torch.device, t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(device, non_blocking=True)


def batch_on(batch: Batch, device: torch.device) -> Batch:
    """The batch's tensors on `device` (a copy of the record; lists stay)."""
    import dataclasses

    moved = {f.name: _on(device, getattr(batch, f.name)) for f in dataclasses.fields(batch)
             if isinstance(getattr(batch, f.name), torch.Tensor)}  # fmt: skip
    return dataclasses.replace(batch, **moved)


def train(config: TrainConfig, open_source: SourceOpener, resume: bool = False, log=print) -> dict | None:
    """Run (or resume) training on the prompts of `open_source(config.data, ...)` (the sources by name are in
    `trainer.run`); returns the summary (on rank 0; None on other ranks)."""
    from tqdm import tqdm

    run = Training(config, open_source, resume, log)  # every refusal, before any step; the teacher checked
    try:
        run.evaluate_before()
        bar = tqdm(range(run.done + 1, config.steps + 1), desc=config.loss.method, unit="step", dynamic_ncols=True,
                   mininterval=1.0, disable=not run.dp.main)  # fmt: skip
        for step in bar:
            record = run.step(step, warn=tqdm.write)
            if record is not None:
                bar.set_postfix(_postfix(record, run.last_eval), refresh=False)
        bar.close()
        summary = run.finish()
        run.dp.barrier()  # every rank is done before any tears its process group down (see `close`)
        return summary
    except TeacherError as exc:
        raise run.teacher_error(exc) from None
    finally:
        run.close()


class Training:
    """One run: prepared (refusals, teacher check, student, optimizer, restored state), stepped, finished."""

    def __init__(self, config: TrainConfig, open_source: SourceOpener, resume: bool, log=print):
        self.device = resolve_device(config.device)
        # `dtype: auto` resolved here, so that config.yaml, a resume's check and every part see the run's precision
        config = config.model_copy(update={"dtype": resolve_dtype(config.dtype, self.device)})
        self.config, self.run_dir, self.student_dir = config, Path(config.out), Path(config.student)
        ckpt = check_start(config, self.run_dir, self.student_dir, resume)
        self.source = open_source(config.data, self.student_dir, config.seed, log)  # a bad data file stops here
        self.verifier = pick_verifier(config, self.source)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls (a float32 run's) on tensor cores
            torch.backends.cudnn.allow_tf32 = True
        global_batch = config.rollout.prompts_per_step * config.rollout.samples_per_prompt
        self.dp = DataParallel(
            global_batch, self.device, config.parallel, config.dist.timeout_s, autocast_dtype(config)
        )
        torch.set_num_threads(torch_threads(config.threads, share=self.dp.local_world))
        torch.manual_seed(config.seed)
        quiet_transformers()
        self.log = log if self.dp.main else _silent
        self.link = self.engine = None
        try:
            self.rollout_engine = resolve_engine(config, self.device, self.dp.world)  # a refusal stops here
            # before anything large is allocated (the teacher in process, the student): a run that cannot fit stops
            self.plan = plan_run(config, self.source.longest_prompt(), str(self.device), self.dp.world,
                                 self.rollout_engine)  # fmt: skip
            self.log(f"[train] memory plan: peak {self.plan.peak_bytes / 2**30:.2f} GiB per device "
                     f"({self.plan.peak_phase}) of {self.plan.limit_bytes / 2**30:.2f} GiB")  # fmt: skip
            check_fits(self.plan)
            self.link = Teachers(config.teacher_sections())
            self._prepare(ckpt, resume)
        except BaseException:
            self.close()
            raise

    def _prepare(self, ckpt: Path | None, resume: bool) -> None:
        config, dp, run_dir, log = self.config, self.dp, self.run_dir, self.log
        self.infos = self.link.check(str(self.student_dir), config.top_k(), model_vocab_size(self.student_dir))
        if ckpt is not None:
            check_resumed_models(run_dir, ckpt, self.student_dir, self.infos)
        if dp.main:  # a teacher refused above leaves no run directory behind
            run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(config, run_dir / "config.yaml")
            (run_dir / "teacher.json").write_text(json.dumps(teacher_identity(self.infos), indent=2))
        if self.link.named:
            for name, section in config.teacher_sections().items():
                where = "in process" if section.api == "inprocess" else section.url
                log(f"[train] teacher {name!r}: {self.infos[name].get('model')} ({where})")
        # a sharded checkpoint holds no whole weights: the student starts from its own, and the shards are read below
        weights = ckpt / "student" if ckpt is not None and not checkpoint.is_sharded(ckpt) else self.student_dir
        self.student = student = Student(config, weights, self.source, dp)
        self.model = student.model
        log(f"[train] student on {self.device} ({config.dtype}), output head in chunks of {student.chunk} positions"
            if student.chunk else f"[train] student on {self.device} ({config.dtype})")  # fmt: skip
        compiled = resolve_compile(config.rollout.compile, student.sampler)  # an unsupported `true` stops here
        if self.rollout_engine == "torch":
            how = "over a static KV cache, the decode step compiled" if compiled else "with the model's own cache"
            log(f"[train] rollouts on the trainer's own loop (rollout.engine=torch), {how} (rollout.compile)")
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay,
            fused=True if self.device.type == "cuda" else None,  # one kernel for all parameters on CUDA
        )  # fmt: skip
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config))
        if self.rollout_engine == "vllm":
            log("[train] rollouts on vLLM (rollout.engine), in this process, its weights synced from the trainer's "
                f"every {config.rollout.sync_every} step(s)")  # fmt: skip
            r, budget = config.rollout, max(config.rollout.max_new_tokens, config.eval.max_new_tokens or 0)
            longest = self.source.longest_prompt() + budget
            self.engine = VLLMRollout(self.student_dir, dtype=config.dtype, max_model_len=longest, seed=config.seed,
                                      cache_tokens=r.sample_batch_tokens or longest * r.prompts_per_step,
                                      memory_share=r.vllm_memory_share, world=dp.world)  # fmt: skip
        self.rollouts = Rollouts(config, student.sampler, self.link, self.source, student.logprobs, rank=dp.rank,
                                 world=dp.world, all_done=dp.all_true if dp.sharded else None,
                                 engine=self.engine, trained=self.model)  # fmt: skip
        self.loss_gen = torch.Generator().manual_seed(config.seed + 1)
        self.method = method_of(config)
        self.done, self.skipped, self.cursor = 0, 0, 0
        self.inflight: deque = deque()  # batches sampled ahead (max_staleness > 0), their scores on the way
        if ckpt is not None:
            blob, state = checkpoint.load_state(ckpt)  # a damaged checkpoint is a UserError naming it
            if checkpoint.is_sharded(ckpt):
                try:
                    dp.load_sharded(student.module, self.optimizer, ckpt / checkpoint.SHARDED)
                except (OSError, RuntimeError, ValueError, KeyError) as exc:  # DCP's reader: missing or bad shards
                    raise UserError(f"checkpoint {ckpt} is damaged ({first_line(exc)}): remove it to resume from "
                                    "the one before") from None  # fmt: skip
            else:
                dp.load_optimizer(student.module, self.optimizer, blob["optimizer"])
            self.scheduler.load_state_dict(blob["scheduler"])
            self.rollouts.load_state(blob["cursor"]["rollouts"])
            self.loss_gen.set_state(blob["cursor"]["loss_gen"])
            self.done, self.skipped, self.cursor = state["step"], state["skipped_steps"], state["cursor"]
            self.inflight.extend(restored_inflight(blob["cursor"].get("inflight"), dp, self.rollouts.top_k, ckpt))
            log(f"[train] resuming {run_dir} from {ckpt.name} (step {self.done})")
        elif resume:
            log(f"[train] no checkpoint in {run_dir}: starting from step 0")
        self.next_sample = self.done + 1 + len(self.inflight)
        self.runlog = RunLog(run_dir, config.tensorboard, self.done) if dp.main else None
        self.last_eval: dict | None = None
        self.start_time = time.monotonic()

    def run_eval(self) -> dict | None:
        """On every rank, each with its share of the prompts; rank 0 gets the result, the others None."""
        self.rollouts.sync_engine()  # the engine samples eval's rows with the weights of this moment
        return evaluate(self.student.sampler, self.link, self.source, self.config, self.verifier,
                        self.student.logprobs, self.dp, self.engine)  # fmt: skip

    def evaluate_before(self) -> None:
        config, dp, run_dir = self.config, self.dp, self.run_dir
        need = config.eval.before_after and (self.done == 0 or not (run_dir / "eval_before.json").is_file())
        if not dp.all_true(not need):  # the same answer on every rank
            self.log("[train] evaluating the student before training")
            result = self.run_eval()
            if dp.main:
                (run_dir / "eval_before.json").write_text(json.dumps(result))
        self.start_time = time.monotonic()

    def step(self, step: int, warn=print) -> dict | None:
        """One optimizer step (skipped when a teacher value, the loss or the gradient is not finite); eval and
        checkpoint when due. Returns the step's metrics record on rank 0, None on the others."""
        config, dp, device, model = self.config, self.dp, self.device, self.model
        peaks = PhasePeaks(device)
        t0 = time.perf_counter()
        while len(self.inflight) < config.max_staleness + 1 and self.next_sample <= config.steps:
            self.inflight.append(self.rollouts.make(self.next_sample))
            self.next_sample += 1
            self.cursor += config.rollout.prompts_per_step
        t_sampled = time.perf_counter()
        peaks.end("rollout")
        batch = batch_on(self.inflight.popleft().resolve(), device)
        t_scored = time.perf_counter()
        peaks.end("score")
        model.train()
        mask = batch.mask_B_T
        record = {"step": step, "cursor": self.cursor - config.max_staleness * config.rollout.prompts_per_step}
        finite_teacher = batch.teacher_lp_B_T is None or bool(torch.isfinite(batch.teacher_lp_B_T[mask]).all())
        uniform = None
        if self.method.uniforms(config.loss):  # drawn on every rank, every step
            uniform = dp.uniforms(self.loss_gen, *mask.shape).to(device)
        top_ids = batch.teacher_top_ids_B_T_K if self.rollouts.top_k else None
        run = self.student.step(batch, top_ids, entropy=self.method.entropy, argmax=self.method.argmax)
        scores = run.scores()
        loss, metrics = compute_loss(config, batch, scores, step, uniform) if finite_teacher else (None, {})
        ok = loss is not None and bool(torch.isfinite(loss))
        grad_norm = math.nan
        self.optimizer.zero_grad(set_to_none=True)
        if dp.world > 1:  # every rank must run backward (DDP reduces there); a bad rank contributes zero
            share = batch.tokens * dp.world / max(1.0, dp.total(batch.tokens))
            loss = loss * share if ok else None
            ok = dp.all_ok(ok)
        if ok or dp.world > 1:
            run.backward(loss)
            grad_norm = _norm(torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip))
            ok = ok and math.isfinite(grad_norm)
        if ok:
            self.optimizer.step()
            self.rollouts.weights_moved()
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            warn(f"[train] step {step}: non-finite teacher value, loss or gradient; step skipped")
        self.scheduler.step()
        t_done = time.perf_counter()
        by_teacher = self.link.latencies()
        latencies = [s for seconds in by_teacher.values() for s in seconds]
        record.update({k: float(v) for k, v in metrics.items()})
        if self.link.named:
            record["by_teacher"] = per_teacher(batch, scores.lp_B_T, by_teacher)
        if batch.sampler_lp_B_T is not None:
            record.update(rollout_mismatch(batch, scores.lp_B_T, step, config.rollout, warn))
            record["rollout_sync_s"], self.rollouts.sync_s = self.rollouts.sync_s, 0.0
        record.update(
            {
                "source": batch.source,
                "prefix_share": float(batch.prefix_mask_B_T.sum()) / max(1, batch.tokens),
                "response_tokens": batch.tokens,
                "prompt_tokens": sum(len(p) for p in batch.prompts),
                "grad_norm": grad_norm,
                "lr": self.scheduler.get_last_lr()[0],
                "skipped_steps": self.skipped,
                "teacher_latency_s": sum(latencies) / len(latencies) if latencies else 0.0,
                "sample_s": t_sampled - t0,
                "wait_teacher_s": t_scored - t_sampled,
                "step_s": t_done - t0,
                "tokens_per_s": batch.tokens / max(1e-9, t_done - t0),
            }
        )
        if device.type == "cuda":
            peaks.end("step")
            record.update(peaks.record)  # peak_memory_mb over the step, and peak_<phase>_mb for each phase
        if config.eval.every and step % config.eval.every == 0 and step < config.steps:
            self.last_eval = record["eval"] = self.run_eval()
        due = step == config.steps or (config.checkpoint_every and step % config.checkpoint_every == 0)
        # collectives: under FSDP every rank writes its shards of the state, else rank 0 takes the whole state; every
        # rank gathers its batches sampled ahead
        full_state = None
        if due and dp.sharded:
            staging = checkpoint.staging(self.run_dir, step)
            if dp.main:
                shutil.rmtree(staging, ignore_errors=True)
            dp.barrier()
            dp.save_sharded(self.student.module, self.optimizer, staging / checkpoint.SHARDED)
        elif due:
            full_state = dp.full_state(model, self.student.module, self.optimizer)
        ahead = dp.gather([pending.saved() for pending in self.inflight]) if due else None
        export = bool(config.export_every) and step % config.export_every == 0 and step < config.steps
        whole = dp.full_model_state(model) if export else None  # a collective under FSDP
        if not dp.main:
            return None
        if export:
            checkpoint.export(self.run_dir, step, model, self.student_dir, whole)
        self.runlog.write(record)
        if due:
            checkpoint.save(
                self.run_dir, step, model, self.optimizer, self.scheduler,
                {"rollouts": self.rollouts.state(), "loss_gen": self.loss_gen.get_state(), "inflight": ahead},
                {"skipped_steps": self.skipped, "cursor": self.cursor}, config.keep_checkpoints, self.student_dir,
                full_state, sharded=dp.sharded,
            )  # fmt: skip
        return record

    def finish(self) -> dict | None:
        """Eval after training, the final student and summary.json (rank 0: the summary; others: None)."""
        config, run_dir = self.config, self.run_dir
        if config.eval.before_after:
            self.log("[train] evaluating the student after training")
        eval_after = self.run_eval() if config.eval.before_after else None
        # FSDP's checkpoints hold no whole student: gathered here (a collective), a tensor at a time to CPU
        whole = self.dp.full_model_state(self.model)
        if not self.dp.main:
            return None
        eval_before = None
        if config.eval.before_after:
            eval_before = json.loads((run_dir / "eval_before.json").read_text())
            self.runlog.write({"step": config.steps, "eval": eval_after, "final": True})
        self.runlog.close()
        final_dir = run_dir / "student"
        shutil.rmtree(final_dir, ignore_errors=True)
        if whole is not None:
            checkpoint.write_student(final_dir, self.model, self.student_dir, whole)
        else:
            shutil.copytree(checkpoint.latest(run_dir) / "student", final_dir)
        teachers = teacher_identity(self.infos, SUMMARY_KEYS)
        summary = {
            "config": config.model_dump(mode="json"),
            **(teachers if "teachers" in teachers else {"teacher": teachers}),  # the one teacher, or several by name
            "teacher_requests": self.link.replica_requests(),  # per replica URL, this rank's
            "eval_before": eval_before,
            "eval_after": eval_after,
            "steps": config.steps,
            "skipped_steps": self.skipped,
            "wall_time_s": round(time.monotonic() - self.start_time, 1),
            "run_dir": str(run_dir),
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if config.plot:
            from trainer.plot import plot_run

            plot_run(run_dir)
        return summary

    def teacher_error(self, exc: TeacherError) -> UserError:
        """The one-line error for a teacher that refused or stayed away mid-run, naming the last checkpoint."""
        done = checkpoint.latest(self.run_dir)
        kept = f"the last checkpoint is {done.name}" if done else "no checkpoint was written yet"
        if exc.status is not None:  # refused after the start-up check: a rotated key, a restarted teacher's limits
            cause = f"the teacher refused a request (HTTP {exc.status}: {first_line(exc)})"
            return UserError(f"{cause}; {kept}: fix the cause (the API key, the teacher's limits) and continue the "
                             "run with --resume")  # fmt: skip
        # the teacher stayed away longer than the retries with back-off
        return UserError(f"{exc}; {kept}: continue the run with --resume once the teacher is back")

    def close(self) -> None:
        try:
            if self.link is not None:
                self.link.close()
            if self.engine is not None:
                self.engine.close()
        finally:
            # DDP's reducer holds the process group: released here, while the other ranks are still up, not when
            # this object is collected after they have exited (gloo's destructor then waits for them forever)
            self.student = self.model = self.optimizer = self.rollouts = None
            gc.collect()
            self.dp.close()


def rollout_mismatch(batch: Batch, trainer_lp_B_T: torch.Tensor, step: int, rollout, warn) -> dict:
    """How far the rollout engine's log-probs of the tokens it sampled are from the trainer's own (both at
    temperature 1, neither masked): `rollout_mismatch_k1`, the mean of sampler minus trainer (an estimate of
    KL(sampler || trainer) on the sampler's tokens), `rollout_mismatch_max`, the largest gap, and
    `rollout_is_weight_mean`, the mean truncated importance weight min(p_trainer / p_sampler, rollout.is_clip).
    Past `rollout.mismatch_warn` a warning: the engine samples from other weights than the trainer's (a sync that
    did not happen) or computes them differently (kernels, precision)."""
    sampled_B_T = batch.mask_B_T & ~batch.prefix_mask_B_T
    if not bool(sampled_B_T.any()):
        return {}
    gap = (batch.sampler_lp_B_T.to(trainer_lp_B_T.device) - trainer_lp_B_T.detach().float())[sampled_B_T]
    k1, largest = float(gap.mean()), float(gap.abs().max())
    if k1 > rollout.mismatch_warn:
        warn(f"[train] step {step}: the rollout engine's log-probs exceed the trainer's by {k1:.3f} nats/token "
             f"(rollout_mismatch_k1 > rollout.mismatch_warn={rollout.mismatch_warn}): its weights or arithmetic are "
             "not the trainer's")  # fmt: skip
    record = {"rollout_mismatch_k1": k1, "rollout_mismatch_max": largest}
    if rollout.is_clip:
        record["rollout_is_weight_mean"] = float(torch.exp(-gap).clamp(max=rollout.is_clip).mean())
    return record


def per_teacher(batch: Batch, student_lp_B_T: torch.Tensor, latencies: dict[str, list[float]]) -> dict:
    """Each teacher's share of a step: `k1` (the mean of log p_S - log p_T over its rows' response tokens, as the
    step's `k1`), `response_tokens` and `teacher_latency_s` (the mean seconds of its scoring calls)."""
    out = {}
    for name, seconds in latencies.items():
        rows = torch.tensor([t == name for t in batch.teachers or []], dtype=torch.bool, device=batch.mask_B_T.device)
        entry = {"teacher_latency_s": sum(seconds) / len(seconds) if seconds else 0.0}
        if rows.numel():
            mask_B_T = batch.mask_B_T & rows[:, None]
            entry["response_tokens"] = int(mask_B_T.sum())
            if batch.teacher_lp_B_T is not None and entry["response_tokens"]:
                d = (student_lp_B_T.detach().float() - batch.teacher_lp_B_T)[mask_B_T]
                entry["k1"] = float(d.mean())
        out[name] = entry
    return out


class PhasePeaks:
    """On CUDA, the peak memory allocated (`torch.cuda.max_memory_allocated`, MB) in each phase of a step:
    `peak_rollout_mb`, `peak_score_mb` (waiting for the teacher's scores), `peak_step_mb`; and `peak_memory_mb`, the
    highest. Nothing on CPU."""

    def __init__(self, device: torch.device):
        self.device, self.record = device, {}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def end(self, phase: str) -> None:
        if self.device.type != "cuda":
            return
        peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        self.record[f"peak_{phase}_mb"] = peak
        self.record["peak_memory_mb"] = max(peak, self.record.get("peak_memory_mb", 0.0))
        torch.cuda.reset_peak_memory_stats(self.device)


def _norm(value) -> float:
    """A gradient norm as a float (FSDP2 returns a DTensor)."""
    return float(value.full_tensor() if hasattr(value, "full_tensor") else value)


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
