import pytest
import torch

from trainer.rollout.sampling import response_forward
from trainer.toy import tasks, world
from trainer.toy.tokenizer import VOCAB


def _mean_loglik(model, task, n=64):
    exs = tasks.examples(task, "eval", n)
    prompts = [VOCAB.prompt_ids(e.prompt) for e in exs]
    responses = [VOCAB.encode(e.teacher) + [VOCAB.eos_id] for e in exs]
    with torch.no_grad():
        logp, mask, _ = response_forward(model, prompts, responses, VOCAB.pad_id)
    return (logp.sum() / mask.sum()).item()


def test_quick_build_loads_in_transformers_and_teacher_beats_untrained(toy_quick):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for role in ("teacher", "student"):
        model = AutoModelForCausalLM.from_pretrained(toy_quick / role)
        assert model.config.model_type == "llama"
        assert AutoTokenizer.from_pretrained(toy_quick / role).eos_token_id == VOCAB.eos_id
        assert (toy_quick / role / "model.safetensors").is_file()
    teacher = world.load_model(toy_quick / "teacher")
    untrained = world.new_model(world.TEACHER, seed=0).eval()
    for task in tasks.TASKS:
        assert _mean_loglik(teacher, task) > _mean_loglik(untrained, task) + 1.0
    n_teacher = sum(p.numel() for p in teacher.parameters())
    n_student = sum(p.numel() for p in world.load_model(toy_quick / "student").parameters())
    assert n_teacher > 2 * n_student  # the student is the smaller model (2.4x in the full build)


def test_second_build_is_cached(toy_quick):
    messages = []
    record = world.build(toy_quick, seed=0, quick=True, log=messages.append)
    assert messages and messages[0].startswith("[toy] cached")
    assert record["settings"]["quick"] is True
    assert not world.is_built(toy_quick, seed=1, quick=True)


def test_rebuild_keeps_the_model_whose_settings_did_not_change(toy_quick, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "toy"
    shutil.copytree(toy_quick, out)
    teacher_bytes = (out / "teacher" / "model.safetensors").read_bytes()
    student_bytes = (out / "student" / "model.safetensors").read_bytes()
    changed = dict(world.RECIPES[True], student=world.SftSpec("student", 3, 16, 3e-3, 1))
    monkeypatch.setitem(world.RECIPES, True, changed)
    messages = []
    record = world.build(out, seed=0, quick=True, log=messages.append)
    assert any(m.startswith("[toy] keeping the teacher") for m in messages), messages
    assert not any("training the teacher" in m for m in messages)
    assert any("training the student" in m for m in messages)
    assert (out / "teacher" / "model.safetensors").read_bytes() == teacher_bytes
    assert (out / "student" / "model.safetensors").read_bytes() != student_bytes
    assert record["student"]["settings"]["recipe"]["steps"] == 3
    assert world.is_built(out, seed=0, quick=True)


def test_the_drilled_tasks_are_the_students_settings_alone(monkeypatch):
    # a world built before `general` was drilled is out of date, and its rebuild keeps the teacher
    before = {role: world.role_settings(role, 0, False) for role in ("teacher", "student")}
    whole = world.build_settings(0, False)
    assert before["student"]["drilled"] == ["math", "code", "general"] and "drilled" not in before["teacher"]
    monkeypatch.setattr(world, "DRILLED", ("math", "code"))
    assert world.role_settings("teacher", 0, False) == before["teacher"]
    assert world.role_settings("student", 0, False) != before["student"]
    assert world.build_settings(0, False) != whole


@pytest.mark.slow  # over 4 s on 2 cores
def test_sft_is_deterministic_for_a_seed():
    spec = world.SftSpec("student", steps=4, batch=8, lr=1e-3, warmup=2)
    a = world.sft(world.new_model(world.STUDENT, seed=5), spec, seed=5, label="t", pool_size=200, log=lambda _: None)
    b = world.sft(world.new_model(world.STUDENT, seed=5), spec, seed=5, label="t", pool_size=200, log=lambda _: None)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), name


def test_eval_reports_accuracy_and_mismatch(toy_quick):
    result = world.task_report(str(toy_quick / "student"), "math", 20, str(toy_quick / "teacher"))
    assert 0.0 <= result["accuracy"] <= 1.0
    assert result["reverse_kl"] > 0.0
    assert 0.0 <= result["outlier_share"] <= 1.0


def test_student_drills_are_single_steps_worked_in_the_teachers_style():
    import random

    from trainer.toy.tasks import stack

    rng = random.Random(0)
    for ex in tasks.examples("math", "train", 50):
        prompt, response = world.drill(ex, rng)
        lhs, rhs = response.split(";")[0].split("=")
        assert lhs == prompt and response == f"{prompt}={rhs};#{rhs}"
        assert f"{prompt}={rhs}" in ex.teacher.split(";")  # a step of the teacher's own scratchpad
        a, op, b = prompt.partition("+") if "+" in prompt else prompt.partition("*")
        assert int(rhs) == (int(a) + int(b) if op == "+" else int(a) * int(b))
    for ex in tasks.examples("code", "train", 50):
        prompt, response = world.drill(ex, rng)
        result = stack.run(prompt.split())
        assert len(result) == 1 and response == f"{result[0][0]};#{result[0][0]}"  # one operation, worked
        assert tasks.check("code", prompt, response)
    for ex in tasks.examples("general", "train", 20):  # one step: the drill is the teacher's whole answer
        assert world.drill(ex, rng) == (ex.prompt, ex.teacher) and tasks.check("general", ex.prompt, ex.teacher)
    pools = {name: tasks.examples(name, "train", 200) for name in world.MIX}
    for share in (0.0, 0.5, 1.0):
        pairs = world.mixed_batch(random.Random(1), "student", 3000, pools, drills=share)
        prompts = [VOCAB.decode(p) for p, _ in pairs]
        math = [p for p in prompts if p[:1].isdigit() and " " not in p]  # code prompts have spaces
        code = [p for p in prompts if " " in p]
        assert abs(sum(p.count("+") + p.count("*") == 1 for p in math) / len(math) - share) < 0.06
        assert abs(sum(len(p.split()) == 3 for p in code) / len(code) - share) < 0.06
        general = [VOCAB.decode(r) for p, r in pairs if VOCAB.decode(p)[:1] in "(["]
        assert abs(sum(";" in r for r in general) / len(general) - share) < 0.08  # teacher-style: stack;#closing


def test_a_build_of_the_other_kind_never_replaces_a_world_in_place(toy_quick, capsys):
    from tropd.cli import main

    before = (toy_quick / "build.json").read_text()
    assert main(["toy", "build", "--out", str(toy_quick)]) == 2  # a full build over the quick world
    err = capsys.readouterr().err
    assert "holds a quick toy world: a full build would replace it" in err and "--force" in err, err
    assert main(["toy", "build", "--quick", "--out", str(toy_quick)]) == 0  # the same kind: cached
    assert (toy_quick / "build.json").read_text() == before
