"""Prompt sources: the user's files (JSONL / JSON / Parquet / save_to_disk) read with the student's tokenizer and
chat template, every data error a one-line error naming the file, the line or row and the field; the toy source
drawing what the trainer drew before; the trainer core importing nothing of the toy world."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import DataConfig, EvalConfig, load_config
from trainer.data.files import FileSource, stop_ids_of
from trainer.run import open_source
from tropd.cli import main
from tropd.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CORE = ("trainer.train", "trainer.pipeline", "trainer.rollout.sampling", "trainer.losses", "trainer.evaluation",
        "trainer.data.files", "trainer.student", "trainer.parallel", "trainer.models")  # fmt: skip
TOY = "trainer.toy"


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _source(student: Path, train: list[Path], log=None, **kw) -> FileSource:
    config = DataConfig(source="files", train=[str(p) for p in train], **kw)
    return FileSource(config, student, seed=0, log=log or (lambda *_: None))


def test_chat_records_are_rendered_with_the_students_chat_template(realworld):
    from transformers import AutoTokenizer

    student = realworld / "student"
    tok = AutoTokenizer.from_pretrained(student)
    src = _source(student, [realworld / "train-chat.jsonl"], eval_share=0.1)
    record = json.loads((realworld / "train-chat.jsonl").read_text().splitlines()[0])
    text = tok.apply_chat_template(record["messages"], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    wanted = tok(text, add_special_tokens=False)["input_ids"]
    assert any(p.ids == wanted for prompts in (src.train, *src.evals.values()) for p in prompts)
    assert src.has_answers and src.default_verifier() == "exact"
    # the stop ids are the tokenizer's eos and generation_config's list; the extra embedding rows are never sampled
    assert set(src.stop_ids) == {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}
    assert src.vocab_limit == len(tok)
    assert src.pad_id == tok.pad_token_id


def test_plain_prompts_and_held_out_share(realworld):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(realworld / "student")
    src = _source(realworld / "student", [realworld / "train-text.jsonl"], eval_share=0.2)
    n = len((realworld / "train-text.jsonl").read_text().splitlines())
    held = src.evals["heldout"]
    assert len(held) == -(-n // 5) and len(src.train) + len(held) == n
    record = held[0].record
    assert held[0].ids == tok(record["prompt"], add_special_tokens=True)["input_ids"]
    assert held[0].answer == str(record["answer"])
    # eval files give one eval set each, named by the file
    src = _source(realworld / "student", [realworld / "train-text.jsonl"], eval=[str(realworld / "eval-text.jsonl")])
    assert (
        list(src.eval_sets(EvalConfig(n=5))) == ["eval-text"] and len(src.eval_sets(EvalConfig(n=5))["eval-text"]) == 5
    )
    # drawing is a function of the random state alone (what resume relies on)
    a, b = src.draw(random.Random(3), 10), src.draw(random.Random(3), 10)
    assert [p.ids for p in a] == [p.ids for p in b]


def test_json_parquet_and_save_to_disk_read_the_same_prompts(realworld, tmp_path):
    import datasets

    records = [json.loads(line) for line in (realworld / "train-text.jsonl").read_text().splitlines()][:20]
    (tmp_path / "p.json").write_text(json.dumps(records))
    ds = datasets.Dataset.from_list(records)
    ds.to_parquet(str(tmp_path / "p.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    jsonl = _write_jsonl(tmp_path / "p.jsonl", records)
    ids = [
        [p.ids for p in _source(realworld / "student", [path], eval_share=0).evals["train"]]
        for path in (jsonl, tmp_path / "p.json", tmp_path / "p.parquet", tmp_path / "saved")
    ]
    assert all(x == ids[0] for x in ids) and len(ids[0]) == 20


def test_long_prompts_are_skipped_and_counted_never_truncated(realworld, tmp_path):
    lines = []
    records = [{"prompt": "short one"}, {"prompt": "a much longer prompt " * 30}, {"prompt": "short two"}]
    src = _source(realworld / "student", [_write_jsonl(tmp_path / "p.jsonl", records)], log=lines.append,
                  eval_share=0, max_prompt_tokens=16)  # fmt: skip
    assert len(src.evals["train"]) == 2 and all(len(p.ids) <= 16 for p in src.evals["train"])
    assert any("skipped 1 of 3" in line for line in lines)


@pytest.mark.parametrize(
    ("records", "extra", "wanted"),
    [
        (None, {}, "not found"),
        (['{"prompt": "fine"}', '{"prompt": broken'], {}, "p.jsonl line 2: not valid JSON"),
        ([{"prompt": "fine"}, {"other": 1}], {}, "p.jsonl line 2: the record has no `prompt`"),
        ([{"text": "x"}], {}, "neither `messages` nor `prompt`"),
        ([{"prompt": "x"}], {"prompt_field": "question"}, "unknown field data.prompt_field='question'"),
        (
            [{"messages": [{"role": "user", "content": "hi"}]}, {"messages": [{"role": "robot", "content": "hi"}]}],
            {},
            "p.jsonl line 2: `messages[0].role` is 'robot'",
        ),
        ([{"messages": [{"role": "user"}]}], {}, "p.jsonl line 1: `messages[0]` must be a message with a text"),
        (
            [{"messages": [{"role": "user", "content": "hi"}]}],
            {"chat_template": "T.jinja"},
            "p.jsonl line 1: the chat template fails on `messages`: no assistant",
        ),
        ([{"prompt": 5}], {}, "p.jsonl line 1: `prompt` must be a text or a chat"),
    ],
)
def test_each_data_error_is_one_line_naming_file_line_and_field(realworld, tmp_path, records, extra, wanted):
    if "chat_template" in extra:
        (tmp_path / "T.jinja").write_text("{{ raise_exception('no assistant here') }}")
        extra = {"chat_template": str(tmp_path / "T.jinja")}
    path = tmp_path / "p.jsonl"
    if records is not None:
        _write_jsonl(path, records)
    with pytest.raises(UserError) as err:
        _source(realworld / "student", [path], **extra)
    message = str(err.value)
    assert wanted in message and "\n" not in message, message


def test_data_errors_exit_with_status_2_before_any_step(realworld, tmp_path, capsys):
    chats = [{"messages": [{"role": "user", "content": "fine"}]}, {"messages": [{"role": "bad", "content": "x"}]}]
    path = _write_jsonl(tmp_path / "p.jsonl", chats)
    out = tmp_path / "run"
    status = main(["train", f"student={realworld / 'student'}", "data.source=files", f"data.train=[{path}]",
                   "teacher.api=inprocess", f"teacher.model={realworld / 'teacher'}", f"out={out}"])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 2 and "line 2" in err and "messages[0].role" in err, err
    assert not out.exists()  # nothing written before the data was read


def test_config_refuses_the_old_tasks_key_and_files_without_train():
    with pytest.raises(UserError, match="`tasks` is now `data.toy`"):
        load_config(None, ["tasks={math: 1}"])
    with pytest.raises(UserError, match="data.source files needs data.train"):
        load_config(None, ["data.source=files"])
    assert load_config(None, []).data.source == "toy"


def test_toy_source_refuses_a_student_of_another_vocabulary(realworld):
    with pytest.raises(UserError, match="data.source toy needs a toy-world student"):
        open_source(DataConfig(), realworld / "student", seed=0)


def test_toy_source_draws_the_prompts_the_trainer_always_drew(toy_quick):
    """The same random calls in the same order as the trainer made before prompt sources existed."""
    from trainer.toy import tasks
    from trainer.toy.tokenizer import VOCAB

    mix = {"math": 0.6, "code": 0.3, "general": 0.1}
    src = open_source(DataConfig(toy=mix), toy_quick / "student", seed=0)
    rng, old = random.Random("prompts/0"), random.Random("prompts/0")
    pools = {t: tasks.examples(t, "train", 20000, 0) for t in mix}
    chosen = old.choices(list(mix), list(mix.values()), k=16)
    wanted = [VOCAB.prompt_ids(old.choice(pools[t]).prompt) for t in chosen]
    assert [p.ids for p in src.draw(rng, 16)] == wanted
    assert src.stop_ids == (VOCAB.eos_id,) and stop_ids_of(toy_quick / "student", _toy_tokenizer(toy_quick)) == (2,)


def _toy_tokenizer(toy_quick):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(toy_quick / "student")


@pytest.mark.slow  # over 4 s on 2 cores
def test_trainer_core_imports_nothing_of_the_toy_world():
    """At run time (the import rules of tests/test_imports.py read the source; this runs it)."""
    loaded = f"[m for m in sys.modules if m == {TOY!r} or m.startswith({TOY + '.'!r})]"
    code = f"import sys\nfor m in {CORE!r}: __import__(m)\nprint({loaded})"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


def test_a_tokenizer_without_a_pad_token_pads_with_a_stop_id(realworld, tmp_path):
    student = tmp_path / "student"
    shutil.copytree(realworld / "student", student)
    for name, key in (("tokenizer_config.json", "pad_token"), ("tokenizer.json", "padding")):
        data = json.loads((student / name).read_text())
        data.pop(key, None)
        (student / name).write_text(json.dumps(data))
    src = _source(student, [realworld / "train-text.jsonl"], eval_share=0)
    assert src.tokenizer.pad_token_id is None and src.pad_id == src.stop_ids[0]
