"""Teachers for every setup: several named teachers, each scoring the rows its data names (`teachers`,
`data.train` entries {path, teacher}, `data.toy_teachers`), and a teacher-only context (`teacher_messages`,
`teacher_prompt`) that the teacher reads before a response while the student samples and trains on its own prompt."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import teacher, tropd_here
from trainer.config import DataConfig, TeacherConfig, load_config
from trainer.data.files import FileSource
from trainer.rundir import resume_free
from tropd.errors import UserError

HINT = "The reference answer is: {answer}. Reply with exactly that."


def test_named_teachers_are_configured_by_name_and_bad_ones_refused_in_one_line():
    c = load_config(None, ["teachers.math.url=http://a:8000", "teachers.code.url=http://b:8000",
                           "data.toy_teachers={math: math, code: code}"])  # fmt: skip
    assert list(c.teacher_sections()) == ["math", "code"] and c.teacher_sections()["code"].url == "http://b:8000"
    assert list(load_config(None, []).teacher_sections()) == ["teacher"]  # one teacher: today's `teacher`
    files = load_config(None, ["data.source=files", "data.train=[a.jsonl, {path: b.jsonl, teacher: code}]",
                               "teachers.math.url=http://a:8000", "teachers.code.url=http://b:8000"])  # fmt: skip
    assert [getattr(e, "teacher", None) for e in files.data.train] == [None, "code"]
    for overrides, wanted in (
        (["teachers.a.url=http://a:1", "teacher.url=http://b:1"], "both `teacher` and `teachers` are set"),
        (["data.toy_teachers={math: zz}"], "data.toy_teachers.math names teacher 'zz' but no `teachers` are named"),
        (["teachers.a.url=http://a:1", "data.source=files", "data.train=[{path: x.jsonl, teacher: b}]"],
         "data.train x.jsonl names teacher 'b' but the named teachers are a"),
        (["teachers.a.top_k=4", "teachers.b.top_k=8"], "teachers: top_k differs (a 4, b 8)"),
        (["teachers.a b.url=http://a:1"], "name 'a b' must be letters, digits, _ or -"),
        (["teachers.a.api=inprocess"], "teachers.a.api inprocess needs teachers.a.model"),
        (["teachers.a.api=inprocess", "teachers.a.model=m", "teachers.a.engine=vllm", "teachers.b.api=inprocess",
          "teachers.b.model=m", "teachers.b.engine=vllm"], "at most one in-process teacher may use engine vllm"),
    ):  # fmt: skip
        with pytest.raises(UserError, match="bad config") as caught:
            load_config(None, overrides)
        assert wanted in str(caught.value) and "\n" not in str(caught.value), (overrides, caught.value)
    # a resumed run may move a named teacher (its URL, its key), as it may the one teacher; not its top_k
    assert resume_free("teachers.math.url") and resume_free("teachers.math.api_key_env")
    assert not resume_free("teachers.math.top_k") and not resume_free("teachers.math.temperature")


def _context_file(realworld: Path, path: Path, n: int = 24, **how) -> Path:
    """The real-shaped chat records with the reference answer in the teacher's context alone."""
    records = [json.loads(line) for line in (realworld / "train-chat.jsonl").read_text().splitlines()[:n]]
    for r in records:
        if how.get("text"):
            r["teacher_prompt"] = HINT.format(answer=r["answer"]) + " " + r["messages"][-1]["content"]
        else:
            r["teacher_messages"] = [{"role": "system", "content": HINT.format(answer=r["answer"])}, *r["messages"]]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_teacher_context_is_tokenized_like_a_prompt_and_its_errors_name_file_line_and_field(realworld, tmp_path):
    student = realworld / "student"
    for text in (False, True):
        path = _context_file(realworld, tmp_path / f"ctx-{text}.jsonl", n=6, text=text)
        source = FileSource(DataConfig(source="files", train=[str(path)], eval_share=0.2), student, 0, lambda *_: 0)
        prompts = source.train + source.evals["heldout"]
        assert all(p.teacher_ids is not None and p.teacher_ids != p.ids for p in prompts)
        record = json.loads(path.read_text().splitlines()[0])
        if text:
            wanted = source.tokenizer(record["teacher_prompt"])["input_ids"]
        else:
            wanted = source.tokenizer.apply_chat_template(record["teacher_messages"], add_generation_prompt=True,
                                                          tokenize=False)  # fmt: skip
            wanted = source.tokenizer(wanted, add_special_tokens=False)["input_ids"]
        assert wanted in [p.teacher_ids for p in prompts]
    plain = FileSource(DataConfig(source="files", train=[str(realworld / "train-chat.jsonl")]), student, 0,
                       lambda *_: 0)  # fmt: skip
    assert all(p.teacher_ids is None for p in plain.train)  # records without it behave as before
    good = {"messages": [{"role": "user", "content": "hi"}]}
    for extra, wanted in (
        ({"teacher_messages": [{"role": "judge", "content": "x"}]}, "line 2: `teacher_messages[0].role` is 'judge'"),
        ({"teacher_messages": "hint"}, None),  # a text is a prompt: accepted
        ({"teacher_messages": [{"role": "user"}]}, "line 2: `teacher_messages[0]` must be a message with a text"),
        ({"teacher_messages": [{"role": "user", "content": "a"}], "teacher_prompt": "b"},
         "line 2: the record has both `teacher_messages` and `teacher_prompt`"),
        ({"teacher_prompt": 5}, "line 2: `teacher_prompt` must be a text or a chat"),
    ):  # fmt: skip
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps(good) + "\n" + json.dumps({**good, **extra}) + "\n")
        if wanted is None:
            FileSource(DataConfig(source="files", train=[str(path)]), student, 0, lambda *_: 0)
            continue
        with pytest.raises(UserError) as caught:
            FileSource(DataConfig(source="files", train=[str(path)]), student, 0, lambda *_: 0)
        assert str(caught.value).startswith(str(path)) and wanted in str(caught.value), (extra, caught.value)


