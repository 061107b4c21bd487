"""kimi_jax.rl.tasks: generators (seeds, difficulty, held-out split) and exact verifiers on hand-checked cases."""

import builtins
import random

import pytest

from kimi_jax.rl import tasks
from kimi_jax.rl.tasks import arithmetic, countdown, expression, python_functions, strings
from kimi_jax.rl.tasks.base import Problem

FAST = (arithmetic, countdown, strings)


@pytest.mark.parametrize("family", list(tasks.FAMILIES.values()), ids=list(tasks.FAMILIES))
def test_seeded_distinct_and_held_out_disjoint(family):
    difficulty = family.DIFFICULTIES[-1]
    train = tasks.generate(family, 0, 60, difficulty=difficulty)
    assert [p.key for p in train] == [p.key for p in tasks.generate(family, 0, 60, difficulty=difficulty)]
    assert [p.key for p in train] != [p.key for p in tasks.generate(family, 1, 60, difficulty=difficulty)]
    held_out = tasks.generate(family, 0, 15, difficulty=difficulty, split="held_out")
    more_train = tasks.generate(family, 7, 60, difficulty=difficulty)
    train_keys = {p.key for p in train + more_train}
    assert len({p.key for p in train}) == 60
    assert train_keys.isdisjoint(p.key for p in held_out)
    assert all(tasks.in_held_out(p.key) for p in held_out) and not any(tasks.in_held_out(k) for k in train_keys)


def test_held_out_fraction_of_keys():
    keys = [f"problem {i}" for i in range(20000)]
    assert sum(map(tasks.in_held_out, keys)) / len(keys) == pytest.approx(0.1, abs=0.01)


def test_generate_errors():
    with pytest.raises(ValueError, match="split must be one of"):
        tasks.generate(arithmetic, 0, 1, difficulty=1, split="test")
    with pytest.raises(ValueError, match="has difficulties"):
        tasks.generate(arithmetic, 0, 1, difficulty=9)
    with pytest.raises(ValueError, match="only .* distinct"):
        tasks.generate(arithmetic, 0, 500, difficulty=1)         # 10 * 2 * 10 expressions in all


@pytest.mark.parametrize("family", FAST, ids=lambda f: f.FAMILY)
def test_reference_answers_verify_and_others_do_not(family):
    for difficulty in family.DIFFICULTIES:
        for problem in tasks.generate(family, 3, 20, difficulty=difficulty):
            assert family.verify(problem, "let me think\n" + problem.answer) == tasks.Reward(1.0, "correct")
            assert family.verify(problem, problem.answer + "\n999999").score == 0.0
            assert family.verify(problem, "").score == 0.0


def test_difficulty_sets_the_size():
    rng = random.Random(0)
    for difficulty in arithmetic.DIFFICULTIES:
        text = arithmetic.make(rng, difficulty).key
        assert len(expression.numbers(expression.parse(text))) == difficulty + 1
        assert len(countdown.make(rng, difficulty).spec["numbers"]) == difficulty + 2
        word = strings.make(rng, difficulty).prompt.split(": ")[1]
        assert len(word) == 2 + 2 * difficulty


def test_arithmetic_hand_examples():
    problem = Problem("arithmetic", 2, "17+4*3=", "29", "17+4*3")
    assert arithmetic.verify(problem, "29").score == 1.0
    assert arithmetic.verify(problem, " 29 \n").score == 1.0
    assert arithmetic.verify(problem, "63").reason == "wrong answer '63', expected '29'"
    assert arithmetic.verify(problem, "29.0").reason == "unreadable answer '29.0'"
    assert arithmetic.make(random.Random(5), 1).answer == str(eval(arithmetic.make(random.Random(5), 1).key))


def test_expression_parser():
    assert expression.evaluate(expression.parse("2+3*(4-1)/2")) == expression.Fraction(13, 2)
    assert expression.numbers(expression.parse("(50 + 25) - 7")) == [50, 25, 7]
    assert expression.evaluate(expression.parse("8-2-1")) == 5           # left associative
    assert expression.evaluate(expression.parse("8/2/2")) == 2
    for bad, message in (("-7+8", "expected a number"), ("1/(2-2)", "division by zero"), ("(1+2", "missing"),
                         ("1 2", "unexpected 2"), ("2**3", "expected a number"), ("__import__('os')", "character"),
                         ("(" * 40 + "1" + ")" * 40, "nested deeper"), ("1+" * 150 + "1", "longer than")):
        with pytest.raises(expression.ExpressionError, match=message):
            expression.evaluate(expression.parse(bad))


def test_countdown_hand_examples(monkeypatch):
    problem = Problem("countdown", 2, "Use 3 7 25 50 to make 68:", "50+25-7", "3 7 25 50->68",
                      {"numbers": (3, 7, 25, 50), "target": 68})

    def no_eval(*args):
        raise AssertionError("eval called")

    monkeypatch.setattr(builtins, "eval", no_eval)
    assert countdown.verify(problem, "50+25-7").score == 1.0
    assert countdown.verify(problem, "I use (50 + 25) - 7\n(50 + 25) - 7").score == 1.0
    assert countdown.verify(problem, "50+25-7-7+7").reason == "uses numbers not given or more often than given: [7, 7]"
    assert countdown.verify(problem, "68").reason == "uses numbers not given or more often than given: [68]"
    assert countdown.verify(problem, "50+25-3").reason == "50+25-3 = 72, not 68"
    assert countdown.verify(problem, "50+25-7/0").score == 0.0
    assert countdown.verify(problem, "__import__('os').system('true')").score == 0.0
    fraction = Problem("countdown", 1, "", "", "", {"numbers": (3, 2), "target": 1})
    assert countdown.verify(fraction, "3/2").reason == "3/2 = 3/2, not 1"


def test_strings_hand_examples():
    problem = strings.make(random.Random(0), 1)
    word = problem.prompt.split(": ")[1]
    name = problem.prompt.split(":")[0]
    assert problem.answer == {"reverse": word[::-1], "sort": "".join(sorted(word)), "upper": word.upper(),
                              "lower": word.lower(), "swapcase": word.swapcase(),
                              "dedupe": "".join(dict.fromkeys(word))}[name]
    chained = Problem("strings", 3, "reverse then upper: abcDe", "EDCBA", "reverse then upper: abcDe")
    assert strings.verify(chained, "EDCBA").score == 1.0 and strings.verify(chained, "edcba").score == 0.0
    assert strings.OPERATIONS["dedupe"]("abacbd") == "abcd"


def test_python_functions_through_the_sandbox():
    problem = tasks.generate(python_functions, 0, 1, difficulty=1)[0]
    assert problem.spec["tests"].count("assert f(") == python_functions.TESTS_PER_PROBLEM
    wrong = "def f(*args):\n    return None\n"
    fenced = f"Here it is:\n```python\n{problem.answer}```\nDone."
    rewards = python_functions.verify_batch([problem] * 3, [problem.answer, fenced, wrong], timeout_s=2.0)
    assert [r.score for r in rewards] == [1.0, 1.0, 0.0]
    assert rewards[2].reason == "failed: 5 of 5 tests failed"
    assert python_functions.extract_code("```\nx = 1\n```") == "x = 1\n"
    assert python_functions.extract_code("x = 2") == "x = 2"
