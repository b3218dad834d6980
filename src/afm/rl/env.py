"""Environments for reinforcement learning on verifiable rewards, in the mould of Verifiers.

An environment has a dataset of prompts (chat messages with the information needed to check an answer),
a parser that pulls the final answer out of a completion (after `####`, inside `<answer>` tags, or in a
code block), and a rubric: weighted reward functions. A reward function that raises scores 0 and the
error is counted and logged; training goes on. Multi-turn environments answer the model between turns
(`env_response`): feedback, a tool's output, a request to retry, until they return None or the turn
limit is reached.
"""

from __future__ import annotations

import logging
import re
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger(__name__)

# The seed of held-out problems: GRPO never trains on problems generated with it, and evaluations of
# environments (`afm eval`'s reasoning-gym tasks, GRPO's held-out reward) draw their problems from it.
HELD_OUT_SEED = 1_000_003


@dataclass
class Sample:
    prompt: list[dict[str, str]]  # the conversation before the model's first turn
    answer: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    task: str = ""


# ---- parsers ------------------------------------------------------------------------------------


class Parser(Protocol):
    def parse(self, text: str) -> str | None: ...


@dataclass(frozen=True)
class HashParser:
    """The text after the last `####` (GSM8K's convention), up to the end of its line."""

    def parse(self, text: str) -> str | None:
        if "####" not in text:
            return None
        answer = text.rsplit("####", 1)[1].strip().split("\n", 1)[0].strip()
        return answer or None


@dataclass(frozen=True)
class XMLParser:
    """The content of the last `<tag>...</tag>`."""

    tag: str = "answer"

    def parse(self, text: str) -> str | None:
        found = re.findall(rf"<{self.tag}>(.*?)</{self.tag}>", text, flags=re.DOTALL)
        return found[-1].strip() if found and found[-1].strip() else None


@dataclass(frozen=True)
class CodeParser:
    """The last fenced code block (```python ... ``` or plain ```), else None."""

    language: str = "python"

    def parse(self, text: str) -> str | None:
        blocks = re.findall(rf"```(?:{self.language})?[ \t]*\n(.*?)```", text, flags=re.DOTALL)
        return blocks[-1] if blocks and blocks[-1].strip() else None


# ---- rubrics ------------------------------------------------------------------------------------

RewardFn = Callable[[str, "str | None", Sample], float]


@dataclass
class RewardFunc:
    name: str
    fn: RewardFn  # (completion text, parsed answer or None, sample) -> reward
    weight: float = 1.0


@dataclass
class Score:
    total: float
    parts: dict[str, float]
    errors: dict[str, str]


@dataclass
class Rubric:
    funcs: list[RewardFunc]
    error_counts: Counter = field(default_factory=Counter)

    def score(self, completion: str, parsed: str | None, sample: Sample) -> Score:
        parts, errors = {}, {}
        for f in self.funcs:
            try:
                value = float(f.fn(completion, parsed, sample))
            except Exception as e:  # noqa: BLE001 - a reward function may fail on any input: it scores 0
                value = 0.0
                errors[f.name] = f"{type(e).__name__}: {e}"
                self.error_counts[f.name] += 1
                log.warning("reward %s raised %s; scored 0", f.name, errors[f.name])
            parts[f.name] = value
        return Score(sum(f.weight * parts[f.name] for f in self.funcs), parts, errors)


def format_reward(completion: str, parsed: str | None, sample: Sample) -> float:
    """1 when the parser found an answer."""
    return 1.0 if parsed is not None else 0.0


# ---- environments --------------------------------------------------------------------------------


class Environment(ABC):
    """Subclasses set `name`, `parser`, `rubric`, and implement `dataset`; multi-turn ones override
    `env_response` and raise `max_turns`."""

    name: str = "env"
    parser: Parser = HashParser()
    rubric: Rubric
    max_turns: int = 1
    system_prompt: str | None = None

    @abstractmethod
    def dataset(self, n: int, seed: int) -> list[Sample]:
        """`n` samples drawn with `seed` (disjoint seeds give disjoint problems: train vs held-out)."""

    def env_response(self, messages: list[dict[str, str]], sample: Sample) -> str | None:
        """The environment's reply after an assistant turn, or None when the episode is over."""
        return None

    def report(self) -> dict[str, Any]:
        """Facts about how the rewards were computed, logged with every GRPO step and in its summary (the
        code environment: which sandbox ran the programs); none by default."""
        return {}

    def prompt_messages(self, sample: Sample) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + sample.prompt

    def score(self, completion: str, sample: Sample) -> Score:
        if not completion.strip():
            self.rubric.error_counts["empty_completion"] += 1
            return Score(0.0, {f.name: 0.0 for f in self.rubric.funcs}, {"completion": "empty"})
        return self.rubric.score(completion, self.parser.parse(completion), sample)

    def correct(self, completion: str, sample: Sample) -> bool:
        """Whether the answer is right (the first reward function is correctness by convention)."""
        first = self.rubric.funcs[0]
        try:
            return first.fn(completion, self.parser.parse(completion), sample) >= 1.0
        except Exception:  # noqa: BLE001
            return False