def test_the_teacher_scores_a_response_after_its_own_context(realworld, tmp_path):
    """Rollouts send each response to the teacher after the record's teacher-only context: the batch's teacher
    log-probs are the teacher's after that context, and differ from its scores of the same responses after the
    student's prompt."""
    from transformers import AutoModelForCausalLM

    from trainer.data.files import FileSource
    from trainer.pipeline import Rollouts
    from trainer.teacher_link import Teachers

    path = _context_file(realworld, tmp_path / "ctx.jsonl", n=12)
    config = load_config(None, [f"student={realworld / 'student'}", "data.source=files", f"data.train=[{path}]",
                                "teacher.api=inprocess", f"teacher.model={realworld / 'teacher'}",
                                "rollout.prompts_per_step=4", "rollout.max_new_tokens=8",
                                "guidance.enabled=false", "dtype=float32"])  # fmt: skip
    source = FileSource(config.data, realworld / "student", 0, lambda *_: 0)
    model = AutoModelForCausalLM.from_pretrained(realworld / "student", dtype=torch.float32)
    link = Teachers(config.teacher_sections())
    try:
        batch = Rollouts(config, model, link, source).make(1).resolve()
        by_text = {tuple(p.ids): p for p in source.train}
        drawn = [by_text[tuple(p)] for p in batch.prompts]
        assert all(p.teacher_ids for p in drawn)
        for context, should_match in (([p.teacher_ids for p in drawn], True), (batch.prompts, False)):
            seqs = [list(c) + r for c, r in zip(context, batch.responses, strict=True)]
            scored = link.score(seqs, [len(c) for c in context], 0, [None] * len(seqs)).result()
            for i, r in enumerate(scored):
                n = len(batch.responses[i])
                gap = (torch.from_numpy(r.logprobs) - batch.teacher_lp_B_T[i, :n]).abs().max()
                assert (gap < 1e-5) == should_match, (i, float(gap), should_match)
    finally:
        link.close()


def _toy_args(toy_quick: Path, out: Path, *extra: str) -> list[str]:
    return [f"student={toy_quick / 'student'}", f"out={out}", "steps=3", "checkpoint_every=2",
            "rollout.prompts_per_step=8", "rollout.max_new_tokens=12", "eval.n=4", "eval.kl_prompts=9",
            "tensorboard=false", "threads=1", "optim.warmup_steps=10", "optim.schedule=constant", *extra]  # fmt: skip


