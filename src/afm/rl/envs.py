"""Built-in environments: arithmetic (exact and symbolic checking with sympy), reasoning-gym tasks with
their own scorers, and code with unit tests run in the sandbox (HumanEval format)."""

from __future__ import annotations

import json
import logging
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from afm.errors import AFMError
from afm.rl.env import (
    CodeParser,
    Environment,
    HashParser,
    RewardFunc,
    Rubric,
    Sample,
    format_reward,
)

log = logging.getLogger(__name__)

ANSWER_FORMAT = "Finish with your final answer after ####."


def equivalent(answer: str | None, reference: str) -> bool:
    """Exact match after normalisation, else symbolic equality with sympy (2/4 == 0.5 == 1/2)."""
    if answer is None:
        return False
    a, b = answer.strip().rstrip(".").replace(",", ""), reference.strip().replace(",", "")
    if a == b:
        return True
    import sympy

    try:
        diff = sympy.simplify(sympy.sympify(a, rational=True) - sympy.sympify(b, rational=True))
    except (sympy.SympifyError, TypeError, SyntaxError, ValueError, AttributeError, ZeroDivisionError):
        return False
    return diff == 0


def correct_answer(completion: str, parsed: str | None, sample: Sample) -> float:
    return 1.0 if sample.answer is not None and equivalent(parsed, sample.answer) else 0.0


def numeric_closeness(completion: str, parsed: str | None, sample: Sample) -> float:
    """Partial credit for an integer answer near the right one: 1 / (1 + |error|). Where exact answers
    are rare (small models) it still ranks a group's replies, so advantages are not all zero."""
    try:
        return 1.0 / (1.0 + abs(int((parsed or "").strip().rstrip(".")) - int(sample.answer or "")))
    except ValueError:
        return 0.0


class ArithmeticEnv(Environment):
    """Integer arithmetic with 2 to `max_terms` terms ("Calculate 12 + 7 * 3."), answers after ####.
    The same question format as reasoning-gym's basic_arithmetic, generated here without it.
    `closeness` > 0 adds `numeric_closeness` with that weight to the rubric."""

    name = "arithmetic"

    def __init__(self, max_terms: int = 3, max_value: int = 20, ops: str = "+-*", closeness: float = 0.0) -> None:
        self.parser = HashParser()
        funcs = [RewardFunc("correct", correct_answer, 1.0), RewardFunc("format", format_reward, 0.1)]
        if closeness > 0:
            funcs.append(RewardFunc("closeness", numeric_closeness, closeness))
        self.rubric = Rubric(funcs)
        self.max_terms, self.max_value, self.ops = max_terms, max_value, ops

    def dataset(self, n: int, seed: int) -> list[Sample]:
        rng = random.Random(f"arithmetic:{seed}")
        out = []
        while len(out) < n:
            terms = [str(rng.randint(0, self.max_value)) for _ in range(rng.randint(2, self.max_terms))]
            expr = terms[0]
            for t in terms[1:]:
                expr += f" {rng.choice(self.ops)} {t}"
            out.append(Sample([{"role": "user", "content": f"Calculate {expr}."}], str(eval(expr)),  # noqa: S307
                              {"expression": expr}, "arithmetic"))
        return out


class RetryArithmeticEnv(ArithmeticEnv):
    """Multi-turn arithmetic: a reply without a parseable answer gets one request to give it."""

    name = "arithmetic-retry"
    max_turns = 2

    def env_response(self, messages: list[dict[str, str]], sample: Sample) -> str | None:
        if self.parser.parse(messages[-1]["content"]) is None:
            return ANSWER_FORMAT
        return None


def reasoning_gym_module() -> Any:
    """Import reasoning-gym: installed, or from afm's package cache (where `afm data fetch starter` puts
    it). Its own dependencies come after afm's on sys.path, so they never shadow them."""
    try:
        import reasoning_gym

        return reasoning_gym
    except ImportError:
        pass
    from afm.data.starter import default_cache_dir

    for target in sorted((Path(default_cache_dir()) / "pip-target").glob("reasoning_gym-*")):
        if (target / ".afm-complete").exists() and str(target) not in sys.path:
            sys.path.append(str(target))
    try:
        import reasoning_gym

        return reasoning_gym
    except ImportError as e:
        raise AFMError("reasoning-gym is not available: pip install reasoning-gym, or run "
                       "`afm data fetch starter DIR --only reasoning-gym` to cache it") from e


