"""Prompt sources: where the trainer's prompts, stop ids and verifier come from.

A source gives prompt token ids (as the student reads them: chat template applied), an optional reference answer,
and the student tokenizer's facts the trainer needs (stop ids, pad id, ids never to sample, decoding). The trainer
core draws from a source and knows no toy vocabulary and no toy task. Two sources, chosen by `data.source` in
`trainer.run` (the loop never names one):

    data.source: files    your JSONL / JSON / Parquet files or `datasets` save_to_disk folders (`FileSource`, here)
    data.source: toy      the toy world's task mix (`trainer.toy.source.ToySource`)

Files are read with Hugging Face `datasets`, locally (no hub access). A record holds `messages` (a chat, rendered by
the student tokenizer's chat template with the generation prompt) or `prompt` (plain text), and optionally `answer`.
Every problem with a file (missing, unreadable, a record without the prompt field, a bad chat role, a template error)
is a one-line `UserError` naming the file, the line (JSONL) or row, and the field, raised before any training step.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

from trainer.config import DataConfig, DataFile, EvalConfig, file_path, file_teacher
from trainer.data.source import Prompt
from tropd.errors import UserError, first_line

ROLES = ("system", "user", "assistant", "tool")
TEACHER_FIELDS = ("teacher_messages", "teacher_prompt")  # a record's context for the teacher alone
SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def stop_ids_of(model_dir: str | Path, tokenizer) -> tuple[int, ...]:
    """The union of the tokenizer's eos and the eos ids of the model's config.json and generation_config.json
    (each an int or a list: Qwen lists <|im_end|> and <|endoftext|>)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for name in ("config.json", "generation_config.json"):
        path = Path(model_dir) / name
        try:
            eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id") if path.is_file() else None
        except (OSError, ValueError, AttributeError):
            eos = None
        for value in eos if isinstance(eos, list) else [eos]:
            if isinstance(value, int):
                ids.add(value)
    return tuple(sorted(ids))


def load_tokenizer(student_dir: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(student_dir))
    except Exception as exc:  # transformers raises many kinds; all mean "no usable tokenizer there"
        raise UserError(f"cannot load the student's tokenizer from {student_dir}: {first_line(exc)}") from None


def model_vocab_size(model_dir: str | Path) -> int | None:
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return size if isinstance(size, int) else None