@pytest.mark.slow  # a second (hf) service, two short toy runs and a refusal: about 40 s on 2 cores
def test_two_named_teachers_over_http_score_their_own_rows_and_resume_exactly(
    toy_quick, realworld, toy_vllm_teacher, tmp_path
):
    """`teachers: {math, code}` with `data.toy_teachers`: math prompts go to the toy teacher's vLLM service, code and
    general prompts to a second service that serves the student's own starting weights. So at step 1 the student's
    K1 on the `code` teacher's rows is 0 (to rounding) and on the `math` teacher's far from it, which any row sent to
    the wrong service would break; each service's per-client counter shows it was asked. Per-teacher metrics and eval
    reverse KL are in metrics.jsonl; a resume from the step-2 checkpoint ends where the straight run ends; a teacher
    whose tokenizer differs from the student's is refused at start in one line naming it."""
    import httpx

    math_url = toy_vllm_teacher.get().url
    with teacher(toy_quick / "student", "hf", tmp_path, "--threads", "1") as code:
        teachers = [f"teachers.math.url={math_url}", "teachers.math.client_id=run-math",
                    f"teachers.code.url={code.url}", "teachers.code.client_id=run-code",
                    "data.toy_teachers={math: math, code: code, general: code}"]  # fmt: skip
        out = tmp_path / "run"
        done = tropd_here("train", *_toy_args(toy_quick, out, *teachers))
        assert done.returncode == 0, done.stderr[-3000:]
        assert "teacher 'math'" in done.stdout and "teacher 'code'" in done.stdout
        seen = {url: httpx.get(f"{url}/metrics", timeout=10).text for url in (math_url, code.url)}
        for url, client, other in ((math_url, "run-math", "run-code"), (code.url, "run-code", "run-math")):
            assert f'tropd_client_requests_total{{client="{client}"}}' in seen[url], (url, client)
            assert f'client="{other}"' not in seen[url], (url, other)  # never asked for the other's rows
        # guidance: the code teacher's own service drafted its rows' prefixes
        drafted = re.search(r"^tropd_tokens_generated_total (\S+)$", seen[code.url], flags=re.M)
        assert drafted is not None and float(drafted.group(1)) > 0, seen[code.url][-2000:]
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        first = records[0]["by_teacher"]
        assert abs(first["code"]["k1"]) < 1e-3 and first["math"]["k1"] > 0.5, first
        assert first["code"]["response_tokens"] + first["math"]["response_tokens"] == records[0]["response_tokens"]
        final = records[-1]["eval"]
        assert set(final["reverse_kl_by_teacher"]) == {"math", "code"}
        assert final["reverse_kl_by_teacher"]["math"] > final["reverse_kl_by_teacher"]["code"]
        assert (out / "curves.png").is_file()
        identity = json.loads((out / "teacher.json").read_text())["teachers"]
        assert identity["math"]["model"] != identity["code"]["model"]
        # resume from the step-2 checkpoint (step 3 again): the same rows to the same teachers, the same weights
        again = tmp_path / "again"
        shutil.copytree(out, again)
        shutil.rmtree(again / "checkpoints" / "step-000003")
        (again / "summary.json").unlink()
        rest = tropd_here("train", *_toy_args(toy_quick, again, *teachers), "--resume")
        assert rest.returncode == 0, rest.stderr[-3000:]
    a, b = (load_file(run / "student" / "model.safetensors") for run in (out, again))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # another teacher's tokenizer (the real-shaped world's), refused before any step, naming the teacher
    refused = tropd_here("train", *_toy_args(toy_quick, tmp_path / "refused", "teachers.a.api=inprocess",
                                             f"teachers.a.model={toy_quick / 'teacher'}", "teachers.b.api=inprocess",
                                             f"teachers.b.model={realworld / 'teacher'}"))  # fmt: skip
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert "teacher 'b': the teacher's tokenizer differs from the student's" in refused.stderr
    assert not (tmp_path / "refused").exists()


@pytest.mark.slow  # 30 short steps of the real-shaped world: about 20 s on 2 cores
def test_self_distillation_with_the_answer_in_the_teachers_context(realworld, tmp_path):
    """On-policy self-distillation: the teacher is the student's own base model, given the reference answer in a
    system message the student never sees. The student samples from its own prompt and learns: the held-out reverse
    KL against the teacher-with-context falls."""
    train = _context_file(realworld, tmp_path / "train.jsonl", n=200)
    held = tmp_path / "held.jsonl"
    rows = [json.loads(line) for line in (realworld / "eval-chat.jsonl").read_text().splitlines()]
    held.write_text("".join(json.dumps({**r, "teacher_messages": [{"role": "system", "content": HINT.format(
        answer=r["answer"])}, *r["messages"]]}) + "\n" for r in rows))  # fmt: skip
    out = tmp_path / "run"
    done = tropd_here("train", f"student={realworld / 'student'}", f"out={out}", "data.source=files",
                      f"data.train=[{train}]", f"data.eval=[{held}]", "teacher.api=inprocess",
                      f"teacher.model={realworld / 'student'}", "steps=30", "rollout.prompts_per_step=8",
                      "rollout.max_new_tokens=16", "eval.n=8", "eval.kl_prompts=32", "eval.every=0", "optim.lr=1e-3",
                      "optim.warmup_steps=5", "optim.schedule=constant", "checkpoint_every=0", "tensorboard=false",
                      "plot=false", "threads=1")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["eval_before"]["reverse_kl"], summary["eval_after"]["reverse_kl"]
    print(f"self-distillation: reverse KL against the teacher-with-context {before:.3f} -> {after:.3f} nats/token")
    assert before > 0.05 and after < 0.8 * before, (before, after)


