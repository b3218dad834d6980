"""Multiple choice by log-likelihood (lm-eval's `multiple_choice` output type).

Every choice is scored as the summed log-probability of `target_delimiter + choice` after the context.
`acc` counts questions whose highest-scoring choice is the gold one; `acc_norm` divides each choice's
log-likelihood by the length of the choice text in characters first (lm-eval's definition: Python
`len` of the choice, without the delimiter), which removes the bias towards short answers. Ties go to
the first choice, as numpy's argmax does. The chance baseline is the mean of 1 / number of choices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from afm.eval.loglik import loglikelihoods
from afm.eval.stats import flatten, proportion
from afm.eval.tasks import MCQuestion


def argmax(values: Sequence[float]) -> int:
    """The index of the largest value; the first one on ties."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def predictions(lls: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """(acc prediction, acc_norm prediction) from the choices' log-likelihoods."""
    # An empty choice would divide by zero; lm-eval would give nan, one character is the closest sane value.
    return argmax(lls), argmax([ll / max(1, len(c)) for ll, c in zip(lls, choices, strict=True)])


def score_multiple_choice(llm: Any, questions: Sequence[MCQuestion], *, label: str = "mc", samples: int = 3,
                          progress: bool = True) -> dict[str, Any]:
    """Score every question in one batched pass through the engine; metrics, counts and a few samples."""
    requests: list[tuple[str, str]] = []
    spans: list[tuple[int, int]] = []
    for q in questions:
        spans.append((len(requests), len(q.choices)))
        requests.extend((q.context, q.target_delimiter + c) for c in q.choices)
    lls = loglikelihoods(llm, requests, label=label, progress=progress)
    correct = correct_norm = 0
    chance = 0.0
    shown: list[dict[str, Any]] = []
    groups: dict[str, dict[str, float]] = {}
    for q, (start, k) in zip(questions, spans, strict=True):
        row = lls[start:start + k]
        pred, pred_norm = predictions(row, q.choices)
        correct += pred == q.gold
        correct_norm += pred_norm == q.gold
        chance += 1 / k
        if q.group is not None:
            g = groups.setdefault(q.group, {"n": 0, "acc": 0.0, "acc_norm": 0.0, "chance": 0.0})
            g["n"] += 1
            g["acc"] += pred == q.gold
            g["acc_norm"] += pred_norm == q.gold
            g["chance"] += 1 / k
        if len(shown) < samples:
            shown.append({"where": q.where, "context": q.context[-300:], "choices": q.choices, "gold": q.gold,
                          "loglikelihoods": row, "pred": pred, "pred_norm": pred_norm})
    n = len(questions)
    baseline = chance / n if n else 0.0
    return {
        "n": n,
        **flatten({"acc": proportion(correct, n, baseline), "acc_norm": proportion(correct_norm, n, baseline)}),
        "baseline_name": "chance (mean of 1/number of choices)",
        "details": {"correct": correct, "correct_norm": correct_norm, "requests": len(requests),
                    # per `lang` / `subject`: accuracies and chance as fractions of that group's questions
                    "by_group": {name: {"n": int(g["n"]), **{k: g[k] / g["n"] for k in ("acc", "acc_norm", "chance")}}
                                 for name, g in sorted(groups.items())}},
        "samples": shown,
    }