class FileSource:
    """Prompts from the user's files, tokenized once at start with the student's tokenizer."""

    def __init__(self, config: DataConfig, student_dir: str | Path, seed: int, log=print):
        self.config = config
        self.tokenizer = tok = load_tokenizer(student_dir)
        self.stop_ids = stop_ids_of(student_dir, tok)
        if not self.stop_ids:
            raise UserError(f"the student's tokenizer and config in {student_dir} name no eos token: responses would "
                            "never stop; set eos_token_id in its generation_config.json")  # fmt: skip
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.stop_ids[0]
        self.banned_ids = ()
        rows = model_vocab_size(student_dir)
        self.vocab_limit = len(tok) if rows is not None and rows > len(tok) else None
        self.template = self._template(config.chat_template)
        train = [p for entry in config.train for p in self._read(entry, log)]
        if config.eval:
            self.evals = {_set_name(file_path(entry)): self._read(entry, log) for entry in config.eval}
        else:  # a held-out share of train, fixed by the seed
            order = list(range(len(train)))
            random.Random(f"eval-split/{seed}").shuffle(order)
            n_eval = min(len(train) - 1, math.ceil(config.eval_share * len(train)))
            held = set(order[:n_eval])
            self.evals = {"heldout": [train[i] for i in sorted(held)]} if held else {"train": train}
            if held and len({p.teacher for p in train}) > 1:  # files of several teachers: a held-out set each
                self.evals = {f"heldout-{t}" if t else "heldout": [p for p in self.evals["heldout"] if p.teacher == t]
                              for t in dict.fromkeys(p.teacher for p in train)}  # fmt: skip
                self.evals = {name: prompts for name, prompts in self.evals.items() if prompts}
            train = [p for i, p in enumerate(train) if i not in held]
        if not train:
            raise UserError("data.train: no usable prompt in " + ", ".join(map(file_path, config.train)))
        self.train = train
        self.has_answers = all(p.answer is not None for prompts in self.evals.values() for p in prompts)
        sizes = ", ".join(f"{name} {len(prompts)}" for name, prompts in self.evals.items())
        log(f"[data] {len(train)} training prompts; eval: {sizes}")

    def draw(self, rng: random.Random, n: int) -> list[Prompt]:
        return [rng.choice(self.train) for _ in range(n)]

    def eval_sets(self, config: EvalConfig) -> dict[str, list[Prompt]]:
        return {name: prompts[: config.n] for name, prompts in self.evals.items() if prompts}

    def kl_prompts(self, config: EvalConfig) -> list[Prompt]:
        sets = [prompts for prompts in self.evals.values() if prompts]
        per_set = max(1, config.kl_prompts // len(sets))
        return [p for prompts in sets for p in prompts[:per_set]]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def longest_prompt(self) -> int:
        return max(max(len(p.ids), len(p.teacher_ids or ())) for prompts in (self.train, *self.evals.values())
                   for p in prompts)  # fmt: skip

    def default_verifier(self) -> str:
        return "exact" if self.has_answers else "none"

    def verifiers(self) -> dict:
        return {}

    # ---- reading ------------------------------------------------------------------------------------------------

    def _template(self, choice: str) -> str | None:
        if choice == "auto":
            return None  # the tokenizer's own
        path = Path(choice)
        if path.suffix != ".jinja" or not path.is_file():
            raise UserError(f"data.chat_template {choice!r}: give `auto` or an existing .jinja file")
        return path.read_text(encoding="utf-8")

    def _read(self, entry: str | DataFile, log) -> list[Prompt]:
        path, teacher = file_path(entry), file_teacher(entry)
        dataset = read_dataset(path)
        c = self.config
        columns = list(dataset.column_names)
        field_name = c.prompt_field
        if field_name == "auto":
            field_name = "messages" if "messages" in columns else "prompt" if "prompt" in columns else None
            if field_name is None:
                raise UserError(f"{path}: records have neither `messages` nor `prompt` (fields: {', '.join(columns)});"
                                " set data.prompt_field")  # fmt: skip
        elif field_name not in columns:
            raise UserError(f"{path}: unknown field data.prompt_field={field_name!r} (fields: {', '.join(columns)})")
        lines = _jsonl_lines(path)
        out, skipped = [], 0
        for row, record in enumerate(dataset):
            where = f"{path} line {lines[row]}" if lines else f"{path} row {row + 1}"
            ids = self._encode(record.get(field_name), field_name, where)
            context = self._teacher_context(record, where)
            if max(len(ids), len(context or ())) > c.max_prompt_tokens:
                skipped += 1
                continue
            answer = record.get(c.answer_field)
            out.append(Prompt(ids, None if answer is None else str(answer), record, teacher, context))
        if skipped:
            log(f"[data] {path}: skipped {skipped} of {len(dataset)} prompts (or teacher contexts) longer than "
                f"data.max_prompt_tokens={c.max_prompt_tokens}")  # fmt: skip
        return out

    def _teacher_context(self, record: dict, where: str) -> list[int] | None:
        """The teacher's own context of a record (`teacher_messages`, a chat, or `teacher_prompt`, a text), tokenized
        like a prompt; None when the record has neither (the teacher reads the student's prompt)."""
        given = [name for name in TEACHER_FIELDS if record.get(name) not in (None, "", [])]
        if len(given) > 1:
            raise UserError(f"{where}: the record has both `teacher_messages` and `teacher_prompt`: give one")
        return self._encode(record[given[0]], given[0], where) if given else None

    def _encode(self, value, field_name: str, where: str) -> list[int]:
        if value is None or value == "" or value == []:
            raise UserError(f"{where}: the record has no `{field_name}`")
        if isinstance(value, str):
            ids = self.tokenizer(value, add_special_tokens=True)["input_ids"]
        elif isinstance(value, list):
            ids = self._render_chat(value, field_name, where)
        else:
            raise UserError(f"{where}: `{field_name}` must be a text or a chat (a list of messages)")
        if not ids:
            raise UserError(f"{where}: `{field_name}` gives no tokens")
        return list(ids)

    def _render_chat(self, messages: list, field_name: str, where: str) -> list[int]:
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise UserError(f"{where}: `{field_name}[{i}]` must be a message with a text `content`")
            if m.get("role") not in ROLES:
                raise UserError(f"{where}: `{field_name}[{i}].role` is {m.get('role')!r}; expected one of "
                                f"{', '.join(ROLES)}")  # fmt: skip
        if self.template is None and not getattr(self.tokenizer, "chat_template", None):
            raise UserError(f"{where}: `{field_name}` is a chat but the student's tokenizer has no chat template; "
                            "set data.chat_template to a .jinja file, or give plain `prompt` records")  # fmt: skip
        chat = [{"role": m["role"], "content": m["content"]} for m in messages]
        try:
            text = self.tokenizer.apply_chat_template(
                chat, chat_template=self.template, add_generation_prompt=True, tokenize=False
            )
        except Exception as exc:  # jinja raises TemplateError (also from the template's own raise_exception)
            raise UserError(f"{where}: the chat template fails on `{field_name}`: {first_line(exc)}") from None
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


def _set_name(path: str) -> str:
    p = Path(path)
    return p.name if p.is_dir() else p.stem


def _jsonl_lines(path: str) -> list[int] | None:
    """Line number of each record of a JSONL file (blank lines hold none), for error messages."""
    if Path(path).suffix != ".jsonl":
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        return [number for number, line in enumerate(f, 1) if line.strip()]


def read_dataset(path: str):
    """A `datasets.Dataset` from a local JSONL / JSON / Parquet file or a save_to_disk folder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    p = Path(path)
    if p.is_dir():
        try:
            loaded = datasets.load_from_disk(str(p))
        except Exception as exc:  # datasets raises FileNotFoundError and its own errors for a foreign folder
            raise UserError(f"{path}: not a folder written by datasets' save_to_disk ({first_line(exc)})") from None
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded and len(loaded) != 1:
                raise UserError(f"{path}: a DatasetDict with splits {', '.join(loaded)} and no `train`: save one split")
            loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
        return loaded
    if not p.is_file():
        raise UserError(f"data file {path!r} not found")
    kind = SUFFIXES.get(p.suffix.lower())
    if kind is None:
        raise UserError(f"data file {path!r}: expected .jsonl, .json or .parquet (or a save_to_disk folder)")
    bad = _first_bad_json_line(p) if p.suffix.lower() == ".jsonl" else None
    if bad is not None:
        raise UserError(f"{path} line {bad[0]}: not valid JSON ({bad[1]})")
    try:
        return datasets.load_dataset(kind, data_files=str(p), split="train")
    except Exception as exc:  # pyarrow and datasets raise many kinds for an unreadable file
        raise UserError(f"{path}: cannot be read as {kind} ({first_line(exc)})") from None


def _first_bad_json_line(path: Path) -> tuple[int, str] | None:
    number = 0
    with path.open(encoding="utf-8", errors="strict") as f:
        try:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except ValueError as exc:
                    return number, str(exc)
                if not isinstance(value, dict):
                    return number, "a record must be a JSON object"
        except UnicodeDecodeError:
            return number + 1, "not UTF-8 text"
    return None