def test_a_teachers_link_is_built_per_name(toy_quick):
    """`Teachers` holds one link per name; requests come back in the rows' order whatever teacher scored them."""
    from trainer.teacher_link import Teachers

    sections = {name: TeacherConfig(api="inprocess", model=str(toy_quick / model))
                for name, model in (("a", "teacher"), ("b", "student"))}  # fmt: skip
    link = Teachers(sections)
    try:
        seqs = [[3, 7, 9, 11, 4], [4, 5, 6, 8], [12, 13, 5, 6, 7], [3, 4]]
        mixed = link.score(seqs, [1] * 4, 0, ["a", "b", None, "b"]).result()
        alone_a = link.links["a"].score(seqs, [1] * 4, 0).result()
        alone_b = link.links["b"].score(seqs, [1] * 4, 0).result()
        for i, r in enumerate(mixed):
            want = alone_b[i] if i in (1, 3) else alone_a[i]  # None: the first teacher
            assert torch.allclose(torch.from_numpy(r.logprobs), torch.from_numpy(want.logprobs), atol=1e-6), i
        assert not torch.allclose(torch.from_numpy(alone_a[0].logprobs), torch.from_numpy(alone_b[0].logprobs))
    finally:
        link.close()


def test_a_resume_keeps_each_named_teachers_identity(realworld, tmp_path):
    """teacher.json keeps each teacher's identity by name: a resume may move a teacher (its URL is not in it) but not
    put another model behind a name, nor add or drop a name; the one teacher's file is as before."""
    from trainer.rundir import check_resumed_models, teacher_identity

    student = realworld / "student"
    ckpt = tmp_path / "checkpoints" / "step-000002"
    shutil.copytree(student, ckpt / "student")
    info = {"model": "toy-teacher", "engine": "vllm", "tokenizer_sha256": "ab" * 32}
    infos = {"math": info, "code": {**info, "model": "code-teacher"}}
    (tmp_path / "teacher.json").write_text(json.dumps(teacher_identity(infos)))
    check_resumed_models(tmp_path, ckpt, student, infos)  # the same teachers, wherever they are served now
    for now, wanted in (
        ({**infos, "code": {**info, "model": "other"}}, "--resume against another teacher 'code' (model:"),
        ({"math": info}, "--resume with other teachers (math, code -> one teacher)"),
        ({**infos, "chat": info}, "--resume with other teachers (math, code -> math, code, chat)"),
    ):
        with pytest.raises(UserError, match="resume") as caught:
            check_resumed_models(tmp_path, ckpt, student, now)
        assert wanted in str(caught.value), caught.value
    (tmp_path / "teacher.json").write_text(json.dumps(teacher_identity({"teacher": info})))
    assert json.loads((tmp_path / "teacher.json").read_text())["model"] == "toy-teacher"  # one teacher: as before
    check_resumed_models(tmp_path, ckpt, student, {"teacher": info})
    with pytest.raises(UserError, match="another teacher \\(model"):
        check_resumed_models(tmp_path, ckpt, student, {"teacher": {**info, "model": "other"}})


def test_files_of_several_teachers_hold_out_a_set_per_teacher(realworld):
    """Without `data.eval`, the held-out share of train files that name different teachers is one eval set per
    teacher (so that eval's reverse KL has prompts of each); each prompt keeps its file's teacher."""
    config = DataConfig(source="files", eval_share=0.1, train=[
        {"path": str(realworld / "train-chat.jsonl"), "teacher": "a"},
        {"path": str(realworld / "train-text.jsonl"), "teacher": "b"}])  # fmt: skip
    source = FileSource(config, realworld / "student", 0, lambda *_: 0)
    assert set(source.evals) == {"heldout-a", "heldout-b"}
    assert all(p.teacher == name[-1] for name, prompts in source.evals.items() for p in prompts)
    assert {p.teacher for p in source.train} == {"a", "b"}
    one = FileSource(DataConfig(source="files", train=[str(realworld / "train-chat.jsonl")]), realworld / "student", 0,
                     lambda *_: 0)  # fmt: skip
    assert list(one.evals) == ["heldout"]  # one teacher: as before