class ReasoningGymEnv(Environment):
    """A reasoning-gym dataset, scored by that dataset's own `score_answer` (partial credit allowed)."""

    def __init__(self, dataset_name: str) -> None:
        self.dataset_name = dataset_name
        self.name = f"reasoning-gym:{dataset_name}"
        self.parser = HashParser()
        self._datasets: dict[int, Any] = {}
        self.rubric = Rubric([RewardFunc("score", self._score, 1.0), RewardFunc("format", format_reward, 0.1)])

    def dataset(self, n: int, seed: int) -> list[Sample]:
        rg = reasoning_gym_module()
        data = rg.create_dataset(self.dataset_name, size=n, seed=seed)
        self._datasets[seed] = data
        return [Sample([{"role": "user", "content": f"{e['question']}\n{ANSWER_FORMAT}"}], str(e["answer"]),
                       {"seed": seed, "index": i}, self.name) for i, e in enumerate(data)]

    def _score(self, completion: str, parsed: str | None, sample: Sample) -> float:
        data = self._datasets[sample.info["seed"]]
        return float(data.score_answer(parsed, data[sample.info["index"]]))


class CodeEnv(Environment):
    """Write a Python function; reward 1 when the unit tests pass in the sandbox.

    Problems are HumanEval-format records (`prompt`, `test`, `entry_point`) from a JSONL file, or, with
    no file, small generated functions with generated tests. The completion is the last fenced code
    block, or (HumanEval style) a continuation of the prompt's function. `report()` says which sandbox
    ran the tests; a weaker one than bubblewrap, or none, is warned about when the environment is made.
    """

    name = "code"

    def __init__(self, problems: str | Path | None = None, timeout_s: float = 5.0) -> None:
        from afm.rl.sandbox import isolation

        self.parser = CodeParser()
        self.problems = Path(problems) if problems else None
        self.timeout_s = timeout_s
        self.rubric = Rubric([RewardFunc("tests", self._tests, 1.0)])
        self.sandbox_runs: Counter[str] = Counter()  # tests run, by the isolation that ran them
        self.isolation = isolation()
        if self.isolation.startswith("unshare"):
            log.warning("code rewards: bubblewrap is missing or cannot start here, so programs run in the WEAKER "
                        "unshare sandbox, where they can read every world-readable host file (the problems' tests "
                        "among them: a policy can learn to look answers up). Install bubblewrap (apt-get install "
                        "bubblewrap). Sandbox: %s", self.isolation)
        elif not self.isolation.startswith("bwrap"):
            log.warning("code rewards: no sandbox can isolate programs here, so every code reward will be 0: %s",
                        self.isolation)

    def dataset(self, n: int, seed: int) -> list[Sample]:
        if self.problems is not None:
            records = [json.loads(line) for line in self.problems.read_text().splitlines() if line.strip()]
            rng = random.Random(seed)
            rng.shuffle(records)
            return [Sample([{"role": "user", "content": f"Complete this function:\n```python\n{r['prompt']}```"}],
                           None, {"prompt": r["prompt"], "test": r["test"], "entry_point": r["entry_point"]},
                           f"code:{r.get('task_id', i)}") for i, r in enumerate(records[:n])]
        rng = random.Random(f"code:{seed}")
        out = []
        for i in range(n):
            k, op = rng.randint(1, 9), rng.choice(["+", "*", "-"])
            name = f"f{i}"
            prompt = f"def {name}(x: int) -> int:\n    \"\"\"Return x {op} {k}.\"\"\"\n"
            cases = [rng.randint(-50, 50) for _ in range(4)]
            test = "def check(candidate):\n" + "".join(
                f"    assert candidate({c}) == {eval(f'{c} {op} {k}')}\n" for c in cases)  # noqa: S307
            out.append(Sample([{"role": "user", "content": f"Complete this function:\n```python\n{prompt}```"}],
                              None, {"prompt": prompt, "test": test, "entry_point": name}, "code"))
        return out

    def _tests(self, completion: str, parsed: str | None, sample: Sample) -> float:
        from afm.rl.sandbox import run_tests

        code = parsed if parsed is not None else sample.info["prompt"] + completion
        if f"def {sample.info['entry_point']}" not in code:
            code = sample.info["prompt"] + code
        outcome = run_tests(code, sample.info["test"], sample.info["entry_point"], timeout_s=self.timeout_s)
        self.sandbox_runs[outcome.result.isolation] += 1
        return 1.0 if outcome.passed else 0.0

    def report(self) -> dict[str, Any]:
        """`sandbox`: the isolation that ran the tests so far ("bwrap", "unshare", "none"; joined by "+"
        were it ever more than one)."""
        return {"sandbox": "+".join(sorted(self.sandbox_runs))} if self.sandbox_runs else {}


ENVIRONMENTS = {
    "arithmetic": ArithmeticEnv,
    "arithmetic-retry": RetryArithmeticEnv,
    "code": CodeEnv,
}


def make_env(spec: str, **kwargs: Any) -> Environment:
    """`arithmetic`, `arithmetic-retry`, `code`, or `reasoning-gym:<dataset>`."""
    if spec.startswith("reasoning-gym:"):
        return ReasoningGymEnv(spec.split(":", 1)[1])
    if spec not in ENVIRONMENTS:
        raise AFMError(f"unknown environment {spec!r}; known: {', '.join(ENVIRONMENTS)}, reasoning-gym:<dataset>")
    return ENVIRONMENTS[spec](**kwargs)
