"""Refusals about the run directory, before any work: an `out` that would overwrite something else, and a
`--resume` whose settings, student tokenizer or teacher differ from the run's."""

from __future__ import annotations

import json
from pathlib import Path

from services.teacher.protocol import tokenizer_fingerprint
from trainer import checkpoint
from trainer.config import TrainConfig
from trainer.runlog import flatten
from tropd.errors import UserError
from tropd.modeldir import check_model_dir
from tropd.paths import directory_path

# settings a resumed run may change: how long it runs, where its teacher is reached, what it logs; every
# other setting decides what the steps compute, and must stay as the run began
# (devices, chunking and micro-batches change where and how, not what: tested equal)
# (`student` and `teacher.model` are paths: the tokenizer and the teacher behind them are compared by fingerprint)
RESUME_FREE = ("steps", "out", "student", "threads", "checkpoint_every", "keep_checkpoints", "export_every",
               "tensorboard", "plot", "eval.", "teacher.url", "teacher.api", "teacher.model", "teacher.engine",
               "teacher.api_key_env",
               "teacher.resolve_replicas", "teacher.skip_tokenizer_check",
               "teacher.timeout_s", "teacher.retries", "teacher.max_concurrency", "teacher.request_sequences",
               "teacher.client_id", "memory_limit_gb", "dist.", "device", "parallel", "gradient_checkpointing",
               "loss_chunk_tokens",
               "rollout.micro_batch_sequences", "rollout.sample_batch_tokens", "rollout.compile")  # fmt: skip


TEACHER_KEYS = ("model", "engine", "dtype", "tokenizer_sha256", "chat_template_sha256", "vocab_size")
SUMMARY_KEYS = ("model", "engine", "dtype", "tokenizer_sha256")  # of each teacher, in summary.json


def resume_free(key: str) -> bool:
    """Whether a resumed run may change the setting `key` (dotted): RESUME_FREE's, and a named teacher's
    (`teachers.NAME.url`) where the one teacher's (`teacher.url`) may change."""
    if key.startswith("teachers."):
        name_and_rest = key.removeprefix("teachers.")
        rest = name_and_rest.split(".", 1)[1] if "." in name_and_rest else ""
        return ("teacher." + rest).startswith(RESUME_FREE)
    return key.startswith(RESUME_FREE)


def teacher_identity(infos: dict[str, dict], keys=TEACHER_KEYS) -> dict:
    """What teacher.json (and summary.json, with fewer `keys`) keeps of the run's teachers: the one teacher's keys
    as they are, several teachers' by name under `teachers`."""
    by_name = {name: {k: info.get(k) for k in keys} for name, info in infos.items()}
    return next(iter(by_name.values())) if len(by_name) == 1 else {"teachers": by_name}


def check_resumed_models(run_dir: Path, ckpt: Path, student_dir: Path, infos: dict[str, dict]) -> None:
    """Refuse to resume against another teacher (its model name or tokenizer, from teacher.json; with several, each
    by name, and no name added or dropped) or with a student directory whose tokenizer is not the checkpoint's. A
    teacher's URL may change."""
    if tokenizer_fingerprint(student_dir) != tokenizer_fingerprint(ckpt / "student"):
        raise UserError(f"--resume: the tokenizer of student {student_dir} differs from the one the run trained with "
                        f"({ckpt / 'student'}): resume with the run's student")  # fmt: skip
    try:
        before = json.loads((run_dir / "teacher.json").read_text())
    except (OSError, ValueError):
        return  # runs made before teacher.json existed
    # by name, as `infos` (the one teacher is named "teacher")
    was = before["teachers"] if "teachers" in before else {"teacher": before}
    if set(was) != set(infos):
        raise UserError(f"--resume with other teachers ({_names(was)} -> {_names(infos)}): the steps would "
                        "compute something else; resume with the run's teachers, or start a new run in another "
                        "`out`")  # fmt: skip
    for name, info in infos.items():
        for key in ("model", "tokenizer_sha256", "chat_template_sha256"):
            old = was[name].get(key)
            if old is not None and info.get(key) is not None and old != info[key]:
                which = "another teacher" if len(infos) == 1 else f"another teacher {name!r}"
                raise UserError(f"--resume against {which} ({key}: {str(old)[:24]!r} -> {str(info[key])[:24]!r}): "
                                "the steps would compute something else; resume against the run's teacher, or start "
                                "a new run in another `out`")  # fmt: skip


def _names(teachers: dict) -> str:
    return ", ".join(teachers) if len(teachers) > 1 else "one teacher"


def check_resumed_settings(run_dir: Path, config: TrainConfig) -> None:
    """Refuse to resume with settings that change what the steps compute (loss, data, optimizer, ...)."""
    import yaml

    try:
        before = flatten(yaml.safe_load((run_dir / "config.yaml").read_text()) or {})
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        raise UserError(f"--resume: {run_dir} has checkpoints but no readable config.yaml, so its settings cannot be "
                        "checked: start a new run in another `out`") from None  # fmt: skip
    now = flatten(config.model_dump(mode="json"))
    changed = [key for key in now if key in before and before[key] != now[key] and not resume_free(key)]
    if changed:
        shown = ", ".join(f"{key}: {before[key]!r} -> {now[key]!r}" for key in changed[:4])
        raise UserError(f"--resume with settings that differ from the run's config.yaml ({shown}): resume with the "
                        "run's settings, or start a new run in another `out`")  # fmt: skip


def check_start(config: TrainConfig, run_dir: Path, student_dir: Path, resume: bool) -> Path | None:
    """Every refusal that needs no model and no teacher: the student and run directories, a run that would
    be overwritten or cannot be continued, settings a resumed run may not change. Returns the checkpoint to
    resume from (None: start at step 0)."""
    check_model_dir(student_dir, "student")
    check_run_dir(run_dir, student_dir)
    for name, teacher in config.teacher_sections().items():
        if teacher.api == "inprocess":
            check_model_dir(teacher.model, f"{config.teacher_key(name)}.model")
    ckpt = checkpoint.latest(run_dir) if resume else None
    if not resume and (run_dir / "metrics.jsonl").is_file():
        raise UserError(f"run directory {run_dir} already holds a run: pass --resume, or choose another `out`")
    if resume and ckpt is None and (run_dir / "summary.json").is_file():
        raise UserError(f"run directory {run_dir} holds a finished run without checkpoints: nothing to resume from "
                        "(starting again would overwrite it); choose another `out`")  # fmt: skip
    if ckpt is not None:
        check_resumed_settings(run_dir, config)
        if checkpoint.step_of(ckpt) > config.steps:
            raise UserError(f"--resume: the last checkpoint of {run_dir} is at step {checkpoint.step_of(ckpt)}, past "
                            f"steps={config.steps}: give steps >= {checkpoint.step_of(ckpt)}")  # fmt: skip
    return ckpt


def check_run_dir(run_dir: Path, student_dir: Path) -> None:
    """Refuse an `out` that is a file, lies under a file, or holds a model or a toy world (the run would
    write its `student/` over what is there)."""
    directory_path(run_dir, "out")
    if (run_dir / "student").resolve() == student_dir.resolve() or run_dir.resolve() == student_dir.resolve():
        raise UserError(f"out {str(run_dir)!r} would overwrite the student it trains ({student_dir}): choose another")
    for marker, what in (("build.json", "a toy world"), ("config.json", "a model")):
        if (run_dir / marker).is_file():
            raise UserError(f"out {str(run_dir)!r} holds {what} ({marker}), not a run: choose another directory")
