import pytest

from trainer.toy import tasks
from trainer.toy.tasks import arith, grammar, stack
from trainer.toy.tokenizer import VOCAB


@pytest.mark.parametrize("task", list(tasks.TASKS))
def test_generators_are_deterministic(task):
    a = tasks.examples(task, "train", 50, seed=3)
    b = tasks.examples(task, "train", 50, seed=3)
    c = tasks.examples(task, "train", 50, seed=4)
    assert a == b
    assert a != c


@pytest.mark.parametrize("task", list(tasks.TASKS))
def test_train_and_eval_splits_are_disjoint(task):
    train = {e.prompt for e in tasks.examples(task, "train", 3000)}
    evals = [e.prompt for e in tasks.examples(task, "eval", 200)]
    assert len(set(evals)) == len(evals)
    assert not train & set(evals)
    assert all(tasks.in_eval_split(p) for p in evals)


@pytest.mark.parametrize("task", list(tasks.TASKS))
def test_verifiers_accept_both_styles(task):
    for e in tasks.examples(task, "eval", 200):
        assert tasks.check(task, e.prompt, e.teacher), e
        assert tasks.check(task, e.prompt, e.student), e


@pytest.mark.parametrize("task", ["math", "code"])
def test_numeric_verifiers_reject_wrong_answers(task):
    for e in tasks.examples(task, "eval", 100):
        value = int(tasks.final_answer(e.teacher))
        assert not tasks.check(task, e.prompt, f"#{value + 1}")
        assert not tasks.check(task, e.prompt, e.teacher.replace("#", ""))  # no answer marker
        assert not tasks.check(task, e.prompt, "")
        assert not tasks.check(task, e.prompt, f"#{value}x")


def test_known_answers():
    assert arith.solve("97+57+60") == 214
    assert arith.solve("12*7+40") == 124
    assert stack.run("1 7 7 * +".split()) == [[1, 49], [50]]
    assert tasks.check("math", "97+57+60", "97+57=154;154+60=214;#214")
    assert tasks.check("code", "1 7 7 * +", "#50")
    assert grammar.balanced("([])") and not grammar.balanced("([)]")
    assert tasks.check("general", "([", "#])")
    assert not tasks.check("general", "([", "#)]")
    assert not tasks.check("general", "([", "#")


def test_unknown_task_and_split_are_clear_errors():
    with pytest.raises(ValueError, match="unknown task"):
        tasks.examples("poetry", "train", 1)
    with pytest.raises(ValueError, match="unknown split"):
        tasks.examples("math", "test", 1)


def test_every_example_fits_the_vocabulary():
    for task in tasks.TASKS:
        for e in tasks.examples(task, "train", 300):
            for text in (e.prompt, e.teacher, e.student):
                assert VOCAB.decode(VOCAB.encode(text)) == text
