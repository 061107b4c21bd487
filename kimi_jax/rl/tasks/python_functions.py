"""Python functions judged by unit tests in the sandbox: "Write a Python function f(x) that returns 3 * x + 4."

Each template has integer parameters, a reference implementation (run here, trusted, to compute the expected
values) and an input sampler; a problem's tests are `assert f(<input>) == <expected>` lines, so the expected values
never enter the sandbox (kimi_jax.rl.sandbox). Difficulty d draws from the templates of level <= d.
"""

from __future__ import annotations

import random
import re
from typing import Callable, NamedTuple, Sequence

from kimi_jax.rl.sandbox import Limits, SandboxPool, run_python
from kimi_jax.rl.tasks.base import Problem, Reward

FAMILY = "python_functions"
DIFFICULTIES = (1, 2, 3)
TESTS_PER_PROBLEM = 5
DEFAULT_TIMEOUT_S = 5.0

class Template(NamedTuple):
    level: int
    name: str
    description: str                          # str.format'ed with the parameters
    params: Callable[[random.Random], dict]
    reference: str                            # str.format'ed with the parameters: a correct f
    inputs: Callable[[random.Random], object]


TEMPLATES = (
    Template(1, "affine", "f(x) that returns {a} * x + {b}", lambda r: dict(a=r.randint(1, 20), b=r.randint(0, 40)),
             "def f(x):\n    return {a} * x + {b}\n", lambda r: r.randint(-50, 50)),
    Template(1, "count_char", "f(s) that returns how many times the character '{c}' occurs in the string s",
             lambda r: dict(c=r.choice("abcdefgh")), "def f(s):\n    return s.count('{c}')\n",
             lambda r: "".join(r.choice("abcdefgh") for _ in range(8))),
    Template(2, "sum_multiples", "f(n) that returns the sum of the positive multiples of {a} below n",
             lambda r: dict(a=r.randint(2, 30)), "def f(n):\n    return sum(range({a}, n, {a}))\n",
             lambda r: r.randint(0, 100)),
    Template(2, "rotate", "f(xs) that returns the list xs rotated left by {a} places (xs is never empty)",
             lambda r: dict(a=r.randint(1, 4)), "def f(xs):\n    k = {a} % len(xs)\n    return xs[k:] + xs[:k]\n",
             lambda r: [r.randint(0, 9) for _ in range(r.randint(1, 7))]),
    Template(3, "filter_sort", "f(xs) that returns the elements of xs greater than {a}, sorted in descending order",
             lambda r: dict(a=r.randint(0, 20)),
             "def f(xs):\n    return sorted((x for x in xs if x > {a}), reverse=True)\n",
             lambda r: [r.randint(0, 25) for _ in range(r.randint(0, 8))]),
    Template(3, "digit_power_sum", "f(n) that returns the sum of the {a}-th powers of the decimal digits of n (n >= 0)",
             lambda r: dict(a=r.randint(1, 4)), "def f(n):\n    return sum(int(d) ** {a} for d in str(n))\n",
             lambda r: r.randint(0, 10 ** 6)),
)


def make(rng: random.Random, difficulty: int) -> Problem:
    template = rng.choice([t for t in TEMPLATES if t.level <= difficulty])
    params = template.params(rng)
    reference = template.reference.format(**params)
    namespace: dict = {}
    exec(reference, namespace)       # our own template, not model text
    inputs = [template.inputs(rng) for _ in range(TESTS_PER_PROBLEM)]
    tests = "".join(f"assert f({x!r}) == {namespace['f'](x)!r}\n" for x in inputs)
    key = template.name + "".join(f" {k}={v}" for k, v in sorted(params.items()))
    return Problem(FAMILY, difficulty, prompt=f"Write a Python function {template.description.format(**params)}.",
                   answer=reference, key=key, spec={"tests": tests})


def extract_code(response: str) -> str:
    """The first ```-fenced block of the response (a language tag after the fence is dropped), else all of it."""
    match = re.search(r"```[A-Za-z0-9_+-]*\n(.*?)```", response, re.DOTALL)
    return match.group(1) if match else response


def verify_batch(problems: Sequence[Problem], responses: Sequence[str], *, pool: SandboxPool | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, limits: Limits = Limits(), retries: int = 1) -> list[Reward]:
    """Run every response's code against its problem's tests (on `pool`, else one at a time here). A sandbox error
    is retried up to `retries` times, then scored None (left out of the reward, never 0)."""
    programs = [extract_code(response) for response in responses]
    tests = [problem.spec["tests"] for problem in problems]
    pending = list(range(len(problems)))
    results: dict = {}
    for _ in range(retries + 1):
        if pool is not None:
            batch = pool.map([programs[i] for i in pending], [tests[i] for i in pending], timeout_s=timeout_s,
                             limits=limits)
        else:
            batch = [run_python(programs[i], tests[i], timeout_s=timeout_s, limits=limits) for i in pending]
        results.update(zip(pending, batch))
        pending = [i for i in pending if results[i].status == "sandbox_error"]
        if not pending:
            break
    return [Reward(results[i].reward, f"{results[i].status}: {results[i].reason}") for i in range(len(problems))]
